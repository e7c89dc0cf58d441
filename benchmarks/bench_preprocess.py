"""Preprocessing throughput: ingest + spectral + decomposition on the local Beam runner, 1 vs 2 workers.

    python benchmarks/bench_preprocess.py [--n 1000] [--resolution 64] [--workers 1 2] [--seed 0]

Writes n demo crops as PNG files in per-class sub-folders of a temporary folder (as ``c2f
demo-data`` does), then runs ``preprocess_all`` with ``PreprocessConfig(runner="local",
num_workers=k)`` (every other setting at its default) for each k, each into a fresh temporary
storage root, so nothing is reused. Reports per-stage seconds (``StageResult.seconds``), the total
wall time of ``preprocess_all`` (time.perf_counter), images/s and the speedup over the first worker
count. Before each run it waits for an idle machine and reports the CPU seconds used by this
process and its (waited-for) children, e.g. the Beam SDK workers, and by every other process
(cpu_load.py); a run with much "other" CPU shared the cores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from cpu_load import Load, wait_idle

from coarse2fine.preprocess.beam_jobs import preprocess_all
from coarse2fine.preprocess.config import DataConfig, PreprocessConfig, StorageConfig
from coarse2fine.preprocess.demo_data import demo_crops


def write_demo(folder: Path, n: int, resolution: int, seed: int) -> None:
    for i, (name, crop) in enumerate(demo_crops(n, resolution, seed)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        crop.save(folder / name / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="number of demo images")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-wait", type=float, default=1800.0, help="longest wait (s) for an idle machine")
    args = ap.parse_args()

    print(f"# preprocess_all, {args.n} demo images at {args.resolution}×{args.resolution}")
    print(f"python {platform.python_version()}, cpus {os.cpu_count()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')} (left as is)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="c2f-bench-") as tmp:
        src = Path(tmp) / "src"
        t = time.perf_counter()
        write_demo(src, args.n, args.resolution, args.seed)
        print(f"wrote {args.n} PNG files in {time.perf_counter() - t:.1f}s")
        data = DataConfig(source=str(src), resolution=args.resolution)
        for k in args.workers:
            pre = PreprocessConfig(runner="local", num_workers=k)
            store = StorageConfig(root=str(Path(tmp) / f"store-w{k}"))
            print(f"workers={k}: waited {wait_idle(max_wait_s=args.max_wait):.0f}s for an idle machine", flush=True)
            with Load() as load:
                results = preprocess_all(data, pre, store)
            total = load.wall
            assert not any(r.reused for r in results), "fresh storage root should not reuse anything"
            stages = {r.stage: r.seconds for r in results}
            counts = results[0].counts
            assert results[-1].rows["decomposition"] == counts["images"], (results[-1].rows, counts)
            rows.append((k, stages, total, counts["images"], load))
            print(f"workers={k}: {stages}, {load}, ingest counts {counts}", flush=True)

    base = rows[0][2]
    print()
    print(f"| workers | images | ingest s | spectral s | decomposition s | total s | images/s | speedup vs {rows[0][0]} | own CPU s | other CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, st, total, n, load in rows:
        print(f"| {k} | {n} | {st['ingest']:.1f} | {st['spectral']:.1f} | {st['decomposition']:.1f} | "
              f"{total:.1f} | {n / total:.1f} | {base / total:.2f} | {load.own:.1f} | {load.other:.1f} |")


if __name__ == "__main__":
    main()
