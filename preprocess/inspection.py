"""Look at a dataset: its schema, manifest and counts, and one row rendered as a picture."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coarse2fine.preprocess import dwt, schema
from coarse2fine.preprocess.errors import UserKeyError


def describe(uri: str) -> dict:
    """Schema, row count and manifest of a complete dataset (raises if incomplete)."""
    manifest = schema.read_manifest(uri)
    if manifest is None:
        raise schema.IncompleteDatasetError(f"{uri} has no {schema.MANIFEST}: incomplete or not a dataset")
    first = schema.read_shard(schema.shard_uris(uri)[0])
    return {"uri": uri, "schema": first.schema, "rows": manifest["rows"], "manifest": manifest}


def find_row(uri: str, key: str) -> dict:
    """The row of ``key`` (a prefix is enough when unique) as a dict; tensors as numpy arrays."""
    for shard in schema.shard_uris(uri):
        table = schema.read_shard(shard)
        hits = table.filter(pc.starts_with(table.column("key"), key))
        if hits.num_rows > 1:
            raise UserKeyError(f"key prefix {key!r} is ambiguous in {uri}")
        if hits.num_rows == 1:
            return {
                f.name: (schema.tensor_numpy(hits.column(f.name))[0]
                         if isinstance(f.type, pa.FixedShapeTensorType) else hits.column(f.name)[0].as_py())
                for f in hits.schema
            }
    raise UserKeyError(f"key {key!r} not found in {uri}")


def source_image(uri: str, key: str):
    """The stored image of ``key``: in this dataset, or in the ``images`` dataset it was made from."""
    manifest = schema.read_manifest(uri)
    images_uri = uri if manifest["stage"] == "ingest" else manifest["inputs"].get("images")
    if images_uri is None:
        return None
    return schema.decode_image(find_row(images_uri, key)["image"])


def render_row(uri: str, key: str, out_png: str, extra: list[tuple[str, np.ndarray]] = ()) -> str:
    """Render one row: the image, its DWT scales, its base/detail layers and edge maps, its token
    id maps or latents; ``extra`` panels (title, (H, W, 3) array in [0, 1]) follow the image (the
    CLI adds a tokens row's decoding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = find_row(uri, key)
    panels: list[tuple[str, object, dict]] = []
    image = source_image(uri, row["key"])
    if image is not None:
        panels.append(("image", image.transpose(1, 2, 0), {}))
    panels += [(title, array, {}) for title, array in extra]
    manifest = schema.read_manifest(uri)
    if manifest["stage"] == "tokens":
        panels += _token_panels(row, manifest["config"]["layout"])
    scales = sorted((k for k in row if k.startswith("scale_")), key=lambda k: int(k.split("_")[1]))
    if scales:
        arrays = [row[k].astype("float64") for k in scales]
        panels.append(("scale_0 (approx.)", _unit(arrays[0]).transpose(1, 2, 0), {}))
        for name, a in zip(scales[1:], arrays[1:]):
            h, v, d = (abs(b).mean(axis=0) for b in a.reshape(3, 3, *a.shape[1:]))
            panels.append((f"{name} |H|+|V|+|D|", h + v + d, {"cmap": "magma"}))
        coarse = dwt.haar_idwt([arrays[0]] + [0 * a for a in arrays[1:]])
        panels.append(("IDWT of scale_0 only", coarse.clip(0, 1).transpose(1, 2, 0), {}))
    if "base" in row:
        n = row["order"]
        panels.append((f"base B_{n}", row["base"].astype("float64").clip(0, 1).transpose(1, 2, 0), {}))
        for k in range(n, 0, -1):
            panels.append((f"detail D_{k}", _unit(row[f"detail_{k}"].astype("float64")).transpose(1, 2, 0), {}))
            panels.append((f"edges s_{k} ({row[f'edge_fraction_{k}']:.0%})", row[f"edge_{k}"], {"cmap": "gray", "vmin": 0, "vmax": 1}))
    if not panels:
        raise UserKeyError(f"nothing to render in {uri}: no image, scale or layer columns")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, img, kw) in zip(axes.ravel(), panels):
        ids = kw.pop("ids", None)
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        if ids is not None:  # small id maps carry their numbers
            for (i, j), v in np.ndenumerate(ids.filled(-1)):
                if v >= 0:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white")
    fig.suptitle(f"{row['key'][:16]}…  ({uri})", fontsize=8)
    fig.tight_layout()
    fs, path = schema.url_to_fs(out_png)
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out_png


ANNOTATE_MAX = 64
"""Id maps of at most this many tokens get each id written in its cell."""


def _token_panels(row: dict, layout: list[dict]) -> list[tuple[str, object, dict]]:
    """One panel per token column of the manifest's layout: id maps coloured by id (0 … vocab − 1;
    a 1-D column, e.g. CQ's channel tokens, folded into rows of 8 in token order), latents as their
    channel mean (``mean`` only; ``logvar`` is the posterior's spread)."""
    panels = []
    for col in layout:
        a = np.asarray(row[col["name"]])
        if col["vocab"]:
            grid = a if a.ndim == 2 else np.pad(a.ravel(), (0, -a.size % 8), constant_values=-1).reshape(-1, 8)
            grid = np.ma.masked_less(grid, 0)
            shape = "×".join(map(str, a.shape))
            kw = {"cmap": "viridis", "vmin": 0, "vmax": col["vocab"] - 1}
            if a.size <= ANNOTATE_MAX:
                kw["ids"] = grid
            panels.append((f"{col['name']} ({col['role']}, {shape}, vocab {col['vocab']})", grid, kw))
        elif col["name"] == "mean":
            m = a.astype("float64").mean(axis=0)
            panels.append((f"latent mean over {a.shape[0]} channels ({a.shape[1]}×{a.shape[2]})", m, {"cmap": "coolwarm"}))
    return panels


def _unit(a):
    """Stretch an array to [0, 1] for display (details and coefficients are signed)."""
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else a * 0
