"""What a job's progress shows: one set of counters for the progress line, the terminal bar,
``summary.json`` and the report's run figures.

Two sources, one object per job (:class:`JobProgress`, no module-level totals):

* what the job knows beyond the client: how many inputs it has (the CLI counts them in the
  background), how many need no row (blank lines, ids done on an earlier run), and how many
  failure rows were written without a request (bad lines, duplicate ids), so ``failed=`` counts
  what the summary counts;
* what each runtime in this process *publishes* (:meth:`JobProgress.publish`, from its loop
  thread a few times a second and when it closes): its :class:`~arkbatch_beam.ClientStats`
  snapshot and a :class:`Tally` of the results it delivered (tokens, failures by type, HTTP
  status of each request's last answer, attempts, a latency histogram).

:meth:`JobProgress.counts` adds them up into one frozen :class:`Counts`; readers never touch a
loop's live state. :class:`~arkbatch_beam.BatchChatInference` passes the object to the steps that
skip ids and to the runtimes. It pickles by name: a DoFn running in the process that made it gets
that very object back; in another worker process it gets a fresh one of the same name (which
knows no total, so those progress lines show rates only).

Example:
    >>> import pickle
    >>> progress = JobProgress()
    >>> progress.set_total(20)
    >>> progress.add_skipped(2)
    >>> progress.add_failed(1)
    >>> pickle.loads(pickle.dumps(progress)) is progress
    True
    >>> progress.to_do(), progress.failed_before_send
    (18, 1)
    >>> c = progress.counts()
    >>> c.done, c.failed, c.to_do
    (1, 1, 18)
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

# The token kinds of a result row, in the report's order.
TOKEN_KINDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
# Latency histogram buckets: LAT_STEPS per doubling; bucket b holds latencies (ms) in
# [2 ** (b / LAT_STEPS), 2 ** ((b + 1) / LAT_STEPS)) (within 4.4 %); bucket 0 also holds < 1 ms.
LAT_STEPS = 16


class Tally:
    """What the results one runtime delivered add up to (its loop thread only; readers get a copy).

    Example:
        >>> from arkbatch_beam import ChatResult
        >>> t = Tally()
        >>> t.add(ChatResult("a", "ok", prompt_tokens=3, completion_tokens=2, total_tokens=5, attempts=2,
        ...                  latency_ms=100.0))
        >>> t.add(ChatResult.failure("b", "rejected", "no", http_status=400, attempts=1))
        >>> t.tokens[:3], t.by_type, t.by_status, sorted(t.attempts.items())
        ([3, 2, 5], {'rejected': 1}, {200: 1, 400: 1}, [(1, 1), (2, 1)])
        >>> round(latency_percentile(t.latency, 0.5))
        101
    """

    __slots__ = ("tokens", "by_type", "by_status", "attempts", "latency", "latency_max")

    def __init__(self) -> None:
        self.tokens = [0, 0, 0, 0, 0]  # TOKEN_KINDS
        self.by_type: dict[str, int] = {}
        self.by_status: dict[int | None, int] = {}  # None: no HTTP answer (transport, deadline)
        self.attempts: dict[int, int] = {}
        self.latency: dict[int, int] = {}  # bucket -> answered requests (see LAT_STEPS)
        self.latency_max = 0.0

    def add(self, r: Any) -> None:
        """Count one result (a :class:`~arkbatch_beam.ChatResult`)."""
        att = self.attempts
        att[r.attempts] = att.get(r.attempts, 0) + 1
        if r.status == "ok":
            t = self.tokens
            if r.prompt_tokens:
                t[0] += r.prompt_tokens
            if r.completion_tokens:
                t[1] += r.completion_tokens
            if r.total_tokens:
                t[2] += r.total_tokens
            if r.cached_tokens:
                t[3] += r.cached_tokens
            if r.reasoning_tokens:
                t[4] += r.reasoning_tokens
            status: int | None = 200
            lat = r.latency_ms
            if lat is not None:
                b = int(math.log2(lat) * LAT_STEPS) if lat > 1.0 else 0
                self.latency[b] = self.latency.get(b, 0) + 1
                if lat > self.latency_max:
                    self.latency_max = lat
        else:
            kind = r.error_type or "unknown"
            self.by_type[kind] = self.by_type.get(kind, 0) + 1
            status = r.http_status
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def copy(self) -> Tally:
        """A copy for another thread."""
        t = Tally()
        t.tokens = list(self.tokens)
        t.by_type, t.by_status = dict(self.by_type), dict(self.by_status)
        t.attempts, t.latency = dict(self.attempts), dict(self.latency)
        t.latency_max = self.latency_max
        return t


def latency_percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (ms) of a :class:`Tally` latency histogram: its bucket's geometric middle.

    Example:
        >>> latency_percentile({0: 1}, 0.5) < 1.1, latency_percentile({}, 0.5)
        (True, None)
    """
    n = sum(histogram.values())
    if not n:
        return None
    rank = q * (n - 1)
    seen = 0
    for b in sorted(histogram):
        seen += histogram[b]
        if seen > rank:
            return float(2 ** ((b + 0.5) / LAT_STEPS))
    return float(2 ** ((max(histogram) + 0.5) / LAT_STEPS))  # pragma: no cover - rounding


