"""The per-process shared runtime: one event-loop thread and one client per configuration.

Every DoFn instance and every bundle thread in a worker process that uses the same
:class:`ClientConfig` shares one :class:`SharedRuntime`, so ``max_concurrency`` is the cap
for the whole process (Ark's "one global client per replica"). Scaling out is the runner's
job: replicas x ``max_concurrency``.

Why a small module-level registry and not ``apache_beam.utils.shared.Shared``: ``Shared``
keeps an object alive while someone holds a strong reference, but has no close hook, so the
aiohttp session and the loop thread would be dropped without a clean shutdown; and it keys
by a tag string, where we key by the frozen config itself. The registry below is reference
counted: ``acquire`` in ``DoFn.setup``, ``release`` in ``teardown``; the last release closes
the session and stops the loop. It is keyed by process id too, so a forked child never
inherits a parent's dead thread. Nothing here is ever pickled.

Example:
    >>> import os
    >>> from arkbatch_beam import ClientConfig, Endpoint, ChatRequest
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> with FakeArkServer(api_key=None) as server:
    ...     cfg = ClientConfig(Endpoint("ep", base_url=server.base_url, api_key_env=""))
    ...     rt = acquire(cfg)
    ...     fut = rt.submit(ChatRequest("a", {"messages": [{"role": "user", "content": "x"}]}))
    ...     print(fut.result(timeout=10).content)
    ...     release(rt)
    echo: x
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ._client import ArkClient
from ._config import ClientConfig
from ._types import ChatRequest, ChatResult

log = logging.getLogger("arkbatch_beam")

Sink = Callable[[Any, ChatResult], None]
BatchSink = Callable[[list[tuple[Any, ChatResult]]], None]


class SharedRuntime:
    """A daemon thread running an asyncio loop that owns one :class:`ArkClient`."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.client = ArkClient(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="arkbatch-runtime", daemon=True
        )
        self._thread.start()
        self._paused_reported = 0.0
        self._lock = threading.Lock()
        # The worker pool (loop thread only): requests wait in ``_queue`` (FIFO) for one of at
        # most ``max_concurrency`` long-lived worker coroutines, so a request costs a deque
        # append and pop instead of a task and a gate waiter; parked workers wait in ``_idle``.
        # The gate inside ``complete`` still decides when each request may be sent.
        self._queue: collections.deque[tuple[ChatRequest, Any, Any, bool]] = collections.deque()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._workers = 0
        # A request sleeping before a retry keeps its worker: let the pool grow by one per
        # sleeper, so a 429 with a long Retry-After never idles the cap (the gate still
        # bounds what is on the wire, and back-pressure bounds the requests handed over).
        self.client.on_backoff = self._top_up
        # Results for batch sinks, handed over once per loop iteration (one thread hop per batch).
        self._ready: dict[Any, tuple[BatchSink, list[tuple[Any, ChatResult]]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        try:
            asyncio.run_coroutine_threadsafe(self.client.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self._progress = _Progress(self) if config.progress_seconds else None
        if self._progress is not None:
            self._loop.call_soon_threadsafe(self._progress.schedule)

    def __repr__(self) -> str:
        return f"SharedRuntime({self.client!r})"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (runs in its own thread)."""
        return self._loop

    @property
    def fatal(self) -> str | None:
        """A message when the endpoint rejected every request so far (wrong key or id)."""
        return self.client.fatal

    def submit(self, request: ChatRequest) -> concurrent.futures.Future[ChatResult]:
        """Schedule one request; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(self.client.complete(request), self._loop)

    def submit_many(self, items: Iterable[tuple[ChatRequest, Any]], sink: Sink) -> None:
        """Schedule many requests with one thread hop; ``sink(tag, result)`` runs per result.

        ``sink`` is called in the loop thread; it must be quick and thread-safe (a
        ``queue.SimpleQueue.put`` is the intended use).
        """
        self._loop.call_soon_threadsafe(self._enqueue, list(items), sink, False)

    def submit_batch(self, items: Iterable[tuple[ChatRequest, Any]], sink: BatchSink) -> None:
        """Like :meth:`submit_many`, but ``sink(results)`` gets lists of ``(tag, result)``.

        Every result completed in one loop iteration goes out in one call (one thread hop per
        batch of results, not per result), as soon as that iteration ends.
        """
        self._loop.call_soon_threadsafe(self._enqueue, list(items), sink, True)

    def _enqueue(self, items: list[tuple[ChatRequest, Any]], sink: Any, batch: bool) -> None:
        queue = self._queue
        for request, tag in items:
            queue.append((request, tag, sink, batch))
        idle = self._idle
        waiting = len(queue)
        while idle and waiting:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                waiting -= 1
        self._spawn(waiting)

    def _spawn(self, waiting: int) -> None:
        limit = self.config.max_concurrency + self.client.backing_off
        for _ in range(min(waiting, limit - self._workers)):
            self._workers += 1
            self._loop.create_task(self._worker())

    def _top_up(self) -> None:
        if self._queue and not self._idle:
            self._spawn(len(self._queue))

    async def _worker(self) -> None:
        queue, complete, loop = self._queue, self.client.complete, self._loop
        try:
            while True:
                while queue:
                    request, tag, sink, batch = queue.popleft()
                    try:
                        result = await complete(request)
                    except asyncio.CancelledError:
                        self._deliver(sink, batch, tag, _cancelled(request))
                        raise
                    except Exception as exc:  # noqa: BLE001 - becomes a failure row, never lost
                        result = _internal_error(request, exc)
                    self._deliver(sink, batch, tag, result)
                fut = loop.create_future()
                self._idle.append(fut)
                await fut
        finally:
            self._workers -= 1

    def _deliver(self, sink: Any, batch: bool, tag: Any, result: ChatResult) -> None:
        if not batch:
            sink(tag, result)
            return
        entry = self._ready.get(sink)
        if entry is None:
            entry = self._ready[sink] = (sink, [])
        entry[1].append((tag, result))
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_ready)

    def _flush_ready(self) -> None:
        self._flush_handle = None
        ready, self._ready = self._ready, {}
        for sink, results in ready.values():
            sink(results)

    def take_paused_seconds(self) -> float:
        """Seconds paused since the last call (so several DoFns never double-count)."""
        with self._lock:
            total = self.client.paused_seconds
            delta = total - self._paused_reported
            self._paused_reported = total
            return max(0.0, delta)

    def close(self, timeout: float = 30.0) -> None:
        """Close the client's session and stop the loop thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result(timeout)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            log.warning("arkbatch runtime: session did not close cleanly", exc_info=True)
        self._stop_loop()

    def in_flight(self) -> int:
        """Requests on the wire now (loop thread; approximate from other threads)."""
        return sum(g.in_flight for g in self.client._gates.values())

    def paused_for(self) -> float:
        """Seconds until the longest announced pause ends (0 when not paused)."""
        now = self._loop.time()
        return max((g.paused_until - now for g in self.client._gates.values() if g.paused), default=0.0)

    def queued(self) -> int:
        """Requests handed to the runtime and waiting for a worker coroutine."""
        return len(self._queue)

    async def _aclose(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            if self.client.ok + self.client.failed:
                log.info("%s (final)", self._progress.line())
        idle, self._idle = self._idle, collections.deque()
        for fut in idle:
            fut.cancel()  # parked workers end; nothing of theirs is pending
        await self.client.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


# What the caller told this process about the job (the CLI, on an in-process runner):
# how many input lines there are and how many ids a resume skipped, so the progress line
# can show a fraction and an ETA. Other processes log rates only.
_job_totals: dict[str, int] = {}


def set_expected_total(lines: int | None) -> None:
    """Tell this process's progress lines how many inputs the whole job has (``None``: unknown)."""
    if lines is None:
        _job_totals.pop("lines", None)
    else:
        _job_totals["lines"] = int(lines)
    _job_totals.pop("skipped", None)


def note_skipped(n: int) -> None:
    """Count ids that need no request (already done, duplicates) toward the progress fraction."""
    _job_totals["skipped"] = _job_totals.get("skipped", 0) + n


class _Progress:
    """One INFO line every ``progress_seconds`` per runtime, from the loop's own timer."""

    def __init__(self, rt: SharedRuntime) -> None:
        self._rt = rt
        self._interval = rt.config.progress_seconds
        self._handle: asyncio.TimerHandle | None = None
        self._started = rt.loop.time()
        self._last: tuple[float, int] = (self._started, 0)

    def schedule(self) -> None:
        self._handle = self._rt.loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def line(self) -> str:
        rt, c = self._rt, self._rt.client
        now = rt.loop.time()
        done = c.ok + c.failed
        t0, d0 = self._last
        self._last = (now, done)
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        text = (
            f"arkbatch progress (pid {os.getpid()}): done={done} ok={c.ok} failed={c.failed} "
            f"in_flight={rt.in_flight()} queued={rt.queued()} attempts={c.attempts} "
            f"rate={rate:.1f}/s elapsed={now - self._started:.0f}s"
        )
        paused = rt.paused_for()
        if paused > 0:
            text += f" paused (server asked; {paused:.0f}s left)"
        total = _job_totals.get("lines")
        if total:
            todo = max(total - _job_totals.get("skipped", 0), done, 1)
            text += f" of~{todo} ({100.0 * done / todo:.1f}%)"
            if rate > 0 and todo > done:
                text += f" eta={_duration((todo - done) / rate)}"
        return text

    def _tick(self) -> None:
        self._handle = None
        try:
            log.info("%s", self.line())
        finally:
            self.schedule()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _cancelled(request: ChatRequest) -> ChatResult:
    return ChatResult.failure(
        request.custom_id, "cancelled", "the runtime shut down before an answer",
        request_json=request.raw, retryable=True,
    )


def _internal_error(request: ChatRequest, exc: BaseException) -> ChatResult:
    return ChatResult.failure(
        request.custom_id, "internal_error", f"{type(exc).__name__}: {exc}",
        request_json=request.raw, retryable=True,
    )


_registry: dict[tuple[int, ClientConfig], list[Any]] = {}
_registry_lock = threading.Lock()


def acquire(config: ClientConfig) -> SharedRuntime:
    """The process's runtime for ``config``, created on first use; pair with :func:`release`."""
    key = (os.getpid(), config)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None:
            entry = _registry[key] = [SharedRuntime(config), 0]
        entry[1] += 1
        return entry[0]


def release(runtime: SharedRuntime) -> None:
    """Drop one reference; the last one closes the runtime."""
    key = (os.getpid(), runtime.config)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or entry[0] is not runtime:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _registry[key]
    runtime.close()


def active_runtimes() -> int:
    """How many runtimes this process holds open (for tests and diagnostics)."""
    with _registry_lock:
        return sum(1 for pid, _ in _registry if pid == os.getpid())
