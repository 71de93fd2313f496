"""Small models, tasks and brute-force per-example gradients shared by the engine tests."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dataworth import Task


class TokenMLP(nn.Module):
    """(B, T, 4) -> (B, T, 3) through Linear(4, 5), tanh, Linear(5, 3)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 5, bias=bias)
        self.fc2 = nn.Linear(5, 3, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class RegressionTask(Task):
    """Example = (x (T, 4), y (T, 3), mask (T,)); loss = sum over unmasked tokens of squared error."""

    def collate(self, examples):
        x, y, m = zip(*examples)
        return {"x": torch.stack(x), "y": torch.stack(y), "mask": torch.stack(m)}

    def loss(self, model, batch, *, sample_labels=False):
        out = model(batch["x"])
        target = batch["y"]
        if sample_labels:  # Gaussian likelihood: sampled targets are the prediction plus unit noise
            target = out.detach() + torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return (((out - target) ** 2).sum(-1) * batch["mask"]).sum()

    def token_mask(self, batch):
        return batch["mask"].bool()


def regression_examples(n: int = 12, tokens: int = 6, seed: int = 0):
    """Examples with a random number of masked trailing tokens (padding)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        mask = torch.zeros(tokens)
        mask[: int(torch.randint(1, tokens + 1, (1,), generator=g))] = 1
        examples.append((torch.randn(tokens, 4, generator=g), torch.randn(tokens, 3, generator=g), mask))
    return examples


def per_example_weight_grads(model: nn.Module, task: Task, examples, names: list[str]) -> dict[str, torch.Tensor]:
    """Brute force with torch.func: layer -> (N, n_out, n_in[+1]) gradient of each example's loss,
    bias gradient appended as the last column when the layer has a bias."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = task.collate(examples)

    def loss_one(p, x, y, m):
        return task.loss(lambda inp: functional_call(model, p, (inp,)), {"x": x[None], "y": y[None], "mask": m[None]})

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, batch["x"], batch["y"], batch["mask"])
    out = {}
    for name in names:
        w = grads[f"{name}.weight"]
        b = grads.get(f"{name}.bias")
        out[name] = torch.cat([w, b[..., None]], dim=-1) if b is not None else w
    return out


def hf_per_example_grads(
    model: nn.Module, sequences: list[list[int]], targets: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Brute force for HF causal LMs: each example alone (no padding) through torch.func.grad.
    targets: layer -> "linear" | "conv1d" | "embedding"; returns layer -> (N, n_out, n_in) in the
    engine's convention (Conv1D and embedding weights are transposed)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, ids):
        logits = functional_call(model, p, (), {"input_ids": ids[None]}).logits[0, :-1]
        return F.cross_entropy(logits, ids[1:], reduction="sum")

    out = {name: [] for name in targets}
    for seq in sequences:
        g = grad(loss)(params, torch.tensor(seq))
        for name, kind in targets.items():
            w = g[f"{name}.weight"]
            out[name].append(w if kind == "linear" else w.T)
    return {k: torch.stack(v) for k, v in out.items()}


class InplaceNet(nn.Module):
    """(B, T, 4) -> (B, T, 3) with in-place ops on tracked outputs: [fc0, tanh,] fc1 -> ReLU(inplace),
    fc2 -> `h += a` (in-place residual), fc3. Without fc0, fc1 is the first tracked layer."""

    def __init__(self, first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc0 = None if first else nn.Linear(4, 4)
        self.fc1 = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x):
        if self.fc0 is not None:
            x = torch.tanh(self.fc0(x))
        a = self.act(self.fc1(x))
        h = self.fc2(a)
        h += a
        return self.fc3(h)


class PaddedEmbeddingNet(nn.Module):
    """ids (B, T) -> (B, T, 3) through Embedding(7, 4, padding_idx=2) and Linear(4, 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4, padding_idx=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def id_examples(n: int = 8, tokens: int = 6, seed: int = 0):
    """RegressionTask examples whose x is ids (T,) in [0, 7): id 2 (the padding_idx) occurs as text."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 7, (tokens,), generator=g), y, m) for (_, y, m) in regression_examples(n, tokens, seed)]


class PooledNet(nn.Module):
    """(B, T, 4) -> (B, 1, 3): token-level fc1 (B, T, 5), tanh, mean over tokens, head on (B, 1, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x)).mean(1, keepdim=True))


class PooledTask(RegressionTask):
    """Example = (x (T, 4), y (3,), mask (T,)); loss = squared error of the pooled prediction."""

    def loss(self, model, batch, *, sample_labels=False):
        return ((model(batch["x"])[:, 0] - batch["y"]) ** 2).sum()


def pooled_examples(n: int = 10, tokens: int = 6, seed: int = 0):
    return [(x, y[0], m) for (x, y, m) in regression_examples(n, tokens, seed)]
