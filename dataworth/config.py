"""Every knob of the engine, in typed dataclasses with one line per field."""

import json
from dataclasses import asdict, dataclass, field

from dataworth.errors import ConfigError

PROJECTION_INITS = ("random", "pca", "identity")
SHARED_WEIGHTS = ("refuse", "module_use")
CURVATURES = ("identity", "raw", "kfac", "ekfac")
FISHERS = ("empirical", "sampled")
DAMPING_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class ProjectionConfig:
    """How per-layer gradients are projected: G = P_out dW P_in^T, (k_out x k_in) per example."""

    rank_in: int = 16  # k_in: rows of P_in (projected input width)
    rank_out: int = 16  # k_out: rows of P_out (projected output width)
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # glob -> (k_in, k_out) override
    init: str = "random"  # "random" (seeded Gaussian), "pca" (top covariance eigenvectors), "identity"
    seed: int = 0  # with the layer name, fixes every random projection bit for bit
    include: tuple[str, ...] = ("*",)  # glob patterns of layer names to track
    exclude: tuple[str, ...] = ()  # glob patterns of layer names to skip
    embeddings: bool = False  # also track nn.Embedding layers (sparse one-hot inputs)
    # (k_in, k_out) of every tracked nn.Embedding that `ranks` does not name: vocabulary side, width side.
    # None = rank_in, rank_out. A one-hot input needs a wide vocabulary side to keep tokens apart.
    embedding_ranks: tuple[int, int] | None = None
    bias: bool = False  # append a column of ones to the input so the bias gradient is logged
    # a weight held by several modules (a tied lm_head): "refuse" (its gradient sums every use, and one module
    # sees only its own), or "module_use": each tracked module's own use of it, exactly (what Kronfluence tracks)
    shared_weights: str = "refuse"

    def __post_init__(self):
        if self.init not in PROJECTION_INITS:
            raise ConfigError(f"projection init {self.init!r} is not one of {PROJECTION_INITS}")
        if self.shared_weights not in SHARED_WEIGHTS:
            raise ConfigError(f"projection shared_weights {self.shared_weights!r} is not one of {SHARED_WEIGHTS}")
        for name, value in [("rank_in", self.rank_in), ("rank_out", self.rank_out)]:
            if value < 1:
                raise ConfigError(f"projection {name}={value} must be a positive integer")
        if self.embedding_ranks is not None:
            if len(self.embedding_ranks) != 2 or min(self.embedding_ranks) < 1:
                raise ConfigError(
                    f"projection embedding_ranks={self.embedding_ranks} must be (k_in, k_out), two integers >= 1"
                )
            object.__setattr__(self, "embedding_ranks", tuple(self.embedding_ranks))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "ranks", {k: tuple(v) for k, v in self.ranks.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProjectionConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class CurvatureConfig:
    """Which Hessian approximation preconditions the queries, and how it is damped."""

    kind: str = "ekfac"  # "identity", "raw", "kfac" or "ekfac" (all in the projected space)
    fisher: str = "empirical"  # "empirical" (true labels) or "sampled" (labels drawn from the model)
    damping: float = 0.01  # lambda, or alpha in lambda = alpha * mean eigenvalue when relative (benchmarks/RESULTS.md)
    damping_mode: str = "relative"  # "relative" (per layer, to its mean eigenvalue) or "absolute"
    per_layer_damping: dict[str, float] = field(default_factory=dict)  # glob -> damping override

    def __post_init__(self):
        if self.kind not in CURVATURES:
            raise ConfigError(f"curvature kind {self.kind!r} is not one of {CURVATURES}")
        if self.fisher not in FISHERS:
            raise ConfigError(f"fisher {self.fisher!r} is not one of {FISHERS}")
        if self.damping_mode not in DAMPING_MODES:
            raise ConfigError(f"damping_mode {self.damping_mode!r} is not one of {DAMPING_MODES}")
        for name, value in [("damping", self.damping), *self.per_layer_damping.items()]:
            if not value > 0:
                raise ConfigError(
                    f"damping for {name!r} is {value}; it must be > 0 (try 0.01 relative or 1e-3 absolute)"
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
