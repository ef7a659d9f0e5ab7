"""The sliding-window inference DoFn, and the parse DoFn in front of it.

``InferDoFn.process`` hands requests to the per-process shared runtime in small batches (one
thread hop per batch, not per element) and yields results as they complete, in the window
and timestamp of their input. At most ``max_pending`` requests are outstanding per bundle:
when full, ``process`` blocks on the first to complete (back-pressure), never on a whole
batch, so one slow request never idles the other slots. ``finish_bundle`` drains the rest.

A bundle owns its requests: when it fails or is abandoned (an error here or in a fused step
after this one; the runner then tears the DoFn down, or starts another bundle on it), its
queued requests are never sent and its in-flight ones are aborted, so the runner's retry of
the bundle is the only copy that is sent and paid for.

Example:
    >>> import apache_beam as beam
    >>> from arkbatch_beam._dofn import ParseDoFn
    >>> from arkbatch_beam._inputs import InputOptions
    >>> with beam.Pipeline() as p:
    ...     _ = (p | beam.Create(["hello"]) | beam.ParDo(ParseDoFn(InputOptions()))
    ...            | beam.Map(lambda r: print(r.body["messages"][0]["content"])))
    hello
"""

from __future__ import annotations

import operator
import queue
import time
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from . import _runtime
from ._config import ClientConfig
from ._errors import EndpointUnusable
from ._inputs import InputOptions, parse_input
from ._progress import TOKEN_KINDS, JobProgress
from ._types import NAMESPACE, RESULT_FIELDS, ChatRequest, ChatResult, request_hash

# Wall-clock marks are reported as milliseconds since this instant (2020-01-01 UTC), which
# keeps a Distribution's int64 sum far from overflowing however many bundles a job has.
MARK_EPOCH = 1_577_836_800.0


def wall_mark_ms() -> int:
    """Now, as the int the ``first_send_ms`` / ``last_answer_ms`` distributions hold."""
    return int((time.time() - MARK_EPOCH) * 1000)


