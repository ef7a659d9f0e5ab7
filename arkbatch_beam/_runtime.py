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
        try:
            asyncio.run_coroutine_threadsafe(self.client.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise

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
        self._loop.call_soon_threadsafe(self._spawn, list(items), sink)

    def _spawn(self, items: list[tuple[ChatRequest, Any]], sink: Sink) -> None:
        complete = self.client.complete
        create = self._loop.create_task
        for request, tag in items:
            task = create(complete(request))
            task.add_done_callback(lambda t, tag=tag, r=request: _deliver(t, tag, r, sink))

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
            asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result(timeout)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            log.warning("arkbatch runtime: session did not close cleanly", exc_info=True)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


def _deliver(task: asyncio.Task, tag: Any, request: ChatRequest, sink: Sink) -> None:
    if task.cancelled():
        result = ChatResult.failure(
            request.custom_id, "cancelled", "the runtime shut down before an answer",
            request_json=request.raw, retryable=True,
        )
    elif task.exception() is not None:
        exc = task.exception()
        result = ChatResult.failure(
            request.custom_id, "internal_error", f"{type(exc).__name__}: {exc}",
            request_json=request.raw, retryable=True,
        )
    else:
        result = task.result()
    sink(tag, result)


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
