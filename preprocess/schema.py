"""The data contract: Arrow schemas, tensor column helpers, and reading complete datasets.

Tensors are stored as Arrow fixed-shape tensor extension columns (row-major, one tensor per row),
which pyarrow, duckdb and polars all read (as fixed-size lists/arrays where they lack the type).
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from coarse2fine.preprocess.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
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


def decode_image(png: bytes) -> np.ndarray:
    """Image bytes (an ``images.image`` PNG cell, or any Pillow format) as float32 RGB (3, H, W) in [0, 1]."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return a.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


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


COLUMN_DOCS: dict[str, str] = {
    "key": "sha256 of the normalised RGB pixels (preprocess/images.py); the join key of every dataset",
    "source_uri": "the input it was read from",
    "split": "'train' or 'validation', a deterministic function of key (data.validation_fraction)",
    "width": "source width in px, before resize and centre crop",
    "height": "source height in px, before resize and centre crop",
    "label": "class id: an index into this manifest's `classes` (null = unlabelled)",
    "image": "PNG, RGB 8-bit, data.resolution x data.resolution",
    "stage": "the stage that rejected the input",
    "error": "error class (e.g. UnidentifiedImageError, TooSmall, DecompressionBombError)",
    "detail": "the error in words",
    "wavelet": "'haar' (pywavelets' orthonormal Haar)",
    "levels": "DWT levels L",
    "scale_0": "approximation after L levels, (3, r/2^L, r/2^L), of the image in [0, 1]: values in [0, 2^L]",
    r"scale_(\d+)": "scale s (1..L, coarse to fine) = level L-s+1's detail bands H, V, D stacked as 9 channels "
                    "(H's R, G, B, then V's, then D's), (9, r/2^(L-s+1), r/2^(L-s+1)); level l's values in "
                    "[-2^(l-1), 2^(l-1)]",
    "order": "decomposition order n (layers peeled off)",
    "alpha": "AT data-fidelity weight (CART seed, section 4)",
    "lambda_": "AT edge-penalty weight",
    "epsilon": "AT edge width in px",
    "base": "B_n, the base after n smoothings, (3, r, r), values about [0, 1]",
    r"detail_(\d+)": "D_k = B_(k-1) - B_k (B_0 = the image), (3, r, r), signed; image = base + sum of details",
    r"edge_(\d+)": "AT edge indicator of the k-th smoothing, (r, r), in [0, 1] (1 = edge)",
    r"iterations_(\d+)": "CG iterations of the k-th smoothing",
    r"residual_(\d+)": "final relative residual of the k-th smoothing",
    r"edge_fraction_(\d+)": "share of pixels with edge value above 0.5 in the k-th smoothing",
    r"tv_reduction_(\d+)": "total variation of B_k relative to B_(k-1)",
    r"(ids(_\d+)?|base_\d+|detail_\d+_\d+)": "token ids (int32) in [0, vocab); shape, vocab and role of each "
                                                "column in config.layout",
    "mean": "latent posterior mean (float16, C x h x w; multiply by config.layout's scale for unit variance)",
    "logvar": "latent posterior log-variance (float16, C x h x w)",
}
"""What each column holds (value ranges, band order); a manifest's ``columns`` (:func:`column_docs`).
Keys are exact names or regular expressions over numbered names."""


def column_docs(table_schema: pa.Schema) -> dict[str, str]:
    """The :data:`COLUMN_DOCS` entry of every column of ``table_schema`` (exact name first)."""
    import re

    docs = {}
    for name in table_schema.names:
        doc = COLUMN_DOCS.get(name) or next((d for k, d in COLUMN_DOCS.items() if re.fullmatch(k, name)), None)
        assert doc is not None, f"column {name} has no entry in COLUMN_DOCS"
        docs[name] = doc
    return docs


TOKENS_LAYOUT_VERSION = 2  # v1 (no layout: equal square int32 grids per scale) is rebuilt, see README
TOKEN_ROLES = ("scale", "channel", "base", "detail", "latent")


@dataclass(frozen=True)
class TokenColumn:
    """One token column of a ``tokens`` dataset: per-row tensor ``shape`` and ``dtype`` (``int32``
    code ids with ``vocab`` codes, or ``float16`` continuous latents with ``vocab`` 0), and its
    ``role`` in the method's sequence (a SIT scale, a CQ channel set, a CART base or detail map, a
    FAR latent). CART names its detail maps ``detail_{k}_{j}`` (detail D_k, residual map j)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    vocab: int
    role: str
    code_dim: int = 0  # dimension of the code vectors behind the ids, when a generator embeds them (CART, as VAR)
    scale: float = 1.0  # latents: the factor that brings posterior samples to unit scale (MAR's 0.2325)

    def __post_init__(self) -> None:
        assert self.role in TOKEN_ROLES, f"unknown token role {self.role!r}"
        assert self.dtype in ("int32", "float16"), f"token dtype must be int32 or float16, not {self.dtype}"
        assert (self.vocab > 0) == (self.dtype == "int32"), "int32 ids need a vocabulary, float latents none"
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def size(self) -> int:
        """Tokens (ids) or values (latents) per row."""
        return int(np.prod(self.shape))


def layout_to_json(layout: list[TokenColumn]) -> list[dict]:
    return [asdict(c) | {"shape": list(c.shape)} for c in layout]


def layout_from_manifest(manifest: dict, uri: str) -> list[TokenColumn]:
    """The token layout a ``tokens`` manifest records (a v1 dataset has none: rebuild it)."""
    layout = manifest.get("config", {}).get("layout")
    if layout is None:
        raise IncompleteDatasetError(f"{uri} is a tokens dataset without a layout (schema v1): re-run "
                                     "`c2f tokenize` (or the flow), which writes a v2 dataset beside it")
    return [TokenColumn(**c) for c in layout]


def tokens_schema(layout: list[TokenColumn]) -> pa.Schema:
    """``tokens/…``: one tensor column per layout column (ids or latents), plus ``key``, ``label``
    and ``split`` copied from ``images`` (generators train on ``train`` only)."""
    fields = [("key", pa.string()), ("label", pa.int32()), ("split", pa.string())]
    fields += [(c.name, tensor_type(c.shape, c.dtype)) for c in layout]
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


# ---------------------------------------------------------------- reading (manifest = done marker)


class IncompleteDatasetError(UserError, RuntimeError):
    """Raised when reading a dataset that has no manifest (never finished, or still being written)."""


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a URI or local path."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol (``gs://b/x`` + ``y`` → ``gs://b/x/y``)."""
    return posixpath.join(uri.rstrip("/"), *parts)


def read_manifest(uri: str) -> dict | None:
    """The manifest of a dataset, or None when it is incomplete or absent."""
    fs, path = url_to_fs(uri)
    mpath = posixpath.join(path, MANIFEST)
    if not fs.exists(mpath):
        return None
    with fs.open(mpath, "rb") as f:
        return json.loads(f.read())


def shard_uris(uri: str) -> list[str]:
    """URIs of the shards a complete dataset lists; raises if the dataset is incomplete."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise IncompleteDatasetError(f"{uri} has no {MANIFEST}: it is incomplete and must be rebuilt")
    return [join(uri, s["name"]) for s in manifest["shards"]]


def read_shard(shard_uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = url_to_fs(shard_uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a complete dataset (only the shards its manifest lists)."""
    tables = [read_shard(u, columns) for u in shard_uris(uri)]
    if not tables:
        raise IncompleteDatasetError(f"{uri} lists no shards")
    return pa.concat_tables(tables)