def _json(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()


_result_values = operator.attrgetter(*RESULT_FIELDS)


def _to_row(result: ChatResult) -> dict[str, Any]:
    """``result.to_row()``, with one C-level attribute fetch for all the columns."""
    return dict(zip(RESULT_FIELDS, _result_values(result), strict=True))


_CURRENT = object()  # _abandon(): "the bundle running now"


class ParseDoFn(beam.DoFn):
    """Input line or dict -> :class:`ChatRequest`, or a failure row (a dict).

    Both go to the one output, so one PCollection carries them on to :class:`InferDoFn`, which
    passes rows through: no ``Flatten`` is needed downstream, and runners that materialise a
    ``Flatten`` (Beam's in-process FnApiRunner does) keep inference and writing fused.
    Blank lines and bad lines' failure rows are counted on ``progress``.
    """

    def __init__(self, options: InputOptions, progress: JobProgress | None = None) -> None:
        self._options = options
        self._progress = progress

    def setup(self) -> None:
        self._bad = Metrics.counter(NAMESPACE, "bad_input")
        self._blank = Metrics.counter(NAMESPACE, "blank_lines")

    def process(self, element: Any):
        if isinstance(element, (str, bytes)) and not element.strip():
            self._blank.inc()  # blank lines carry no prompt and no id: counted, not sent
            if self._progress is not None:
                self._progress.add_skipped(1)
            return
        parsed = parse_input(element, self._options)
        if isinstance(parsed, ChatRequest):
            yield parsed
        else:
            self._bad.inc()
            if self._progress is not None:
                self._progress.add_failed(1)
            yield parsed.to_row()


class InferDoFn(beam.DoFn):
    """Requests -> result rows, answered or failed (the ``status`` column), via the shared runtime.

    Args:
        config: the client configuration (key to the per-process runtime).
        max_pending: most requests outstanding per bundle (default 2 x max_concurrency).
        handoff: how many requests to hand to the loop thread at once.
        include_request: also keep ``request_json`` on ok rows (failures always keep it).
        progress: the job's :class:`~arkbatch_beam._progress.JobProgress`, shown in this
            process's progress lines.
        rate_limiter: a Beam ``RateLimiter`` every request also asks (see ``BatchChatInference``).

    Elements that are already rows (dicts: failures found before inference) pass through.
    """

    # While waiting for results, how often to check that the runtime's loop thread still runs.
    POLL_SECONDS = 1.0

    def __init__(
        self,
        config: ClientConfig,
        *,
        max_pending: int | None = None,
        handoff: int = 64,
        include_request: bool = False,
        progress: JobProgress | None = None,
        rate_limiter: Any = None,
    ) -> None:
        self._config = config
        self._rate_limiter = rate_limiter
        self._progress = progress
        self._max_pending = max_pending or max(2 * config.max_concurrency, 2)
        self._handoff = max(1, min(handoff, self._max_pending))
        self._include_request = include_request
        self._rt: _runtime.SharedRuntime | None = None
        self._bundle: object | None = None

    def display_data(self) -> dict[str, Any]:
        return self._config.describe()

    def setup(self) -> None:
        self._acquire()
        self._requests = Metrics.counter(NAMESPACE, "requests")
        # Whole seconds / counts the runtime reports per bundle (SharedRuntime.COUNTED). Time
        # throttled is also Beam's cumulativeThrottlingSeconds, which Dataflow's autoscaler reads
        # (it does not add workers while the endpoint is the bottleneck).
        self._counted = {
            "paused_seconds": [Metrics.counter(NAMESPACE, "paused_seconds")],
            "throttled_seconds": [Metrics.counter(NAMESPACE, "throttled_seconds"),
                                  Metrics.counter(NAMESPACE, "cumulativeThrottlingSeconds")],
            "cuts": [Metrics.counter(NAMESPACE, "window_cuts")],
            "budget_waits": [Metrics.counter(NAMESPACE, "budget_waits")],
        }
        self._window = Metrics.gauge(NAMESPACE, "allowed_concurrency")
        # Row counts, summed per bundle and added to Beam's counters (made on first use) when it
        # finishes: ok, failed, retries, the TOKEN_KINDS, failed_type_<error_type>, http_<status>
        # (failures) and attempts_<n> (n > 1), for summary.json when the workers run elsewhere.
        self._counters: dict[str, Any] = {}
        self._sums: dict[str, int] = {}
        self._latency = Metrics.distribution(NAMESPACE, "latency_ms")
        # Once per bundle: min(first_send_ms) .. max(last_answer_ms) over the job is the time
        # spent sending, so the summary can tell the steady rate from start-up and shut-down.
        self._first_send = Metrics.distribution(NAMESPACE, "first_send_ms")
        self._last_answer = Metrics.distribution(NAMESPACE, "last_answer_ms")

    def start_bundle(self) -> None:
        self._abandon()  # a previous bundle that never finished: it failed; drop its requests
        if self._rt is None or not self._rt.alive:
            if self._rt is not None:
                _runtime.release(self._rt)
            self._acquire()
        self._bundle = object()
        # The runtime hands results over in lists (all those completed in one loop iteration).
        self._done: queue.SimpleQueue[list[tuple[Any, ChatResult]]] = queue.SimpleQueue()
        self._outbox: list[tuple[ChatRequest, Any]] = []
        self._outstanding = 0
        self._sums = {}
        self._sent_any = False
        self._last_answer_at = 0

    def process(
        self,
        request: ChatRequest | dict[str, Any],
        window: Any = beam.DoFn.WindowParam,
        timestamp: Any = beam.DoFn.TimestampParam,
    ):
        if isinstance(request, dict):  # a failure row from parsing or dedupe: pass it on
            yield request
            return
        bundle = self._bundle  # this generator may be closed late (GC), when another bundle runs
        try:  # (a try costs nothing in 3.11; no extra generator per element)
            self._outbox.append((request, (window, timestamp, request)))
            self._outstanding += 1
            if len(self._outbox) >= self._handoff:
                self._flush()
            # Emit whatever is finished, without waiting.
            done = self._done
            while not done.empty():
                for item in self._received(done.get_nowait()):
                    yield self._emit(*item)
            # Back-pressure: wait for the first completion when the window is full.
            while self._outstanding >= self._max_pending:
                self._flush()
                for item in self._get():
                    yield self._emit(*item)
        except BaseException:  # our error, a fused step's error (GeneratorExit), a kill
            self._abandon(bundle)
            raise

    def finish_bundle(self):
        bundle = self._bundle
        try:
            self._flush()
            while self._outstanding > 0:
                for item in self._get():
                    yield self._emit(*item)
        except BaseException:
            self._abandon(bundle)
            raise
        self._bundle = None  # every request of this bundle has its row
        for name, n in self._sums.items():
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(n)
        self._sums = {}
        if self._sent_any:
            self._last_answer.update(self._last_answer_at)
        if self._rt is not None:
            for name, n in self._rt.take_counts().items():
                for counter in self._counted[name]:
                    counter.inc(n)
            self._window.set(self._rt.stats.window)

    def teardown(self) -> None:
        self._abandon()
        if self._rt is not None:
            _runtime.release(self._rt)
            self._rt = None

    # -- internals -----------------------------------------------------------------------
    def _acquire(self) -> None:
        self._rt = _runtime.acquire(self._config, self._rate_limiter)
        if self._progress is not None:
            self._rt.progress = self._progress

    def _abandon(self, bundle: object | None = _CURRENT) -> None:
        """Cancel the unfinished requests of ``bundle`` (default: the current one), which failed
        or was abandoned. Only that bundle's: a late call for an old bundle never touches a new one."""
        if bundle is _CURRENT:
            bundle = self._bundle
        if bundle is not None and bundle is self._bundle:
            self._bundle = None
        if bundle is not None and self._rt is not None:
            self._rt.cancel(bundle)

    def _flush(self) -> None:
        if self._outbox:
            assert self._rt is not None
            self._rt.check_alive()
            self._requests.inc(len(self._outbox))
            if not self._sent_any:
                self._sent_any = True
                self._first_send.update(wall_mark_ms())
            self._rt.submit_batch(self._outbox, self._done.put, self._bundle)
            self._outbox = []

    def _get(self) -> list[tuple[Any, ChatResult]]:
        while True:
            try:
                return self._received(self._done.get(timeout=self.POLL_SECONDS))
            except queue.Empty:
                self._check_fatal()
                assert self._rt is not None
                self._rt.check_alive()

    def _received(self, items: list[tuple[Any, ChatResult]]) -> list[tuple[Any, ChatResult]]:
        # One wall-clock mark per list handed over by the loop thread, not per element.
        self._last_answer_at = wall_mark_ms()
        return items

    def _check_fatal(self) -> None:
        if self._rt is not None and self._rt.fatal:
            raise EndpointUnusable(self._rt.fatal)

    def _count(self, name: str, n: int = 1) -> None:
        self._sums[name] = self._sums.get(name, 0) + n

    def _emit(self, tag: Any, result: ChatResult) -> Any:
        self._outstanding -= 1
        window, timestamp, request = tag
        if result.ok:
            self._count("ok")
            for kind in TOKEN_KINDS:
                n = getattr(result, kind)
                if n:
                    self._count(kind, n)
            if result.latency_ms is not None:
                self._latency.update(int(result.latency_ms))
            if self._include_request:
                result.request_json = request.raw or _json(request.body)
        else:
            self._count("failed")
            self._count(f"failed_type_{result.error_type or 'unknown'}")
            if result.http_status is not None:
                self._count(f"http_{result.http_status}")
            self._check_fatal()
        if request.columns_json is not None and result.columns_json is None:  # keep_columns
            result.columns_json = request.columns_json
        if result.request_sha256 is None:  # the request this row answers (see request_hash)
            result.request_sha256 = request_hash(request.body)
        if result.attempts > 1:
            self._count("retries", result.attempts - 1)
            self._count(f"attempts_{min(result.attempts, 100)}")
        return WindowedValue(_to_row(result), timestamp, (window,))
