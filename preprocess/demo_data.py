"""Demo dataset: seeded random crops of real photographs shipped inside scikit-image/scikit-learn.

Written as PNG files in one sub-folder per source photograph, so the pipeline ingests them like a
user's folder and the folder name serves as the class label.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from PIL import Image


def _photographs() -> dict[str, Callable[[], np.ndarray]]:
    """Loaders of the bundled photographs (RGB or grey uint8 arrays), no network access."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_image

    return {
        "astronaut": sk.astronaut,
        "chelsea": sk.chelsea,
        "coffee": sk.coffee,
        "rocket": sk.rocket,
        "hubble": sk.hubble_deep_field,
        "retina": sk.retina,
        "immunohistochemistry": sk.immunohistochemistry,
        "camera": sk.camera,
        "china": lambda: load_sample_image("china.jpg"),
        "flower": lambda: load_sample_image("flower.jpg"),
    }


def demo_crops(n: int, resolution: int, seed: int) -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(class_name, crop)``: n crops, round-robin over photos, random size and position.

    Each crop is a random square covering 25–100% of the photo's shorter side, resized to
    ``resolution`` (so crops differ in scale as well as position). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    photos = {name: load() for name, load in sorted(_photographs().items())}
    names = list(photos)
    for i in range(n):
        name = names[i % len(names)]
        a = photos[name]
        h, w = a.shape[:2]
        side = int(rng.integers(max(resolution, min(h, w) // 4), min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(a[top : top + side, left : left + side]).convert("RGB")
        yield name, crop.resize((resolution, resolution), Image.Resampling.LANCZOS)


def write_demo_folder(uri: str, n: int, resolution: int, seed: int = 0) -> None:
    """Write ``n`` crops as PNG files under ``uri`` (any fsspec URI), one sub-folder per photograph
    (= class), the layout a user's image folder has."""
    from tqdm import tqdm

    from coarse2fine.preprocess.schema import url_to_fs

    fs, root = url_to_fs(uri)
    for i, (name, crop) in enumerate(tqdm(demo_crops(n, resolution, seed), total=n, desc="demo-data", unit="img")):
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        with fs.open(f"{root}/{name}/{i:06d}.png", "wb") as f:
            crop.save(f, format="PNG")
