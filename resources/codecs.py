"""How tensors are stored in Delta rows: gradient blobs (float32 or bfloat16) and named tensors as (name, shape,
dtype, data)."""

import numpy as np
import polars as pl
import pyarrow as pa
import torch

# How a gradient blob stores its D values: numpy dtype of the raw little-endian words. bfloat16 is stored as
# its 2-byte pattern (numpy has no bfloat16): half the bytes of float32, 1.7e-3 relative score error
# (benchmarks/RESULTS_store.md). A `gradient_dtype` that is null (rows written before it existed) means float32.
GRADIENT_DTYPES = {"float32": "<f4", "bfloat16": "<i2"}


def gradients_to_binary(gradients: torch.Tensor, dtype: str = "float32") -> pl.Series:
    """(N, D) -> N little-endian byte strings of D `dtype` values (see GRADIENT_DTYPES)."""
    gradients = gradients.detach().cpu()
    if dtype == "bfloat16":
        array = gradients.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    else:
        array = gradients.float().numpy().astype(GRADIENT_DTYPES[dtype])
    return pl.Series([row.tobytes() for row in array], dtype=pl.Binary)


def binary_to_gradients(column: pl.Series, dtype: str = "float32") -> torch.Tensor:
    """N byte strings of D `dtype` values each -> (N, D) float32 tensor."""
    if len(column) == 0:
        return torch.zeros(0, 0)
    word = np.dtype(GRADIENT_DTYPES[dtype])
    array = column.to_arrow()  # one contiguous values buffer: decoded without a Python object per row
    if array.type not in (pa.binary(), pa.large_binary()):  # e.g. a binary view
        array = array.cast(pa.large_binary())
    if array.null_count:
        raise ValueError(f"{array.null_count} of {len(array)} gradient blobs are null; re-materialize them")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if array.type == pa.large_binary() else np.int32)
    offsets = offsets[array.offset : array.offset + len(array) + 1]
    widths = np.diff(offsets)
    if widths[0] % word.itemsize or (widths != widths[0]).any():
        found = sorted(set(widths.tolist()))[:5]
        raise ValueError(f"gradient blobs must all be D {dtype} values; found {found} bytes")
    values = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].view(word)
    decoded = torch.from_numpy(values.reshape(len(array), -1).copy())
    return decoded.view(torch.bfloat16).float() if dtype == "bfloat16" else decoded


def frame_gradients(frame: pl.DataFrame) -> torch.Tensor:
    """(N, D) float32 gradients of a frame's rows, in row order: `gradient` blobs decoded by the row's
    `gradient_dtype` (absent or null: float32)."""
    if "gradient_dtype" not in frame.columns:
        return binary_to_gradients(frame["gradient"])
    dtypes = frame["gradient_dtype"].fill_null("float32")
    kinds = dtypes.unique(maintain_order=True).to_list()
    if unknown := sorted(set(kinds) - set(GRADIENT_DTYPES)):
        raise ValueError(f"gradient_dtype {unknown} is not one of {list(GRADIENT_DTYPES)}")
    if len(kinds) == 1:
        return binary_to_gradients(frame["gradient"], kinds[0])
    parts = {kind: binary_to_gradients(frame["gradient"].filter(dtypes == kind), kind) for kind in kinds}
    out = torch.empty(frame.height, next(iter(parts.values())).shape[1])
    for kind, part in parts.items():
        out[torch.tensor((dtypes == kind).to_list())] = part  # boolean mask of this dtype's rows
    return out


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
