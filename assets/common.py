"""What every asset shares: the shard partitions, commit metadata, and (de)serialising tensors."""

import hashlib
import resource

import dagster as dg
import numpy as np
import polars as pl
import torch

from resources.delta import DeltaStore, run_metadata

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")
SINGLE_RUN = dg.BackfillPolicy.single_run()  # a range of shards is one step, one model load


def commit_metadata(context: dg.AssetExecutionContext, upstream: dict[str, int | None]) -> dict[str, str]:
    """Dagster run id, this asset's code version and the upstream table versions it read."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or ""
    return run_metadata(context.run_id, code_version, upstream)


def upstream_versions(delta: DeltaStore, *tables: str) -> dict[str, int | None]:
    return {t: delta.version(t) for t in tables}


def sql_in(column: str, values: list[str]) -> str:
    """SQL predicate `column IN ('a', 'b')` with quoted literals (never true for no values)."""
    if not values:
        return "1 = 0"
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f'"{column}" IN ({quoted})'


def gradients_to_binary(gradients: torch.Tensor) -> pl.Series:
    """(N, D) float32 -> N little-endian float32 byte strings."""
    array = gradients.detach().cpu().float().numpy().astype("<f4")
    return pl.Series([row.tobytes() for row in array], dtype=pl.Binary)


def binary_to_gradients(column: pl.Series) -> torch.Tensor:
    """N float32 byte strings of equal length -> (N, D) float32 tensor."""
    if len(column) == 0:
        return torch.zeros(0, 0)
    joined = b"".join(column.to_list())
    return torch.from_numpy(np.frombuffer(joined, dtype="<f4").reshape(len(column), -1).copy())


def tensors_to_frame(tensors: dict[str, torch.Tensor], **constant_columns: str) -> pl.DataFrame:
    """name -> tensor map -> rows (name, shape, dtype, data) plus constant columns."""
    names = sorted(tensors)
    frame = pl.DataFrame(
        {
            "name": names,
            "shape": [list(tensors[n].shape) for n in names],
            "dtype": [str(tensors[n].dtype).removeprefix("torch.") for n in names],
            "data": pl.Series([tensors[n].contiguous().numpy().tobytes() for n in names], dtype=pl.Binary),
        },
        schema_overrides={"shape": pl.List(pl.Int64)},
    )
    return frame.with_columns(pl.lit(v).alias(k) for k, v in constant_columns.items())


def frame_to_tensors(frame: pl.DataFrame) -> dict[str, torch.Tensor]:
    """Inverse of `tensors_to_frame` for one group of rows."""
    out = {}
    for name, shape, dtype, data in frame.select("name", "shape", "dtype", "data").iter_rows():
        array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
        out[name] = torch.from_numpy(array.copy())
    return out


def content_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
