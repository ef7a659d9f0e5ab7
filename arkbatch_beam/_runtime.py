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
import atexit
import concurrent.futures
import functools
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ._client import ArkClient, ClientStats
from ._config import ClientConfig
from ._errors import RuntimeDied
from ._progress import JobProgress, Tally, combine
from ._types import ChatRequest, ChatResult

log = logging.getLogger("arkbatch_beam")

BatchSink = Callable[[list[tuple[Any, ChatResult]]], None]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The runtime's event loop: uvloop's when it is installed (the ``fast`` extra; about 20 %
    less CPU per request measured, and far less memory per TLS connection), else asyncio's.
    ``ARKBATCH_UVLOOP=0`` keeps asyncio's.

    Example:
        >>> loop = new_event_loop()
        >>> loop.run_until_complete(asyncio.sleep(0, "ran"))
        'ran'
        >>> loop.close()
    """
    if os.environ.get("ARKBATCH_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class SharedRuntime:
    """A daemon thread running an asyncio loop that owns one :class:`ArkClient`.

    Other threads talk to it only through thread-safe hand-overs (``call_soon_threadsafe``)
    and read only :attr:`stats`, a frozen snapshot the loop thread publishes (after each
    batch of results, and every ``STATS_SECONDS``). Every ``STATS_SECONDS`` and when it closes
    it also publishes that snapshot and a copy of its :class:`~arkbatch_beam._progress.Tally`
    (tokens, failures by type, ...) to the job's :class:`JobProgress`, which the progress bar,
    the launcher's ``summary.json`` and the progress line read.
    """

    STATS_SECONDS = 0.25
    _serial = itertools.count(1)

    def __init__(self, config: ClientConfig, rate_limiter: Any = None) -> None:
        self.config = config
        # Its key in a JobProgress: unique for the process's life (an id() is reused once a
        # closed runtime is collected, and a new one would overwrite the old one's totals).
        self.serial = next(SharedRuntime._serial)
        self.client = ArkClient(config, rate_limiter=rate_limiter)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="arkbatch-runtime", daemon=True)
        self._thread.start()
        self._reported: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.stats = ClientStats()
        self._tally = Tally()  # loop thread only; copies go to the job's JobProgress
        # The job whose totals the progress line shows (the last one attached in this process).
        self.progress: JobProgress | None = None
        # Results for batch sinks, handed over once per loop iteration (one thread hop per batch).
        self._ready: dict[Any, tuple[BatchSink, list[tuple[Any, ChatResult]]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._stats_handle: asyncio.TimerHandle | None = None
        try:
            asyncio.run_coroutine_threadsafe(self.client.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self._progress = _Progress(self) if config.progress_seconds else None
        self._loop.call_soon_threadsafe(self._start_timers)

    def __repr__(self) -> str:
        return f"SharedRuntime({self.client!r})"

    def _run_loop(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException:  # noqa: BLE001 - the thread ends; waiting bundles notice via alive
            log.exception("arkbatch runtime: the event loop thread died")

    def _start_timers(self) -> None:
        if self._progress is not None:
            self._progress.schedule()
        self._publish_tick()

    def _publish_tick(self) -> None:
        self._publish()
        self._publish_progress()
        self._stats_handle = self._loop.call_later(self.STATS_SECONDS, self._publish_tick)

    def _publish(self) -> None:
        self.stats = self.client.stats()  # one reference assignment: atomic for readers

    def _publish_progress(self) -> None:
        progress = self.progress
        if progress is not None:
            progress.publish(self.serial, self.stats, self._tally.copy())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (runs in its own thread)."""
        return self._loop

    @property
    def alive(self) -> bool:
        """True while the loop thread runs (any thread may ask)."""
        return not self._closed and self._thread.is_alive() and self._loop.is_running()

    @property
    def fatal(self) -> str | None:
        """A message when the endpoint rejected every request so far (wrong key or id)."""
        return self.stats.fatal

    def check_alive(self) -> None:
        """Raise :class:`RuntimeDied` when the loop thread is gone (and forget this runtime)."""
        if not self.alive:
            _forget(self)
            self.close(timeout=1.0)  # free what a dead loop can free (its thread is gone)
            raise RuntimeDied(
                "the arkbatch runtime's event-loop thread is not running (it died or was closed); "
                "the bundle fails so that the runner retries it on a fresh runtime"
            )

    def submit(self, request: ChatRequest) -> concurrent.futures.Future[ChatResult]:
        """Schedule one request; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(self.client.complete(request), self._loop)

    def submit_batch(
        self, items: Iterable[tuple[ChatRequest, Any]], sink: BatchSink, owner: Hashable | None = None
    ) -> None:
        """Schedule many requests with one thread hop; ``sink(results)`` gets lists of ``(tag, result)``.

        Every result completed in one loop iteration goes out in one call (one thread hop per
        batch of results, not per result). ``sink`` runs in the loop thread; it must be quick
        and thread-safe (a ``queue.SimpleQueue.put`` is the intended use). ``owner`` (e.g. a
        bundle) groups the requests for :meth:`cancel`.
        """
        self._loop.call_soon_threadsafe(self._submit, list(items), sink, owner)

    def cancel(self, owner: Hashable) -> None:
        """Cancel ``owner``'s unfinished requests: queued ones are never sent, in-flight ones
        are aborted, and no result of theirs is delivered. Other owners are untouched."""
        if self.alive:
            self._loop.call_soon_threadsafe(self._cancel, owner)

    def _cancel(self, owner: Hashable) -> None:
        n = self.client.cancel_owner(owner)
        if n:
            log.info("arkbatch: cancelled %d unfinished request(s) of a failed or abandoned bundle", n)
        self._publish()

    def _submit(self, items: list[tuple[ChatRequest, Any]], sink: BatchSink, owner: Any) -> None:
        submit, deliver = self.client.submit, self._deliver
        for request, tag in items:
            submit(request, functools.partial(deliver, sink, tag), owner)

    def _deliver(self, sink: BatchSink, tag: Any, result: ChatResult) -> None:
        self._tally.add(result)
        entry = self._ready.get(sink)
        if entry is None:
            entry = self._ready[sink] = (sink, [])
        entry[1].append((tag, result))
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_ready)

    def _flush_ready(self) -> None:
        self._flush_handle = None
        ready, self._ready = self._ready, {}
        self._publish()
        for sink, results in ready.values():
            sink(results)

    # The ClientStats figures that Beam counters report, as whole numbers since the last take.
    COUNTED = ("paused_seconds", "throttled_seconds", "cuts", "budget_waits")

    def take_counts(self) -> dict[str, int]:
        """Whole seconds / counts of :attr:`COUNTED` since the last call, from any thread (so
        several DoFns never count the same second twice, and fractions carry over)."""
        out = {}
        with self._lock:
            for name in self.COUNTED:
                total = math.floor(getattr(self.stats, name))
                delta = total - self._reported.get(name, 0)
                if delta > 0:
                    self._reported[name] = total
                    out[name] = delta
        return out

    def in_flight(self) -> int:
        """Requests on the wire now (as of the last published snapshot)."""
        return self.stats.in_flight

    def queued(self) -> int:
        """Requests handed to the runtime and waiting for a slot or a retry (last snapshot)."""
        return self.stats.queued + self.stats.parked

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every request and task, close the client's session and stop the loop thread."""
        if self._closed:
            return
        if self._thread.is_alive() and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result(timeout)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.warning("arkbatch runtime: session did not close cleanly", exc_info=True)
        elif not self._thread.is_alive() and not self._loop.is_running() and not self._loop.is_closed():
            # The loop thread died: finish the clean-up here, on this thread, so no session,
            # connection or task is left for the garbage collector (an unraisable error there).
            try:
                self._loop.run_until_complete(self._aclose())
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.warning("arkbatch runtime: a dead runtime did not close cleanly", exc_info=True)
        self._closed = True
        self._stop_loop()

    async def _aclose(self) -> None:
        for handle in (self._stats_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        if self._progress is not None:
            self._progress.stop()
            if self.client.ok + self.client.failed:
                log.info("%s (final)", self._progress.line(final=True))
        await self.client.close()
        self._publish()
        self._publish_progress()  # the final figures (cancelled requests included)
        # Callers' complete() tasks (submit()) and anything else still on the loop: cancel
        # and await them, so nothing is destroyed while pending.
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks(self._loop) if t is not me]
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.gather(*rest, return_exceptions=True)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()


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

    def line(self, *, final: bool = False) -> str:
        """The progress line; ``final``: the rate is the whole run's average."""
        rt = self._rt
        live = rt.client.stats()  # loop thread: its own live figures, the others' published ones
        # The job's counters in this process (failure rows written without a request, i.e. bad
        # lines and duplicate ids, count as failed, as in the summary), as the bar and
        # summary.json see them.
        c = (rt.progress.counts(source=rt.serial, stats=live, tally=rt._tally) if rt.progress is not None
             else combine([(live, rt._tally)]))
        now = rt.loop.time()
        done = c.done
        t0, d0 = (self._started, 0) if final else self._last
        self._last = (now, done)
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        text = (
            f"arkbatch progress (pid {os.getpid()}): done={done} ok={c.ok} failed={c.failed} "
            f"in_flight={c.in_flight} queued={c.queued} waiting_to_retry={c.waiting_to_retry} "
            f"attempts={c.attempts} rate={rate:.1f}/s elapsed={now - self._started:.0f}s "
            f"tokens={c.tokens['total_tokens']}"
        )
        if rt.config.pacing == "adaptive" or c.cuts:
            text += f" window={c.window}/{rt.config.max_concurrency} cuts={c.cuts}"
        if c.throttled_seconds >= 1:
            text += f" throttled={c.throttled_seconds:.0f}s"
        paused = c.paused_for
        if paused > 0:
            text += f" paused (server asked; {paused:.0f}s left)"
        to_do = c.to_do
        if to_do:
            todo = max(to_do, done, 1)
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


