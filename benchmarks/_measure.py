"""Measurement helpers shared by the contenders (run inside each contender's own process).

* :class:`LatencyHistogram`: constant-memory latency percentiles (log buckets, ~0.5 %
  relative resolution), so recording latencies never makes peak RSS grow with N.
* :class:`Meter`: wall clock and CPU seconds (``resource.getrusage``, every thread of this
  process) of the measured phase, and the process's peak RSS (``ru_maxrss``).
* :class:`TreeSampler`: for contenders that spread work over child processes (Ray), samples
  CPU time and RSS of the whole process tree with ``psutil``.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from typing import Any

_STEP = math.log(1.01) / 2  # bucket width in log space: ~0.5 %


class LatencyHistogram:
    """Latencies in milliseconds, kept as counts per logarithmic bucket."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, ms: float) -> None:
        b = int(math.log(max(ms, 1e-3)) / _STEP)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.n += 1

    def add_many(self, values: Any) -> None:
        for v in values:
            self.add(float(v))

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        want = max(1, math.ceil(q / 100.0 * self.n))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= want:
                return math.exp((b + 0.5) * _STEP)
        return None  # pragma: no cover

    def summary(self) -> dict[str, float | None]:
        p50, p99 = self.percentile(50), self.percentile(99)
        return {
            "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3),
        }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Meter:
    """Wall and CPU time of the measured phase: ``with Meter() as m: ...``."""

    def __enter__(self) -> Meter:
        self.cpu0 = cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.cpu0

    def figures(self, completed: int, hist: LatencyHistogram | None = None, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "completed": completed,
            "wall_s": round(self.wall, 3),
            "req_per_s": round(completed / self.wall, 1) if self.wall > 0 else 0.0,
            "cpu_s": round(self.cpu, 3),
            "cpu_us_per_req": round(self.cpu / completed * 1e6, 1) if completed else None,
            "req_per_cpu_s": round(completed / self.cpu, 1) if self.cpu > 0 else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if hist is not None:
            out.update(hist.summary())
        out.update(extra)
        return out


class TreeSampler:
    """Samples CPU seconds and summed RSS of this process and all its descendants.

    CPU of a descendant is remembered at its last sample, so a process that exits between
    samples loses at most one interval; the peak RSS is the largest *sum* seen at one instant.
    """

    def __init__(self, interval: float = 0.25) -> None:
        import psutil  # noqa: PLC0415 - optional dependency (bench extra)

        self._psutil = psutil
        self._root = psutil.Process(os.getpid())
        self._interval = interval
        self._cpu: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-sampler")

    def _procs(self) -> list[Any]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return [self._root]

    def sample(self) -> None:
        rss = 0
        for p in self._procs():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                    rss += p.memory_info().rss
            except self._psutil.Error:
                continue
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def start(self) -> TreeSampler:
        self.sample()
        self._base = dict(self._cpu)
        self._thread.start()
        return self

    def mark(self) -> None:
        """Start counting CPU from now (e.g. after start-up)."""
        self.sample()
        self._base = dict(self._cpu)

    def stop(self) -> float:
        """Stop sampling; returns CPU seconds of the tree since start()/mark()."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return sum(v - self._base.get(pid, 0.0) for pid, v in self._cpu.items())
