"""Peak memory and speed of the training loader at 1× and 10× the demo data: the streaming loader
(``train.data.ShardStream``: one shard decoded at a time) against the in-memory one it replaced
(every row of the rank decoded up front, emulated with the same decode path: ``take`` of all rows).

Each case runs in a fresh process: the growth of its resident memory over one epoch of batches
(the largest RSS sampled after every batch, minus the RSS once the row index was built) and
seconds per epoch. Datasets come from the real ingest of the
demo photographs. Usage: ``python benchmarks/bench_loader.py [--resolution 64] [--sizes 200 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

BATCH = 32  # the demo's tokenizer batch


def rss() -> int:
    """This process's resident memory in bytes now (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(images_uri: str, mode: str) -> dict:
    """One case, in this process: peak RSS growth (MiB) over one epoch, and seconds per epoch."""
    from coarse2fine.train import data

    stream = data.ShardStream(data.rank_rows(images_uri, "train", 0, 1), ["image"], data.decode_images)
    base = peak = rss()
    t = time.perf_counter()
    rows = stream.take(np.arange(len(stream)))["image"] if mode == "in-memory" else None
    for step in range(len(stream) // BATCH):
        batch = rows[stream.indices(step, BATCH)] if rows is not None else stream.batch(step, BATCH)["image"]
        batch.sum()
        peak = max(peak, rss())
    seconds = time.perf_counter() - t
    return {"rows": len(stream), "peak_growth_mib": (peak - base) / 2**20, "seconds_per_epoch": seconds,
            "shards_read": stream.shards_read}


def build(root: str, n: int, resolution: int) -> str:
    """The ``images`` dataset of ``n`` demo photographs (the real Beam ingest, demo settings)."""
    from coarse2fine.pipelines.config import load_config
    from coarse2fine.preprocess.beam_jobs import ingest
    from coarse2fine.preprocess.demo_data import write_demo_folder

    cfg = load_config("configs/demo.yaml", [f"data.source={root}/src", f"storage.root={root}/store",
                                            f"data.resolution={resolution}"])
    write_demo_folder(cfg.data.source, n, resolution)
    return ingest(cfg.data, cfg.preprocess, cfg.storage).uris["images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (demo: 64)")
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="images (demo: 200)")
    p.add_argument("--case", nargs=2, metavar=("URI", "MODE"), help=argparse.SUPPRESS)  # one case, in a child
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case)))
        return
    print(f"| images | rows | loader | peak RSS growth (MiB) | s / epoch | shards read |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            uri = build(os.path.join(tmp, str(n)), n, args.resolution)
            for mode in ("in-memory", "streaming"):
                out = subprocess.run([sys.executable, __file__, "--case", uri, mode], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"| {n} at {args.resolution} px | {r['rows']} | {mode} | {r['peak_growth_mib']:.1f} | "
                      f"{r['seconds_per_epoch']:.2f} | {r['shards_read']} |", flush=True)


if __name__ == "__main__":
    main()