_registry: dict[tuple[int, ClientConfig], list[Any]] = {}
_registry_lock = threading.Lock()


def acquire(config: ClientConfig, rate_limiter: Any = None) -> SharedRuntime:
    """The process's runtime for ``config``, created on first use; pair with :func:`release`.

    A runtime whose loop thread died is replaced by a fresh one. ``rate_limiter`` (a Beam
    ``RateLimiter``) is given to the runtime that is created; the first one a process passes
    is the one its runtime uses.
    """
    key = (os.getpid(), config)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is not None and not entry[0].alive:
            del _registry[key]
            entry = None
        if entry is None:
            entry = _registry[key] = [SharedRuntime(config, rate_limiter), 0]
        entry[1] += 1
        return entry[0]


def _forget(runtime: SharedRuntime) -> None:
    """Drop a dead runtime from the registry (its holders' release() then does nothing)."""
    key = (os.getpid(), runtime.config)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is not None and entry[0] is runtime:
            del _registry[key]


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


@atexit.register
def _close_all() -> None:
    """At interpreter exit, close what is still open, so no task is destroyed while pending."""
    with _registry_lock:
        entries = [e for (pid, _), e in _registry.items() if pid == os.getpid()]
        _registry.clear()
    for runtime, _ in entries:
        runtime.close(timeout=5.0)


def active_runtimes() -> int:
    """How many runtimes this process holds open (for tests and diagnostics)."""
    with _registry_lock:
        return sum(1 for pid, _ in _registry if pid == os.getpid())
