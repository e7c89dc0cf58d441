"""Arrow schemas of the datasets (DESIGN.md, data contracts) and tensor column helpers.

Tensors are stored as Arrow fixed-shape tensor extension columns (row-major, one tensor per row),
which pyarrow, duckdb and polars all read (as fixed-size lists/arrays where they lack the type).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
WAVELET = "haar"

IMAGES = pa.schema(
    [
        ("key", pa.string()),  # sha256 of the normalised RGB pixels (see images.py)
        ("source_uri", pa.string()),
        ("split", pa.string()),  # "train" | "validation", deterministic by key
        ("width", pa.int32()),  # of the source image, before resize/crop
        ("height", pa.int32()),
        ("label", pa.int32()),  # nullable
        ("image", pa.binary()),  # PNG, RGB, data.resolution x data.resolution
    ]
)

REJECTED = pa.schema(
    [
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),  # error class, e.g. "UnidentifiedImageError", "TooSmall"
        ("detail", pa.string()),
    ]
)


def tensor_type(shape: tuple[int, ...], dtype: str) -> pa.DataType:
    """Fixed-shape tensor extension type of the given per-row shape and numpy dtype name."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), list(shape))


def spectral_schema(resolution: int, levels: int, dtype: str) -> pa.Schema:
    """``scale_0`` = approximation (3, r/2^L, r/2^L); ``scale_s`` (s=1..L, coarse to fine) = H,V,D
    detail bands of level L-s+1 stacked as 9 channels (H's 3 colours, then V's, then D's)."""
    fields = [("key", pa.string()), ("wavelet", pa.string()), ("levels", pa.int32())]
    side = resolution >> levels
    fields.append(("scale_0", tensor_type((3, side, side), dtype)))
    for s in range(1, levels + 1):
        fields.append((f"scale_{s}", tensor_type((9, side, side), dtype)))
        side *= 2
    return pa.schema(fields)


def decomposition_schema(resolution: int, order: int, dtype: str) -> pa.Schema:
    """``base`` = B_n, ``detail_k`` = D_k, ``edge_k`` = the AT edge map of the k-th smoothing,
    plus per-layer solver diagnostics (CG iterations, final relative residual, share of edge
    pixels, total-variation reduction)."""
    img = tensor_type((3, resolution, resolution), dtype)
    edge = tensor_type((resolution, resolution), dtype)
    fields = [
        ("key", pa.string()),
        ("order", pa.int32()),
        ("alpha", pa.float64()),
        ("lambda_", pa.float64()),
        ("epsilon", pa.float64()),
        ("base", img),
    ]
    fields += [(f"detail_{k}", img) for k in range(1, order + 1)]
    fields += [(f"edge_{k}", edge) for k in range(1, order + 1)]
    for name, typ in (
        ("iterations", pa.int32()),
        ("residual", pa.float64()),
        ("edge_fraction", pa.float64()),
        ("tv_reduction", pa.float64()),
    ):
        fields += [(f"{name}_{k}", typ) for k in range(1, order + 1)]
    return pa.schema(fields)


def tensor_array(arrays: list[np.ndarray], typ: pa.DataType) -> pa.ExtensionArray:
    """Pack equally shaped numpy arrays into one fixed-shape tensor column."""
    assert isinstance(typ, pa.FixedShapeTensorType), typ
    dtype = typ.value_type.to_pandas_dtype()
    size = int(np.prod(typ.shape))
    flat = np.zeros((len(arrays), size), dtype)  # (rows, prod(shape))
    for i, a in enumerate(arrays):
        assert a.shape == tuple(typ.shape), f"tensor shape {a.shape} != {tuple(typ.shape)}"
        flat[i] = np.asarray(a, dtype=dtype).ravel()
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.ExtensionArray.from_storage(typ, storage)


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column as one numpy array of shape (rows, *shape)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; tensor fields take numpy arrays."""
    cols = []
    for f in schema:
        values = [r[f.name] for r in rows]
        if isinstance(f.type, pa.FixedShapeTensorType):
            cols.append(tensor_array(values, f.type))
        else:
            cols.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)
