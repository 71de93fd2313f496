"""How tensors are stored in Delta rows: float32 gradient blobs and named tensors as (name, shape, dtype, data)."""

import numpy as np
import polars as pl
import pyarrow as pa
import torch


def gradients_to_binary(gradients: torch.Tensor) -> pl.Series:
    """(N, D) float32 -> N little-endian float32 byte strings."""
    array = gradients.detach().cpu().float().numpy().astype("<f4")
    return pl.Series([row.tobytes() for row in array], dtype=pl.Binary)


def binary_to_gradients(column: pl.Series) -> torch.Tensor:
    """N float32 byte strings of equal length -> (N, D) float32 tensor."""
    if len(column) == 0:
        return torch.zeros(0, 0)
    array = column.to_arrow()  # one contiguous values buffer: decoded without a Python object per row
    if array.type not in (pa.binary(), pa.large_binary()):  # e.g. a binary view
        array = array.cast(pa.large_binary())
    if array.null_count:
        raise ValueError(f"{array.null_count} of {len(array)} gradient blobs are null; re-materialize them")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if array.type == pa.large_binary() else np.int32)
    offsets = offsets[array.offset : array.offset + len(array) + 1]
    widths = np.diff(offsets)
    if widths[0] % 4 or (widths != widths[0]).any():
        raise ValueError(f"gradient blobs must all be D float32 values; found {sorted(set(widths.tolist()))[:5]} bytes")
    values = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return torch.from_numpy(values.view("<f4").reshape(len(array), -1).copy())


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
