"""TRAK (Park et al. 2023, pip package `traker`) as an anchor: one checkpoint, CPU, BasicProjector.

TRAK scores  tau(i, q) = phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i * Q_i,  with phi = P^T grad f / sqrt(p)
(P: p x k Gaussian projection, p parameters), Phi the (N, k) stacked training phi, f the model output
function and Q_i the out-to-loss weight (TRAK also divides the inverse by its mean absolute entry: one
positive constant). TRAK's built-in f are classification margins (log p/(1-p), Q_i = 1 - p).
OUR adaptation to language modelling (not part of TRAK): f(z) = the summed log-probability of z's
target tokens, i.e. minus our per-example loss, so Q_i = -d loss/d f = 1 (a vector of ones).
Both gradients are gradients of -loss, so a positive score means the example lowers the query's loss
(our convention). Ridge: lambda = 0.1 x mean eigenvalue of Phi^T Phi (TRAK's default 0 leaves it
singular whenever N < k, as here: 300 training sequences, k = 512).
Every parameter is featurized; GPT-2's lm_head is tied to the token embedding (one parameter, whose
gradient carries both uses). Attention runs "eager" on a copy of the model (SDPA's mask handling
does not vmap).
"""

import copy
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from trak import TRAKer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import BasicProjector, ProjectionType

from dataworth import CausalLMTask
from dataworth.task import IGNORE

BATCH = 32
RIDGE = 0.1  # lambda / mean eigenvalue of Phi^T Phi


class SummedLogProb(AbstractModelOutput):
    """f(z) = sum of log p(target token | prefix) over z's targets; Q = 1."""

    def __init__(self) -> None:  # abstract in TRAK
        super().__init__()

    @staticmethod
    def get_output(model, weights, buffers, input_ids, attention_mask, labels) -> torch.Tensor:
        """Scalar f for one example: input_ids, attention_mask, labels (T,) as from task.collate."""
        logits = torch.func.functional_call(
            model, (weights, buffers), (input_ids[None],), {"attention_mask": attention_mask[None]}
        ).logits
        return -F.cross_entropy(logits[0, :-1].float(), labels[1:], ignore_index=IGNORE, reduction="sum")

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> torch.Tensor:
        """(B, 1) ones: the loss is -f."""
        return torch.ones(len(batch[0]), 1)


def scores(
    model: nn.Module,
    task: CausalLMTask,
    train,
    queries,
    output_dir: Path,
    seq_len: int,
    proj_dim: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """(N, Q) TRAK scores with our sign convention (positive: the training example lowers the query's
    loss). `seq_len` only bounds example length, as in quality_kronfluence.scores."""
    if max(len(e[0] if isinstance(e, tuple) else e) for e in [*train, *queries]) > seq_len:
        raise ValueError(f"an example is longer than seq_len={seq_len}")
    save_dir = Path(output_dir) / "trak_results"
    shutil.rmtree(save_dir, ignore_errors=True)
    eager = copy.deepcopy(model).eval()
    eager.set_attn_implementation("eager")
    n_params = sum(p.numel() for p in eager.parameters())
    # >= 2 blocks: TRAK frees the projection after finalize_features and regenerates it only when blocked
    projector = BasicProjector(n_params, proj_dim, seed, ProjectionType.normal, "cpu", block_size=-(-proj_dim // 4))
    traker = TRAKer(
        model=eager,
        task=SummedLogProb(),
        train_set_size=len(train),
        save_dir=str(save_dir),
        device="cpu",
        projector=projector,
        use_half_precision=False,
        logging_level=logging.WARNING,
    )

    def batches(examples):
        for start in range(0, len(examples), BATCH):
            batch = task.collate(examples[start : start + BATCH])
            yield [batch["input_ids"], batch["attention_mask"], batch["labels"]]

    traker.load_checkpoint(eager.state_dict(), model_id=0)
    for batch in batches(train):
        traker.featurize(batch, num_samples=len(batch[0]))
    phi = torch.as_tensor(traker.saver.current_store["grads"])  # (N, k)
    traker.score_computer.lambda_reg = RIDGE * float(phi.double().square().sum()) / proj_dim
    traker.finalize_features()
    traker.start_scoring_checkpoint("queries", eager.state_dict(), model_id=0, num_targets=len(queries))
    for batch in batches(queries):
        traker.score(batch, num_samples=len(batch[0]))
    return torch.as_tensor(traker.finalize_scores("queries")).float().clone()  # (N, Q)
