"""Streaming influence: score(i, q) = g_q^T (H + lambda I)^-1 g_i over blocks of training gradients.

Queries are preconditioned once (Q x D). Each block of stored training gradients (B x D) costs one
matrix product; the result keeps only per-query top-k, per-example totals and per-group sums, never
the full N x Q matrix (unless asked, for small cases).

Normalisations: "relatif" divides by sqrt(g_i^T H^-1 g_i) (RelatIF); "cosine" also by
sqrt(g_q^T H^-1 g_q), i.e. the cosine of preconditioned gradients (unit-norm, as in TrackStar).
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dataworth.curvature import Preconditioner
from dataworth.errors import ConfigError, MismatchError

NORMALIZATIONS = ("none", "relatif", "cosine")


@dataclass
class InfluenceResult:
    """Scores aggregated over the stream; index i is the row position in the training stream."""

    top_scores: torch.Tensor  # (Q, k) float32, descending per query
    top_indices: torch.Tensor  # (Q, k) int64 training rows
    example_totals: torch.Tensor  # (N,) float64: sum over queries of score(i, q)
    group_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # grouping -> (G, Q) float64
    self_influence: torch.Tensor | None = None  # (N,) float64 g_i^T H^-1 g_i, when computed
    scores: torch.Tensor | None = None  # (N, Q) float32, only with keep_scores=True


class InfluenceScorer:
    """Holds the preconditioned queries; `stream` scores any number of training blocks."""

    def __init__(self, query_gradients: torch.Tensor, preconditioner: Preconditioner, normalize: str = "none"):
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize={normalize!r} is not one of {NORMALIZATIONS}")
        if query_gradients.ndim != 2 or query_gradients.shape[0] == 0:
            raise ConfigError(
                f"query gradients must be a non-empty (Q, D) matrix, got shape {tuple(query_gradients.shape)}"
            )
        if query_gradients.shape[1] != preconditioner.curvature.layout.dim:
            raise MismatchError(
                f"query gradients have {query_gradients.shape[1]} columns but the curvature's projection has "
                f"{preconditioner.curvature.layout.dim}: they come from different projections"
            )
        self.preconditioner = preconditioner
        self.normalize = normalize
        q = query_gradients.double()
        q_pre = preconditioner(q)  # (Q, D) float64, once
        self.query_self = (q * q_pre).sum(1)  # (Q,) g_q^T H^-1 g_q
        if normalize == "cosine":
            q_pre = q_pre / self.query_self.clamp_min(1e-30).sqrt()[:, None]
        self.queries = q_pre.float().T.contiguous()  # (D, Q)

    def self_influence(self, block: torch.Tensor) -> torch.Tensor:
        """(B,) g_i^T H^-1 g_i of a block (B, D)."""
        return (block * self.preconditioner(block)).sum(1, dtype=torch.float64)

    def stream(
        self,
        blocks: Iterable[torch.Tensor],
        *,
        top_k: int = 10,
        groups: Mapping[str, torch.Tensor] | None = None,
        self_influence: bool = False,
        keep_scores: bool = False,
    ) -> InfluenceResult:
        """Score training blocks (B, D) in order. `groups[name]` is an (N,) int64 group id per row."""
        n_queries = self.queries.shape[1]
        top_scores = torch.full((n_queries, 0), float("-inf"))
        top_indices = torch.zeros((n_queries, 0), dtype=torch.int64)
        groups = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in (groups or {}).items()}
        sums = {
            k: torch.zeros(int(v.max()) + 1 if len(v) else 0, n_queries, dtype=torch.float64) for k, v in groups.items()
        }
        totals, selfs, kept = [], [], []
        offset = 0
        for block in blocks:
            block = block.float()
            if block.shape[1] != self.queries.shape[0]:
                raise MismatchError(
                    f"training block has {block.shape[1]} columns, queries {self.queries.shape[0]}: "
                    "gradients from different projections cannot be mixed"
                )
            scores = block @ self.queries  # (B, Q)
            if self.normalize != "none" or self_influence:
                s = self.self_influence(block)  # (B,)
                selfs.append(s)
                if self.normalize != "none":
                    scores = scores / s.clamp_min(1e-30).sqrt().float()[:, None]
            block_top, block_rows = scores.topk(min(top_k, block.shape[0]), dim=0)  # (k, Q) best of this block
            merged = torch.cat([top_scores, block_top.T], dim=1)  # (Q, 2k)
            merged_idx = torch.cat([top_indices, block_rows.T + offset], dim=1)
            top_scores, pos = merged.topk(min(top_k, merged.shape[1]), dim=1)
            top_indices = merged_idx.gather(1, pos)
            totals.append(scores.sum(1, dtype=torch.float64))
            for name, ids in groups.items():
                sums[name].index_add_(0, ids[offset : offset + block.shape[0]], scores.double())
            if keep_scores:
                kept.append(scores)
            offset += block.shape[0]
        for name, ids in groups.items():
            if len(ids) != offset:
                raise MismatchError(f"grouping {name!r} has {len(ids)} ids for {offset} training rows")
        return InfluenceResult(
            top_scores=top_scores,
            top_indices=top_indices,
            example_totals=torch.cat(totals) if totals else torch.zeros(0, dtype=torch.float64),
            group_sums=sums,
            self_influence=torch.cat(selfs) if selfs else None,
            scores=torch.cat(kept) if keep_scores and kept else None,
        )


def merge_results(
    parts: Sequence[InfluenceResult], *, top_k: int, group_codes: Mapping[str, Sequence[torch.Tensor]] | None = None
) -> InfluenceResult:
    """One result from the results of consecutive row ranges scored apart: part i's rows follow part i-1's.

    `group_codes[name][i]` is (G_i,) int64, the merged id of each row of part i's `group_sums[name]`; a group
    may span parts (its sums add). Top-k is the k best of the parts' top-k's, with the rows before each part
    added to its indices. Equal to one stream over all rows, up to the order of float64 additions.
    """
    if not parts:
        raise ConfigError("merge_results needs at least one part")
    n_queries = parts[0].top_scores.shape[0]
    if any(p.top_scores.shape[0] != n_queries for p in parts):
        raise MismatchError("parts were scored against different numbers of queries: they cannot be merged")
    offsets = torch.tensor([0] + [len(p.example_totals) for p in parts]).cumsum(0)
    candidates = torch.cat([p.top_scores for p in parts], dim=1)  # (Q, sum k_i)
    candidate_rows = torch.cat([p.top_indices + o for p, o in zip(parts, offsets[:-1].tolist())], dim=1)
    top_scores, pos = candidates.topk(min(top_k, candidates.shape[1]), dim=1)
    sums = {}
    for name, codes in (group_codes or {}).items():
        if len(codes) != len(parts):
            raise MismatchError(f"grouping {name!r} has codes for {len(codes)} parts, not {len(parts)}")
        codes = [torch.as_tensor(c, dtype=torch.int64) for c in codes]
        for part, part_codes in zip(parts, codes):
            if part.group_sums[name].shape[0] != len(part_codes):
                raise MismatchError(
                    f"grouping {name!r}: a part has {part.group_sums[name].shape[0]} group sums "
                    f"but {len(part_codes)} codes"
                )
        count = max((int(c.max()) + 1 for c in codes if len(c)), default=0)
        sums[name] = torch.zeros(count, n_queries, dtype=torch.float64)
        for part, part_codes in zip(parts, codes):
            sums[name].index_add_(0, part_codes, part.group_sums[name])
    selfs = [p.self_influence for p in parts]
    kept = [p.scores for p in parts]
    return InfluenceResult(
        top_scores=top_scores,
        top_indices=candidate_rows.gather(1, pos),
        example_totals=torch.cat([p.example_totals for p in parts]),
        group_sums=sums,
        self_influence=torch.cat(selfs) if all(s is not None for s in selfs) else None,
        scores=torch.cat(kept) if all(s is not None for s in kept) else None,
    )
