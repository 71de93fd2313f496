"""LoGra projections: per layer a pair (P_in: k_in x n_in, P_out: k_out x n_out), a saveable artifact.

A layer's per-example gradient dW (n_out x n_in) is logged as P_out dW P_in^T (k_out x k_in),
flattened row-major, so vec(G) = (P_out (x) P_in) vec(dW). All layers' blocks are concatenated in
layer order into one vector of length `layout.dim` per example.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dataworth.config import ProjectionConfig
from dataworth.errors import ConfigError, MismatchError
from dataworth.layers import LayerSpec

WEIGHTS_FILE = "projection.safetensors"
CONFIG_FILE = "projection.json"


@dataclass(frozen=True)
class Block:
    """Where one layer's (k_out x k_in) block sits in the flat gradient vector."""

    name: str
    k_out: int
    k_in: int
    offset: int

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) flat gradients -> (N, k_out, k_in) view of this layer's block."""
        return flat[:, self.offset : self.offset + self.size].reshape(-1, self.k_out, self.k_in)


class GradientLayout:
    """Ordered blocks of the flat projected gradient (N, D)."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks
        self.dim = sum(b.size for b in blocks)
        self.by_name = {b.name: b for b in blocks}

    @classmethod
    def from_ranks(cls, ranks: dict[str, tuple[int, int]]) -> "GradientLayout":
        """ranks: layer -> (k_in, k_out), in layer order."""
        blocks, offset = [], 0
        for name, (k_in, k_out) in ranks.items():
            blocks.append(Block(name, k_out, k_in, offset))
            offset += k_out * k_in
        return cls(blocks)


def input_width(spec: LayerSpec, config: ProjectionConfig) -> int:
    """n_in, plus one for the column of ones when the bias gradient is logged."""
    return spec.n_in + int(config.bias and spec.has_bias)


def requested_ranks(spec: LayerSpec, config: ProjectionConfig) -> tuple[int, int]:
    """(k_in, k_out) asked for a layer: its first matching `ranks` override, else `embedding_ranks` for an
    embedding, else the defaults."""
    default = (config.rank_in, config.rank_out)
    if spec.kind == "embedding" and config.embedding_ranks is not None:
        default = config.embedding_ranks
    return next((r for pattern, r in config.ranks.items() if fnmatchcase(spec.name, pattern)), default)


def resolve_ranks(spec: LayerSpec, config: ProjectionConfig) -> tuple[int, int]:
    """(k_in, k_out) of a layer: its override, else the defaults; full width for identity."""
    n_in = input_width(spec, config)
    if config.init == "identity":
        return n_in, spec.n_out
    k_in, k_out = requested_ranks(spec, config)
    for side, k, n in [("rank_in", k_in, n_in), ("rank_out", k_out, spec.n_out)]:
        if k > n:
            raise ConfigError(
                f"{side}={k} exceeds the width {n} of layer {spec.name!r}; lower it, or override "
                f"this layer with ranks={{{spec.name!r}: (k_in, k_out)}}"
            )
    return k_in, k_out


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    """A CPU generator fixed by (seed, layer name, side): identical in every process and machine."""
    digest = hashlib.sha256(f"dataworth:{seed}:{name}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _gaussian(k: int, n: int, seed: int, name: str, side: str) -> torch.Tensor:
    """(k, n) with N(0, 1/k) entries, so E|P x|^2 = |x|^2."""
    return torch.randn(k, n, generator=_generator(seed, name, side), dtype=torch.float64).div_(k**0.5).float()


def top_eigenvectors(covariance: torch.Tensor, k: int) -> torch.Tensor:
    """(k, n) rows = eigenvectors of the (n, n) covariance with the k largest eigenvalues."""
    _, vectors = torch.linalg.eigh(covariance.double())
    return vectors[:, -k:].flip(1).T.contiguous().float()


class Projection:
    """The projection matrices of every tracked layer, with the config that made them."""

    def __init__(self, config: ProjectionConfig, layers: dict[str, LayerSpec], p_in: dict, p_out: dict):
        self.config = config
        self.layers = layers
        self.p_in = p_in  # name -> (k_in, n_in[+1]) float32
        self.p_out = p_out  # name -> (k_out, n_out) float32
        self.layout = GradientLayout.from_ranks({n: (p_in[n].shape[0], p_out[n].shape[0]) for n in layers})

    @classmethod
    def create(
        cls,
        config: ProjectionConfig,
        layers: dict[str, LayerSpec],
        covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> "Projection":
        """Random, identity or PCA projections; PCA needs `covariances`: name -> (C_in, C_out)."""
        if config.init == "pca" and covariances is None:
            raise ConfigError("init='pca' needs input/output covariances from a statistics pass")
        p_in, p_out = {}, {}
        for name, spec in layers.items():
            k_in, k_out = resolve_ranks(spec, config)
            n_in = input_width(spec, config)
            if config.init == "identity":
                p_in[name], p_out[name] = torch.eye(n_in), torch.eye(spec.n_out)
            elif config.init == "random":
                p_in[name] = _gaussian(k_in, n_in, config.seed, name, "in")
                p_out[name] = _gaussian(k_out, spec.n_out, config.seed, name, "out")
            else:
                c_in, c_out = covariances[name]
                p_in[name], p_out[name] = top_eigenvectors(c_in, k_in), top_eigenvectors(c_out, k_out)
        return cls(config, layers, p_in, p_out)

    def content_hash(self) -> str:
        """sha256 of the config, the layer specs and every matrix's bytes."""
        h = hashlib.sha256(self.config.to_json().encode())
        for name, spec in self.layers.items():
            h.update(json.dumps(asdict(spec), sort_keys=True).encode())
            h.update(self.p_in[name].contiguous().numpy().tobytes())
            h.update(self.p_out[name].contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, directory: str | Path) -> str:
        """Write projection.safetensors + projection.json; returns the content hash."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}|in": t.contiguous() for n, t in self.p_in.items()}
        tensors |= {f"{n}|out": t.contiguous() for n, t in self.p_out.items()}
        save_file(tensors, directory / WEIGHTS_FILE)
        digest = self.content_hash()
        meta = {
            "config": json.loads(self.config.to_json()),
            "layers": [asdict(s) for s in self.layers.values()],
            "dim": self.layout.dim,
            "content_hash": digest,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return digest

    @classmethod
    def load(cls, directory: str | Path) -> "Projection":
        """Load a saved projection and check its bytes still match the recorded hash."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(directory / WEIGHTS_FILE)
        layers = {s["name"]: LayerSpec(**s) for s in meta["layers"]}
        projection = cls(
            ProjectionConfig(**meta["config"]),
            layers,
            {n: tensors[f"{n}|in"] for n in layers},
            {n: tensors[f"{n}|out"] for n in layers},
        )
        if projection.content_hash() != meta["content_hash"]:
            raise MismatchError(
                f"projection in {directory} does not match its recorded hash; it was modified after saving: recreate it"
            )
        return projection
