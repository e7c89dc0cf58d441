"""Peak memory and speed of the training loader at 1× and 10× the demo data: the streaming loader
(``train.data.ShardStream``: one shard decoded at a time) against the in-memory one it replaced
(every row of the rank decoded up front, emulated with the same decode path: ``take`` of all rows).

Each case runs in a fresh process and draws the same number of batches (``STEPS``: several
epochs of the small dataset, a few of the large one, so both reach their steady state): the growth
of its resident memory (the largest RSS sampled after every batch, minus the RSS once the row
index was built) and the time the training loop waits for each batch, decoding included, when
each step's compute is a GPU-bound ``--step-ms`` (emulated by sleeping: the CPU is free meanwhile,
as it is while a GPU step runs), so the streaming loader's background decoding can hide. Datasets come from the real ingest of the
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
STEPS = 400


def rss() -> int:
    """This process's resident memory in bytes now (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(images_uri: str, mode: str, step_ms: float) -> dict:
    """One case, in this process: peak RSS growth (MiB) over ``STEPS`` batches, and ms waited per batch."""
    from coarse2fine.train import data

    stream = data.ShardStream(data.rank_rows(images_uri, "train", 0, 1), ["image"], data.decode_images)
    base = peak = rss()
    t = time.perf_counter()
    rows = stream.take(np.arange(len(stream)))["image"] if mode == "in-memory" else None
    waited = time.perf_counter() - t
    for step in range(STEPS):
        t = time.perf_counter()
        rows[stream.indices(step, BATCH)] if rows is not None else stream.batch(step, BATCH)
        waited += time.perf_counter() - t
        time.sleep(step_ms / 1e3)  # the GPU-bound step
        peak = max(peak, rss())
    return {"rows": len(stream), "peak_growth_mib": (peak - base) / 2**20, "ms_per_batch": 1e3 * waited / STEPS,
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
    p.add_argument("--step-ms", type=float, default=0.0, help="GPU-bound compute per step (0: loader alone)")
    p.add_argument("--case", nargs=2, metavar=("URI", "MODE"), help=argparse.SUPPRESS)  # one case, in a child
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case, args.step_ms)))
        return
    print(f"| images | rows | loader | peak RSS growth (MiB) | ms waited / batch of {BATCH} (step {args.step_ms:g} ms) | "
          f"shards read |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            uri = build(os.path.join(tmp, str(n)), n, args.resolution)
            for mode in ("in-memory", "streaming"):
                out = subprocess.run([sys.executable, __file__, "--case", uri, mode, "--step-ms", str(args.step_ms)], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"| {n} at {args.resolution} px | {r['rows']} | {mode} | {r['peak_growth_mib']:.1f} | "
                      f"{r['ms_per_batch']:.1f} | {r['shards_read']} |", flush=True)


if __name__ == "__main__":
    main()
