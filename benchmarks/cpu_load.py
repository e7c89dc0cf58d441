"""Machine-load helpers for the CPU benchmarks (Linux /proc): wait for an idle machine, and
measure how much CPU other processes used while a benchmark ran.

The benchmark machine may be shared; a run is only comparable when ``other`` (busy CPU seconds of
the whole machine minus this process and its waited-for children) is small against the wall time.
"""

from __future__ import annotations

import os
import resource
import time


def _busy_idle() -> tuple[float, float]:
    """Busy and idle CPU seconds of the whole machine since boot (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / hz, idle / hz


def _own_cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def wait_idle(max_busy_cores: float = 0.15, window_s: float = 5.0, max_wait_s: float = 1800.0) -> float:
    """Block until the machine used < ``max_busy_cores`` over a ``window_s`` window; return the wait."""
    t0 = time.perf_counter()
    while True:
        b0, _ = _busy_idle()
        time.sleep(window_s)
        b1, _ = _busy_idle()
        if (b1 - b0) / window_s < max_busy_cores or time.perf_counter() - t0 > max_wait_s:
            return time.perf_counter() - t0


class Load:
    """Context manager: ``wall``, ``own`` (CPU s of this process + children), ``other`` (CPU s of
    every other process on the machine) during the block."""

    def __enter__(self) -> "Load":
        self._t, self._b, self._o = time.perf_counter(), _busy_idle()[0], _own_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t
        self.own = _own_cpu() - self._o
        self.other = max(0.0, _busy_idle()[0] - self._b - self.own)

    def __str__(self) -> str:
        return f"wall {self.wall:.1f}s, own CPU {self.own:.1f}s, other processes' CPU {self.other:.1f}s"
