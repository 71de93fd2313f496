"""Block-diagonal (per layer) Hessian approximations in the projected space, and their damped inverse.

For a layer with projected gradients G (k_out x k_in), vec row-major:
    raw    H = E[vec G vec G^T] = Q diag(d) Q^T
    kfac   H = S (x) A with A = E_tokens[u u^T] = Q_A diag(a) Q_A^T, S = sum_t v v^T / examples
           = Q_S diag(s) Q_S^T; eigenvalues s_o a_i
    ekfac  KFAC eigenbases, eigenvalues E[(Q_S^T G Q_A)^2]: diag((Q_S (x) Q_A)^T M (Q_S (x) Q_A)) for the
           second moment M when it was kept, else one more pass over the gradients (wide layers: M is
           D_l x D_l, 2 GB for a 16 x 1024 block)
Damping is added when preconditioning, never stored, so repeated calls never accumulate it.
"""

from fnmatch import fnmatchcase

import torch

from dataworth.config import CurvatureConfig
from dataworth.errors import ConfigError, MismatchError
from dataworth.projection import GradientLayout
from dataworth.statistics import CurvatureStatistics


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the matrices are PSD up to rounding) and eigenvectors, float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.clamp_min(0), vectors


def ekfac_eigenvalues(second_moment: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """(k_out, k_in): diag of (Q_S (x) Q_A)^T M (Q_S (x) Q_A) for M (k_out k_in square)."""
    k_out, k_in = q_s.shape[0], q_a.shape[0]
    m = second_moment.double().reshape(k_out, k_in, k_out, k_in)
    m = torch.einsum("abcd,ao,bi->oicd", m, q_s, q_a)  # rotate the left index pair
    return torch.einsum("oicd,co,di->oi", m, q_s, q_a)  # and the right one, keeping the diagonal


def _raw_from_gradients(stats: CurvatureStatistics, gradients) -> dict[str, dict[str, torch.Tensor]]:
    """Raw factors from E[vec G vec G^T] summed over `gradients` ((B, D) blocks of stats' examples)."""
    moments = {b.name: torch.zeros(b.size, b.size, dtype=torch.float64) for b in stats.layout.blocks}
    seen = 0
    for rows in gradients:
        for block in stats.layout.blocks:
            g = block.view(rows).reshape(rows.shape[0], -1).double()
            moments[block.name] += g.T @ g
        seen += rows.shape[0]
    if seen != stats.examples:
        raise MismatchError(f"{seen} gradient rows for statistics of {stats.examples} examples")
    factors = {}
    for name, moment in moments.items():
        d, q = _eigh(moment / seen)
        factors[name] = {"eigenvalues": d, "eigenvectors": q}
    return factors


class Curvature:
    """Undamped eigen-factors of every layer: `factors[layer][name]` float64 tensors."""

    def __init__(self, kind: str, layout: GradientLayout, factors: dict[str, dict[str, torch.Tensor]]):
        self.kind = kind
        self.layout = layout
        self.factors = factors

    @classmethod
    def fit(cls, stats: CurvatureStatistics, kind: str, gradients=None) -> "Curvature":
        """Eigendecompose the merged statistics into the chosen approximation. Raw and EK-FAC need the
        (D_l x D_l) second moments; without them in `stats`, `gradients` (an iterable of (B, D) blocks of
        the same examples' projected gradients, in the same Fisher) stands in for them: one more pass."""
        if kind != "identity" and stats.examples == 0:
            raise ConfigError("curvature statistics are empty: no example was seen")
        if kind in ("raw", "ekfac") and not stats.has_second_moment:
            if gradients is None:
                raise ConfigError(
                    f"curvature {kind!r} needs statistics collected with second_moment=True, or the gradients"
                )
            if kind == "ekfac":
                return cls.fit_ekfac_from_gradients(stats, gradients)
            return cls("raw", stats.layout, _raw_from_gradients(stats, gradients))
        factors = {}
        for block in stats.layout.blocks:
            sums = stats.sums[block.name]
            if kind == "identity":
                factors[block.name] = {}
            elif kind == "raw":
                d, q = _eigh(sums["second_moment"] / stats.examples)
                factors[block.name] = {"eigenvalues": d, "eigenvectors": q}
            else:
                a, q_a = _eigh(sums["activation"] / stats.activation_tokens(block.name))
                s, q_s = _eigh(sums["output_grad"] / stats.examples)
                if kind == "kfac":
                    lam = torch.outer(s, a)  # (k_out, k_in)
                else:
                    lam = ekfac_eigenvalues(sums["second_moment"] / stats.examples, q_s, q_a)
                factors[block.name] = {"eigenvalues": lam, "q_a": q_a, "q_s": q_s}
        return cls(kind, stats.layout, factors)

    @classmethod
    def fit_ekfac_from_gradients(cls, stats: CurvatureStatistics, gradients) -> "Curvature":
        """EK-FAC without (D_l x D_l) second moments: KFAC eigenbases from `stats`, eigenvalues
        mean_i (Q_S^T G_i Q_A)^2 over `gradients`, an iterable of (B, D) blocks of the same examples'
        projected gradients (a second pass, as in Kronfluence). Equals fit(stats, "ekfac") whenever
        stats also holds the second moments; usable at full width (identity projection)."""
        if stats.examples == 0:
            raise ConfigError("curvature statistics are empty: no example was seen")
        bases = {}
        for block in stats.layout.blocks:
            sums = stats.sums[block.name]
            _, q_a = _eigh(sums["activation"] / max(stats.tokens, 1))
            _, q_s = _eigh(sums["output_grad"] / stats.examples)
            bases[block.name] = (q_s, q_a, torch.zeros(block.k_out, block.k_in, dtype=torch.float64))
        seen = 0
        for rows in gradients:
            for block in stats.layout.blocks:
                q_s, q_a, total = bases[block.name]
                g = block.view(rows).double()  # (B, k_out, k_in)
                total += (q_s.T @ g @ q_a).square().sum(0)
            seen += rows.shape[0]
        if seen != stats.examples:
            raise MismatchError(f"{seen} gradient rows for statistics of {stats.examples} examples")
        factors = {n: {"eigenvalues": t / seen, "q_a": q_a, "q_s": q_s} for n, (q_s, q_a, t) in bases.items()}
        return cls("ekfac", stats.layout, factors)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat 'layer|factor' -> tensor map for storage."""
        return {f"{n}|{k}": t for n, f in self.factors.items() for k, t in f.items()}

    @classmethod
    def from_tensors(cls, kind: str, layout: GradientLayout, flat: dict[str, torch.Tensor]) -> "Curvature":
        factors = {b.name: {} for b in layout.blocks}
        for key, tensor in flat.items():
            layer, name = key.rsplit("|", 1)
            if layer not in factors:
                raise MismatchError(f"factor {key!r} is for a layer the projection does not have")
            factors[layer][name] = tensor
        return cls(kind, layout, factors)

    def check_kind(self, config: CurvatureConfig) -> None:
        """Refuse a config of another kind: the fitted factors, not the config, decide the approximation."""
        if config.kind != self.kind:
            raise ConfigError(
                f"the curvature was fitted as {self.kind!r} but CurvatureConfig(kind={config.kind!r}) is used with it; "
                f"fit it with Curvature.fit(stats, {config.kind!r}), or pass CurvatureConfig(kind={self.kind!r})"
            )

    def damping(self, config: CurvatureConfig) -> dict[str, float]:
        """Absolute lambda per layer: the configured value, or alpha * mean eigenvalue if relative."""
        self.check_kind(config)
        result = {}
        for block in self.layout.blocks:
            value = next(
                (v for pattern, v in config.per_layer_damping.items() if fnmatchcase(block.name, pattern)),
                config.damping,
            )
            if config.damping_mode == "relative" and self.kind != "identity":
                mean = float(self.factors[block.name]["eigenvalues"].mean())
                value = value * mean if mean > 0 else value  # a dead layer: G = 0, any lambda works
            result[block.name] = value
        return result

    def preconditioner(self, config: CurvatureConfig) -> "Preconditioner":
        return Preconditioner(self, self.damping(config))


class Preconditioner:
    """Applies (H + lambda I)^-1 per layer to flat gradients (N, D), in the input's dtype."""

    def __init__(self, curvature: Curvature, damping: dict[str, float]):
        self.curvature = curvature
        self.damping = damping
        self._prepared: dict[torch.dtype, dict[str, tuple]] = {}

    def _factors(self, dtype: torch.dtype) -> dict[str, tuple]:
        """Per layer (eigenvectors..., damped eigenvalues) cast to `dtype`, once per dtype: the
        scoring stream calls this preconditioner once per block."""
        if dtype not in self._prepared:
            prepared = {}
            for block in self.curvature.layout.blocks:
                f = {k: v.to(dtype) for k, v in self.curvature.factors[block.name].items()}
                denom = f["eigenvalues"] + self.damping[block.name]
                vectors = (f["eigenvectors"],) if self.curvature.kind == "raw" else (f["q_s"], f["q_a"])
                prepared[block.name] = (*vectors, denom)
            self._prepared[dtype] = prepared
        return self._prepared[dtype]

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.curvature.kind == "identity":
            return flat.clone()
        factors = self._factors(flat.dtype)
        out = torch.empty_like(flat)
        for block in self.curvature.layout.blocks:
            g = block.view(flat)  # (N, k_out, k_in)
            if self.curvature.kind == "raw":
                q, denom = factors[block.name]  # (D_b, D_b), (D_b,)
                r = (g.reshape(-1, block.size) @ q) / denom  # (N, D_b) rotated
                out[:, block.offset : block.offset + block.size] = r @ q.T
            else:
                q_s, q_a, denom = factors[block.name]  # (k_out, k_out), (k_in, k_in), (k_out, k_in)
                r = q_s.T @ g @ q_a / denom  # (N, k_out, k_in)
                out[:, block.offset : block.offset + block.size] = (q_s @ r @ q_a.T).reshape(-1, block.size)
        return out
