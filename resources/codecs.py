"""How tensors are stored in Delta rows: float32 gradient blobs and named tensors as (name, shape, dtype, data)."""

import numpy as np
import polars as pl
import torch


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
