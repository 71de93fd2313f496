"""Value the training data of your own model, trained by your own loop, with dataworth.

A tiny next-token model (plain nn.Module, no Hugging Face) is trained for a few steps on token
sequences from three data sources that teach conflicting rules:
    counting  each token is followed by token + 1 (mod 32)
    skip3     each token is followed by token + 3 (mod 32)
    noise     random tokens
(a tenth of the tokens of every training sequence are typos: random tokens).
Then about ten lines of dataworth capture LoGra gradients of the training set, fit EK-FAC curvature
and score queries: which training examples (and which source) made the model produce each query.
The last query is a copy of a training example, so that example should rank first.

    python examples/custom_training_loop.py      # a few seconds on a CPU
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import dataworth
from dataworth import Curvature, CurvatureConfig, LoGra, ProjectionConfig

VOCAB, LENGTH, TYPOS = 32, 12, 0.1
SOURCES = {"counting": 1, "skip3": 3, "noise": None}  # source -> step between consecutive tokens


class TinyLM(nn.Module):
    """Bigram language model: token -> embedding -> MLP -> next-token logits."""

    def __init__(self, vocab: int = VOCAB, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.out(torch.tanh(self.hidden(self.embed(ids))))


class NextToken(dataworth.Task):
    """An example is a (T,) tensor of token ids; its loss is the summed next-token cross-entropy."""

    def collate(self, examples):
        return {"ids": torch.stack(examples)}  # (B, T)

    def loss(self, model, batch, *, sample_labels=False):
        logits = model(batch["ids"][:, :-1])  # (B, T-1, V)
        targets = batch["ids"][:, 1:]  # (B, T-1)
        if sample_labels:  # true Fisher: targets drawn from the model
            targets = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def sequence(step, g: torch.Generator, typos: float = 0.0) -> torch.Tensor:
    """(LENGTH,) ids following `step` from a random start (random if None), with a share of typos."""
    if step is None:
        return torch.randint(0, VOCAB, (LENGTH,), generator=g)
    start = int(torch.randint(0, VOCAB, (1,), generator=g))
    ids = (start + step * torch.arange(LENGTH)) % VOCAB
    typo = torch.rand(LENGTH, generator=g) < typos
    return torch.where(typo, torch.randint(0, VOCAB, (LENGTH,), generator=g), ids)


def main():
    g = torch.Generator().manual_seed(0)
    train, source = [], []  # training examples and their source index
    for s, step in enumerate(SOURCES.values()):
        for _ in range(40):
            train.append(sequence(step, g, TYPOS))
            source.append(s)
    names = list(SOURCES)

    # Your model and your training loop: nothing here knows about dataworth.
    torch.manual_seed(0)
    model, task = TinyLM(), NextToken()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 60
    for _ in range(steps):
        batch = task.collate([train[int(i)] for i in torch.randint(0, len(train), (32,), generator=g)])
        loss = task.loss(model, batch) / (32 * (LENGTH - 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {steps} steps, final loss {loss.item():.3f}")

    queries = {
        "counting (held out)": sequence(1, g),
        "skip3 (held out)": sequence(3, g),
        "copy of train[7]": train[7].clone(),
    }

    # Valuing the training data: about ten lines.
    logra = LoGra(model, task, ProjectionConfig(rank_in=8, rank_out=8), batch_size=32)
    stats = logra.new_statistics()
    train_grads = logra.capture(train, statistics=stats)  # (N, D) projected gradients + curvature statistics
    curvature = Curvature.fit(stats, "ekfac")
    scorer = logra.scorer(list(queries.values()), curvature, CurvatureConfig(damping=0.1))
    result = scorer.stream(train_grads.split(64), top_k=3, groups={"source": torch.tensor(source)})

    print(f"\n{len(train)} training examples, D = {train_grads.shape[1]} projected gradient dims, EK-FAC curvature")
    for q, query in enumerate(queries):
        print(f"\nquery {query!r}: {queries[query].tolist()}")
        for rank, (score, i) in enumerate(zip(result.top_scores[q].tolist(), result.top_indices[q].tolist()), 1):
            print(f"  top {rank}: train[{i}] ({names[source[i]]}) score {score:+.3g}  {train[i].tolist()}")
    print("\nvalue per data source (sum of influence scores; > 0: the source helped produce the query)")
    print(f"  {'query':22s}" + "".join(f"{n:>12s}" for n in names))
    for q, query in enumerate(queries):
        print(f"  {query:22s}" + "".join(f"{v:>+12.3g}" for v in result.group_sums["source"][:, q].tolist()))


if __name__ == "__main__":
    main()