def _add(into: dict[Any, int], more: Mapping[Any, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


@dataclasses.dataclass(frozen=True)
class Counts:
    """One job's figures in this process, at one instant (see :meth:`JobProgress.counts`).

    ``failed`` includes the failure rows written without a request (``failed_before_send``);
    ``done`` = ``ok`` + ``failed``; ``to_do`` is the rows the job will end with, when known.
    """

    ok: int = 0
    failed: int = 0
    failed_before_send: int = 0
    attempts: int = 0
    in_flight: int = 0
    queued: int = 0
    waiting_to_retry: int = 0
    paused_seconds: float = 0.0
    paused_for: float = 0.0
    throttled_seconds: float = 0.0
    window: int = 0
    cuts: int = 0
    budget_waits: int = 0
    to_do: int | None = None
    skipped: int = 0
    runtimes: int = 0
    tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    failures_by_type: Mapping[str, int] = dataclasses.field(default_factory=dict)
    by_http_status: Mapping[str, int] = dataclasses.field(default_factory=dict)
    attempts_histogram: Mapping[str, int] = dataclasses.field(default_factory=dict)
    latency: Mapping[int, int] = dataclasses.field(default_factory=dict)
    latency_max: float = 0.0

    @property
    def done(self) -> int:
        """Rows this run has produced: ok + failed (failure rows without a request included)."""
        return self.ok + self.failed

    @property
    def requests(self) -> int:
        """Requests that ended (one row each): ok + failed, without the rows never sent."""
        return self.ok + self.failed - self.failed_before_send

    @property
    def retries(self) -> int:
        """Attempts beyond the first of the requests that ended (the ``retries`` metric)."""
        return sum((int(a) - 1) * n for a, n in self.attempts_histogram.items() if int(a) > 1)

    def latency_ms(self) -> dict[str, float | None]:
        """p50/p90/p99/max (ms) of the answered requests (histogram buckets: within 4.4 %)."""
        out = {f"p{round(q * 100)}": latency_percentile(self.latency, q) for q in (0.5, 0.9, 0.99)}
        out = {k: None if v is None else round(v, 1) for k, v in out.items()}
        out["max"] = round(self.latency_max, 1) if self.latency else None
        return out


class JobProgress:
    """Inputs expected, ids skipped, and what the runtimes published, for one job (thread-safe)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or uuid.uuid4().hex
        self._lock = threading.Lock()
        self._total: int | None = None
        self._skipped = 0
        self.failed_before_send = 0
        self._published: dict[int, tuple[Any, Tally]] = {}
        self.started = time.monotonic()
        with _by_name_lock:
            _by_name.setdefault(self.name, self)

    def set_total(self, lines: int | None) -> None:
        """How many inputs the whole job has (``None``: unknown)."""
        with self._lock:
            self._total = None if lines is None else int(lines)

    def add_skipped(self, n: int) -> None:
        """``n`` inputs that need no row (blank lines, ids already done): off the total."""
        with self._lock:
            self._skipped += n

    def add_failed(self, n: int) -> None:
        """``n`` failure rows written without a request (a bad line, a duplicate id)."""
        with self._lock:
            self.failed_before_send += n

    def total(self) -> int | None:
        """The inputs the whole job has, as set (``None``: not known yet)."""
        with self._lock:
            return self._total

    def to_do(self) -> int | None:
        """Inputs that end in a row (``None`` when the total is not known here)."""
        with self._lock:
            return None if self._total is None else max(self._total - self._skipped, 0)

    def publish(self, source: int, stats: Any, tally: Tally) -> None:
        """A runtime's latest :class:`~arkbatch_beam.ClientStats` and a copy of its :class:`Tally`
        (``source``: the runtime's id; a later call replaces its earlier one)."""
        with self._lock:
            self._published[source] = (stats, tally)

    def counts(self, **live: Any) -> Counts:
        """Everything published so far, added up (``live``: a runtime's own fresher figures,
        ``source=id, stats=..., tally=...``, used in place of what it last published)."""
        with self._lock:
            published = dict(self._published)
            total, skipped, before = self._total, self._skipped, self.failed_before_send
        if live:
            published[live["source"]] = (live["stats"], live["tally"])
        return combine(published.values(), total=total, skipped=skipped, failed_before_send=before)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_named, (self.name,))

    def __repr__(self) -> str:
        return f"JobProgress({self.name!r})"


def combine(published: Iterable[tuple[Any, Tally]], *, total: int | None = None, skipped: int = 0,
            failed_before_send: int = 0) -> Counts:
    """Runtimes' ``(ClientStats, Tally)`` pairs and a job's own figures, added up into :class:`Counts`.

    Example:
        >>> from arkbatch_beam._client import ClientStats
        >>> c = combine([(ClientStats(ok=3, failed=1, attempts=5), Tally())], total=10, failed_before_send=1)
        >>> c.done, c.failed, c.requests, c.to_do
        (5, 2, 4, 10)
    """
    sums: dict[str, Any] = dict.fromkeys(
        ("ok", "failed", "attempts", "in_flight", "queued", "parked", "paused_seconds", "throttled_seconds",
         "window", "cuts", "budget_waits"), 0)
    paused_for = latency_max = 0.0
    tokens = [0] * len(TOKEN_KINDS)
    by_type: dict[str, int] = {}
    by_status: dict[Any, int] = {}
    attempts: dict[int, int] = {}
    latency: dict[int, int] = {}
    n = 0
    for stats, tally in published:
        n += 1
        for k in sums:
            sums[k] += getattr(stats, k)
        paused_for = max(paused_for, stats.paused_for)
        tokens = [a + b for a, b in zip(tokens, tally.tokens, strict=True)]
        _add(by_type, tally.by_type)
        _add(by_status, tally.by_status)
        _add(attempts, tally.attempts)
        _add(latency, tally.latency)
        latency_max = max(latency_max, tally.latency_max)
    return Counts(
        ok=sums["ok"], failed=sums["failed"] + failed_before_send, failed_before_send=failed_before_send,
        attempts=sums["attempts"], in_flight=sums["in_flight"], queued=sums["queued"],
        waiting_to_retry=sums["parked"], paused_seconds=sums["paused_seconds"], paused_for=paused_for,
        throttled_seconds=sums["throttled_seconds"], window=sums["window"], cuts=sums["cuts"],
        budget_waits=sums["budget_waits"],
        to_do=None if total is None else max(total - skipped, 0), skipped=skipped, runtimes=n,
        tokens=dict(zip(TOKEN_KINDS, tokens, strict=True)),
        failures_by_type=dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        by_http_status={("none" if k is None else str(k)): v
                        for k, v in sorted(by_status.items(), key=lambda kv: (-kv[1], str(kv[0])))},
        attempts_histogram={str(k): v for k, v in sorted(attempts.items())},
        latency=latency, latency_max=latency_max,
    )


_by_name: weakref.WeakValueDictionary[str, JobProgress] = weakref.WeakValueDictionary()
_by_name_lock = threading.Lock()


def _named(name: str) -> JobProgress:
    """The process's :class:`JobProgress` called ``name`` (made on first use)."""
    with _by_name_lock:
        progress = _by_name.get(name)
    if progress is None:
        made = JobProgress(name)  # registers itself, unless another thread just did
        with _by_name_lock:
            progress = _by_name.get(name, made)
    return progress
