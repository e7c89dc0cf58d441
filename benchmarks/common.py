"""What the method benchmarks share: the demo config with overrides, its demo photos written once."""

from __future__ import annotations

from coarse2fine.pipelines.config import Config, load_config
from coarse2fine.preprocess.demo_data import write_demo_folder
from coarse2fine.preprocess.schema import url_to_fs

CONFIG = "configs/demo.yaml"
DEMO_IMAGES = 200  # the `make demo` data


def demo_config(overrides: list[str]) -> Config:
    """``configs/demo.yaml`` with ``overrides``; its demo folder is written when absent."""
    cfg = load_config(CONFIG, overrides)
    fs, path = url_to_fs(cfg.data.source)
    if not (fs.exists(path) and fs.ls(path)):
        write_demo_folder(cfg.data.source, DEMO_IMAGES, cfg.data.resolution)
    return cfg
