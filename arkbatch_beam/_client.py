"""The async Ark / OpenAI-compatible chat client: the one owner of concurrency and retries.

``ArkClient`` runs every request through one scheduler:

* **A pool of at most ``max_concurrency`` workers** (coroutines). A worker takes a request
  whose model's pushback gate admits it, makes *one* attempt (``_attempt.py``), and moves on.
  So at most ``max_concurrency`` attempts are ever on the wire, whatever the mix of models,
  and none waits inside aiohttp's pool (its connector has no limit of its own).
* **A retry holds no worker.** After a retryable failure the request is parked on a loop
  timer (``call_at``) for its backoff or ``Retry-After`` and re-queued when it fires.
* **Clocks are injected** (``clock``/``call_at``, default the loop's), as is the transport,
  so retry timing is tested exactly on a fake clock (``tests/test_engine.py``).
* **Every request ends in exactly one row**, unless its owner cancels it: ``ok``; the
  server's own failure (a 4xx, not retried); or the limit that ended it
  (``deadline_exceeded``: the deadline, first send + ``timeout``, or less than
  ``min_attempt_seconds`` left; ``attempts_exhausted``: ``max_attempts`` attempts failed
  without the server announcing a wait). Secrets are scrubbed from every row.
* **Owners.** Requests submitted with an ``owner`` (a bundle) can be cancelled together: queued
  and parked ones are never sent, in-flight ones are aborted, their slots freed.

Example:
    >>> import asyncio, os
    >>> from arkbatch_beam import ArkClient, ClientConfig, Endpoint, ChatRequest
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> async def main(url):
    ...     os.environ["DEMO_KEY"] = "test-key"
    ...     cfg = ClientConfig(Endpoint("ep-demo", base_url=url, api_key_env="DEMO_KEY"))
    ...     async with ArkClient(cfg) as client:
    ...         res = await client.complete(
    ...             ChatRequest("q1", {"messages": [{"role": "user", "content": "hi"}]}))
    ...     return res.status, res.content
    >>> with FakeArkServer() as server:
    ...     asyncio.run(main(server.base_url))
    ('ok', 'echo: hi')
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import orjson

from ._attempt import HttpTransport, Outcome, Transport, classify, map_transport_error
from ._config import ClientConfig
from ._errors import (
    ArkError,
    AttemptTimeout,
    Cancelled,
    DeadlineExceeded,
    InvalidResponse,
    TransportError,
)
from ._health import FATAL_AFTER, EndpointHealth
from ._pacing import NEUTRAL, OK, PermitPump, PushbackGate
from ._result import Redactor, check_output, failed, parse_completion
from ._retry import DEADLINE, EXHAUSTED, next_delay
from ._types import STATUS_OK, ChatRequest, ChatResult

__all__ = ["ArkClient", "ClientStats", "parse_completion", "FATAL_AFTER"]

log = logging.getLogger("arkbatch_beam")

Done = Callable[[ChatResult], None]

# Job states.
_QUEUED, _RUNNING, _PARKED, _DONE = 0, 1, 2, 3
# Why an in-flight attempt is aborted.
_TIMEOUT, _CANCELLED = "timeout", "cancelled"


def _resolve(fut: asyncio.Future[ChatResult], result: ChatResult) -> None:
    if not fut.done():  # the caller may have been cancelled in this very tick
        fut.set_result(result)


class _Job:
    """One request's journey through the scheduler (loop thread only)."""

    __slots__ = (
        "request", "model", "payload", "done", "owner", "state", "first_send", "deadline",
        "attempts", "counted", "invalid", "last", "rid", "timer", "worker", "abort", "cost", "sent_at",
    )

    def __init__(self, request: ChatRequest, model: str, payload: bytes, done: Done, owner: Any) -> None:
        self.request = request
        self.model = model
        self.payload = payload
        self.done = done
        self.owner = owner
        self.state = _QUEUED
        self.first_send: float | None = None
        self.deadline = float("inf")
        self.attempts = 0
        self.counted = 0  # attempts that failed without the server announcing a wait
        self.invalid = 0
        self.last: ArkError | None = None
        self.rid: str | None = None
        self.timer: Any = None  # retry timer while parked, deadline timer while re-queued
        self.worker: asyncio.Task[None] | None = None
        self.abort: str | None = None
        self.cost = 0.0  # estimated tokens, charged to a tokens-per-minute budget
        self.sent_at = 0.0  # when the current attempt started


# What a token budget charges a request before its answer says what it used: its prompt (about
# 4 bytes of JSON per token) plus the completion it allows (max_tokens, or this many).
DEFAULT_COMPLETION_ESTIMATE = 512


def estimate_tokens(body: dict[str, Any], payload_bytes: int) -> float:
    """Tokens a request may use, for ``max_tokens_per_minute`` (corrected from ``usage`` later).

    Example:
        >>> estimate_tokens({"max_tokens": 100}, 400)
        200.0
    """
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = limit if isinstance(limit, int) and limit > 0 else DEFAULT_COMPLETION_ESTIMATE
    return payload_bytes / 4.0 + completion


@dataclasses.dataclass(frozen=True, slots=True)
class ClientStats:
    """A consistent snapshot of the client's figures, safe to read from any thread.

    The loop thread builds it (:meth:`ArkClient.stats`); other threads only read the
    published object, never the client's live state.
    """

    ok: int = 0
    failed: int = 0
    attempts: int = 0
    in_flight: int = 0
    queued: int = 0
    parked: int = 0
    paused_seconds: float = 0.0
    paused_for: float = 0.0
    fatal: str | None = None
    window: int = 0  # requests the gates allow in flight now (adaptive pacing's window)
    cuts: int = 0  # times the window was cut (pushback)
    throttled_seconds: float = 0.0  # paused, waiting for a budget or a permit, or held below the cap
    budget_waits: int = 0  # admissions refused for a budget (requests/s, tokens/min)


class ArkClient:
    """The scheduler, the gates (one per model) and one transport. See the module docstring.

    Args:
        config: the client configuration.
        transport: ``async (payload, request_id) -> (status, headers, body)``; default an
            :class:`~arkbatch_beam._attempt.HttpTransport` for ``config``.
        clock: monotonic clock (default the running loop's ``time``).
        call_at: ``call_at(when, callback, *args) -> handle with .cancel()`` on ``clock``
            (default the loop's).
        wall_clock: Unix time, for ``Retry-After`` HTTP-dates (default ``time.time``).

    Use it from one event loop (the shared runtime's).
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] | None = None,
        call_at: Callable[..., Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] | None = None,
        rate_limiter: Any = None,
    ) -> None:
        self.config = config
        self.rate_limiter = rate_limiter
        self._permits: PermitPump | None = None
        self._http = HttpTransport(config) if transport is None else None
        self._transport: Transport = transport if transport is not None else self._http  # type: ignore[assignment]
        self._clock = clock
        self._call_at = call_at
        self._wall = wall_clock
        self._rand = rand or random.Random().random
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False
        self._gates: dict[str, PushbackGate] = {}
        # Requests ready to go, per model (FIFO each); models with none are not in the dict.
        self._ready: dict[str, collections.deque[_Job]] = {}
        self._n_ready = 0
        self._parked: set[_Job] = set()
        self._running: set[_Job] = set()
        self._owners: dict[Hashable, set[_Job]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._rid_prefix = uuid.uuid4().hex[:12]
        self._rid_counter = 0
        self.redactor = Redactor()
        self.health = EndpointHealth(config.endpoint.url, config.endpoint.api_key_env, self._redact)
        # Counters (loop thread; read them through stats()).
        self.attempts = 0
        self.ok = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"ArkClient(url={self.config.endpoint.url!r}, max_concurrency={self.config.max_concurrency})"

    def _redact(self, text: str | None) -> str | None:
        return self.redactor.text(text)

    # -- clocks --------------------------------------------------------------------------
    def _now(self) -> float:
        return self._clock() if self._clock is not None else self._loop.time()  # type: ignore[union-attr]

    def _at(self, when: float, callback: Callable[..., Any], *args: Any) -> Any:
        if self._call_at is not None:
            return self._call_at(when, callback, *args)
        return self._loop.call_at(when, callback, *args)  # type: ignore[union-attr]

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Read the credentials from the environment and open the session (idempotent)."""
        if self._started:
            return
        self._closing = False
        self._loop = asyncio.get_running_loop()
        if self.rate_limiter is not None and self._permits is None:
            self._permits = PermitPump(self.rate_limiter, self._loop)
        if self._http is not None:
            await self._http.start()
            self.redactor = self._http.redactor
        self._started = True

    async def close(self) -> None:
        """Stop: cancel every worker and timer, await them, close the session.

        Every request not finished yet (queued, waiting to retry, or in flight) ends with a
        ``cancelled`` row (retryable), so no caller of :meth:`complete` waits forever; nothing
        is left pending on the loop.
        """
        self._closing = True
        for gate in self._gates.values():
            gate.close()
        if self._permits is not None:
            self._permits.close()
        unfinished = [*self._parked, *self._running]
        for q in self._ready.values():
            unfinished.extend(j for j in q if j.state == _QUEUED)
        for job in unfinished:
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
        self._parked.clear()
        self._ready.clear()
        self._n_ready = 0
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._idle.clear()
        for job in unfinished:
            if job.state != _DONE:
                self._finish_cancelled(job)
        if self._http is not None:
            await self._http.close()
        self._started = False

    async def __aenter__(self) -> ArkClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- gates and figures ---------------------------------------------------------------
    def gate(self, model: str) -> PushbackGate:
        """The pushback gate for ``model`` (created on first use)."""
        g = self._gates.get(model)
        if g is None:
            gate = g = self._gates[model] = PushbackGate(
                self.config.max_concurrency,
                pacing=self.config.pacing,
                max_rate=self.config.max_requests_per_second,
                max_tokens_per_minute=self.config.max_tokens_per_minute,
                permits=self._permits,
                clock=self._clock,
                call_at=self._call_at,
                on_wake=lambda: self._kick(gate.admittable()),
            )
            if self._permits is not None:
                self._permits.listeners.append(gate.permits_arrived)
        return g

    @property
    def fatal(self) -> str | None:
        """A message when the endpoint rejected every request so far (wrong key or id)."""
        return self.health.fatal

    @property
    def paused_seconds(self) -> float:
        """Seconds all gates have spent paused so far (loop thread)."""
        return sum(g.paused_seconds for g in self._gates.values())

    def stats(self) -> ClientStats:
        """A snapshot of the figures (call in the loop thread; publish the result)."""
        now = self._now() if self._loop is not None or self._clock is not None else 0.0
        return ClientStats(
            ok=self.ok,
            failed=self.failed,
            attempts=self.attempts,
            in_flight=len(self._running),
            queued=self._n_ready,
            parked=len(self._parked),
            paused_seconds=self.paused_seconds,
            paused_for=max((g.paused_until - now for g in self._gates.values() if g.paused), default=0.0),
            fatal=self.health.fatal,
            window=min(sum(int(g.limit) for g in self._gates.values()), self.config.max_concurrency)
            if self._gates else self.config.max_concurrency,
            cuts=sum(g.cuts for g in self._gates.values()),
            throttled_seconds=sum(g.throttled_so_far() for g in self._gates.values())
            + (self._permits.waited_seconds if self._permits is not None else 0.0),
            budget_waits=sum(g.budget_waits for g in self._gates.values()),
        )

    # -- submitting ----------------------------------------------------------------------
    async def complete(self, request: ChatRequest) -> ChatResult:
        """Send one request with retries until it ends; never raises for its failures.

        Cancelling the awaiting task cancels the request (its slot comes back). When nothing
        is queued and a slot is free, the first attempt runs in the caller's own task (no hop
        to a worker); it is admitted and counted exactly like a worker's.
        """
        if not self._started:
            await self.start()
        fut: asyncio.Future[ChatResult] = self._loop.create_future()  # type: ignore[union-attr]
        job = self._new_job(request, functools.partial(_resolve, fut), None)
        try:
            if job is not None:
                ticket = None
                if not self._n_ready and len(self._running) < self.config.max_concurrency and not self._closing:
                    gate = self._gates.get(job.model) or self.gate(job.model)
                    ticket = gate.try_acquire(job.cost)
                if ticket is None:
                    self._enqueue(job)
                else:
                    await self._attempt(job, gate, ticket, asyncio.current_task())  # type: ignore[arg-type]
            return fut.result() if fut.done() else await fut
        except asyncio.CancelledError:
            if job is not None:
                self._cancel((job,))
            raise

    def submit(self, request: ChatRequest, done: Done, owner: Hashable | None = None) -> _Job | None:
        """Queue ``request``; ``done(result)`` is called once, in the loop, when it ends.

        Must be called in the loop thread after :meth:`start`. ``owner`` groups requests
        for :meth:`cancel_owner`. Returns the request's handle (``None`` when it failed at once).
        """
        job = self._new_job(request, done, owner)
        if job is not None:
            self._enqueue(job)
        return job

    def _new_job(self, request: ChatRequest, done: Done, owner: Hashable | None) -> _Job | None:
        try:
            model, payload = self._prepare(request)
        except (ValueError, TypeError, orjson.JSONEncodeError) as exc:
            self.failed += 1
            done(self.redactor.result(ChatResult.failure(
                request.custom_id, "invalid_request", str(exc), request_json=request.raw)))
            return None
        job = _Job(request, model, payload, done, owner)
        if self.config.max_tokens_per_minute is not None:
            job.cost = estimate_tokens(request.body, len(payload))
        if owner is not None:
            jobs = self._owners.get(owner)
            if jobs is None:
                jobs = self._owners[owner] = set()
            jobs.add(job)
        return job

    def cancel_owner(self, owner: Hashable) -> int:
        """Cancel every unfinished request of ``owner``; returns how many.

        Queued and parked requests are never sent; in-flight attempts are aborted (the
        connection is dropped) and their slots freed. No row is delivered for them.
        """
        jobs = self._owners.pop(owner, None)
        return self._cancel(jobs) if jobs else 0

    def _cancel(self, jobs: Iterable[_Job]) -> int:
        n = 0
        for job in jobs:
            if job.state == _DONE:
                continue
            n += 1
            state, job.state = job.state, _DONE
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            if state == _PARKED:
                self._parked.discard(job)
            elif state == _QUEUED:
                self._n_ready -= 1  # left in its deque; skipped when reached
            elif state == _RUNNING and job.worker is not None and job.abort is None:
                job.abort = _CANCELLED
                job.worker.cancel()
        return n

    def _prepare(self, request: ChatRequest) -> tuple[str, bytes]:
        body = request.body
        ep = self.config.endpoint
        model = body.get("model") or ep.model
        if not isinstance(model, str) or not model:
            raise ValueError("request has no model and the endpoint names none")
        if body.get("model") != model or (ep.is_batch and body.get("stream")):
            body = dict(body)
            body["model"] = model
            if ep.is_batch and body.get("stream"):
                body["stream"] = False  # streaming is not allowed on the batch path
        return model, orjson.dumps(body)

    # -- scheduling ----------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        if self._closing:  # nothing will run it: end it now rather than leave its caller waiting
            self._finish_cancelled(job)
            return
        job.state = _QUEUED
        q = self._ready.get(job.model)
        if q is None:
            q = self._ready[job.model] = collections.deque()
        q.append(job)
        self._n_ready += 1
        if job.first_send is not None:
            # A retry may wait in the queue behind a paused gate: it must still end by its
            # deadline, as if it had been given a slot too late.
            job.timer = self._at(job.deadline - self.config.min_attempt_window, self._expire_queued, job)
        self._kick()

    def _kick(self, admittable: int | None = None) -> None:
        """Wake idle workers (or start new ones) for the requests that are ready: no more than
        there are free slots (and, when a gate calls, than it can admit), so a freed slot never
        wakes a herd that goes back to sleep."""
        want = min(self._n_ready, self.config.max_concurrency - len(self._running))
        if admittable is not None:
            want = min(want, admittable)
        idle = self._idle
        while idle and want > 0:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                want -= 1
        if want > 0 and not self._closing:
            spawn = min(want, self.config.max_concurrency - len(self._workers))
            loop = self._loop
            assert loop is not None
            for _ in range(spawn):
                task = loop.create_task(self._worker())
                self._workers.add(task)

    def _pick(self) -> tuple[_Job, PushbackGate, int] | None:
        """The next request whose gate admits it now, with its ticket; round-robin over models."""
        ready = self._ready
        if not ready or len(self._running) >= self.config.max_concurrency:
            return None  # (attempts run by complete() callers count against the cap too)
        for model in (list(ready) if len(ready) > 1 else tuple(ready)):
            q = ready[model]
            while q and q[0].state != _QUEUED:
                q.popleft()  # cancelled while queued
            if not q:
                del ready[model]
                continue
            gate = self._gates.get(model) or self.gate(model)
            ticket = gate.try_acquire(q[0].cost)
            if ticket is None:
                continue
            job = q.popleft()
            self._n_ready -= 1
            if not q:
                del ready[model]
            elif len(ready) > 1:
                ready[model] = ready.pop(model)  # to the back: models take turns
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            return job, gate, ticket
        return None

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None and self._loop is not None
        try:
            while not self._closing:
                picked = self._pick()
                if picked is None:
                    fut = self._loop.create_future()
                    self._idle.append(fut)
                    await fut
                    continue
                job, gate, ticket = picked
                await self._attempt(job, gate, ticket, task)
        finally:
            self._workers.discard(task)

    def _expire_queued(self, job: _Job) -> None:
        job.timer = None
        if job.state == _QUEUED:
            job.state = _DONE  # left in its deque; skipped when reached
            self._n_ready -= 1
            self._finish_deadline(job)

    # -- one attempt and what follows ----------------------------------------------------
    async def _attempt(self, job: _Job, gate: PushbackGate, ticket: int, task: asyncio.Task[None]) -> None:
        cfg = self.config
        now = self._now()
        if job.first_send is None:
            job.first_send = now
            job.deadline = now + cfg.timeout
        elif now > job.deadline - cfg.min_attempt_window:
            gate.release(ticket, NEUTRAL)
            job.state = _DONE
            self._finish_deadline(job)
            return
        job.attempts += 1
        self.attempts += 1
        self._rid_counter += 1
        job.rid = rid = f"{self._rid_prefix}-{self._rid_counter}"
        ends = job.deadline
        if cfg.attempt_timeout is not None:
            ends = min(ends, now + cfg.attempt_timeout)
        job.state = _RUNNING
        job.sent_at = now
        job.worker = task
        job.abort = None
        self._running.add(job)
        timer = self._at(ends, self._abort_attempt, job)
        ours = False  # our own abort's cancellation was consumed here
        try:
            status, headers, body = await self._transport(job.payload, rid)
        except asyncio.CancelledError:
            if task.cancelling() == 0:
                # Nobody cancelled this task: a CancelledError from inside the HTTP client (an
                # internal future it cancelled). A transport failure, retried like one.
                outcome = Outcome(TransportError("connection cancelled inside the HTTP client"))
            elif job.abort is not None and not self._closing and task.uncancel() == 0:
                ours = True  # our abort alone (timeout or owner): this attempt ends, the task goes on
                outcome = Outcome(
                    DeadlineExceeded("deadline reached during an attempt")
                    if ends >= job.deadline else AttemptTimeout("attempt timed out")
                )
            else:  # shutdown, or a caller of complete() cancelled (maybe besides our abort)
                gate.release(ticket, NEUTRAL)
                self._slot_freed()
                raise
        except ArkError as exc:
            outcome = Outcome(exc)
        except Exception as exc:  # noqa: BLE001 - a transport we do not know: map or fail the row
            try:
                outcome = Outcome(map_transport_error(exc))
            except Exception:  # noqa: BLE001
                outcome = Outcome(ArkError(f"{type(exc).__name__}: {exc}"))
        else:
            outcome = classify(status, headers, body, self._wall())
        finally:
            timer.cancel()
            job.worker = None
            self._running.discard(job)
        if job.abort is not None and not ours and task.cancelling():
            task.uncancel()  # the transport swallowed our cancellation: do not leak it
        if job.state == _DONE:  # its owner cancelled it meanwhile
            gate.release(ticket, NEUTRAL)
        else:
            self._after(job, gate, ticket, outcome, rid)  # releases the ticket
        self._slot_freed()

    def _slot_freed(self) -> None:
        """After an attempt's ticket went back: a parked (or a new) worker may take the slot."""
        if self._n_ready:
            self._kick()

    def _abort_attempt(self, job: _Job) -> None:
        if job.state == _RUNNING and job.worker is not None and job.abort is None:
            job.abort = _TIMEOUT
            job.worker.cancel()

    def _after(self, job: _Job, gate: PushbackGate, ticket: int, outcome: Outcome, rid: str) -> None:
        result = ChatResult(job.request.custom_id, STATUS_OK, model=job.model)
        err = outcome.error
        if err is None:
            try:
                parse_completion(outcome.body, result)
            except InvalidResponse as exc:
                err = exc
        if err is None:
            gate.release(ticket, OK, latency=self._now() - job.sent_at, cost=job.cost,
                         tokens=result.total_tokens)
            self.health.note_answer()
            result.attempts = job.attempts
            result.latency_ms = (self._now() - job.first_send) * 1000.0  # type: ignore[operator]
            result.request_id = rid
            result.response_json = outcome.body.decode("utf-8", "replace")
            fmt = job.request.body.get("response_format")
            if fmt is not None:  # asked for JSON: parsed_json, or an invalid_output row (never both counts)
                check_output(result, orjson.dumps(fmt).decode())
            if result.status != STATUS_OK:
                self._deliver_failed(job, result)
                return
            self.ok += 1
            self._deliver(job, result)
            return
        # A refused or failed attempt used no tokens (a budget charged for it gets them back).
        gate.release(ticket, outcome.signal, err.retry_after, cost=job.cost, tokens=0 if job.cost else None)
        self.health.note_error(err)
        if isinstance(err, DeadlineExceeded):  # the row keeps the server's last answer, if any
            job.last = job.last or err
            job.state = _DONE
            self._finish_deadline(job)
            return
        job.last = err
        if not err.retry_after:  # no wait announced (or a wait of 0): counts against max_attempts
            job.counted += 1
        if isinstance(err, InvalidResponse):
            job.invalid += 1
        cfg = self.config
        now = self._now()
        decision = next_delay(
            job.attempts, err, now=now, deadline=job.deadline, backoff=cfg.backoff,
            rand=self._rand(), invalid_responses=job.invalid,
            max_invalid_responses=cfg.max_invalid_responses, counted_attempts=job.counted,
            max_attempts=cfg.max_attempts, min_attempt_seconds=cfg.min_attempt_window,
        )
        if not decision.give_up and self._closing:
            self._finish_cancelled(job)  # a retry that will never run
            return
        if not decision.give_up:
            job.state = _PARKED
            self._parked.add(job)
            job.timer = self._at(now + decision.delay, self._unpark, job)
            return
        job.state = _DONE
        if decision.reason == DEADLINE:
            self._finish_deadline(job)
            return
        if decision.reason == EXHAUSTED:
            message = f"gave up after {job.attempts} attempt(s) (max_attempts={cfg.max_attempts})"
            failed(result, error_type=decision.reason, last=err, attempts=job.attempts,
                   latency_s=now - job.first_send, retryable=True, message=message,  # type: ignore[operator]
                   request_id=rid)
        else:
            failed(result, error_type=err.error_type, last=err, attempts=job.attempts,
                   latency_s=now - job.first_send, retryable=err.retryable, request_id=rid)  # type: ignore[operator]
        self._deliver_failed(job, result)

    def _unpark(self, job: _Job) -> None:
        job.timer = None
        if job.state == _PARKED:
            self._parked.discard(job)
            self._enqueue(job)

    def _finish_cancelled(self, job: _Job) -> None:
        result = ChatResult.failure(
            job.request.custom_id, Cancelled.error_type, "the client closed before an answer", retryable=True,
            model=job.model, attempts=job.attempts,
        )
        self._deliver_failed(job, result)

    def _finish_deadline(self, job: _Job) -> None:
        now = self._now()
        result = ChatResult(job.request.custom_id, STATUS_OK, model=job.model)
        failed(
            result, error_type=DEADLINE, last=job.last, attempts=job.attempts,
            latency_s=now - job.first_send if job.first_send is not None else 0.0,
            retryable=True, request_id=job.rid,
            message=f"deadline of {self.config.timeout:g}s exceeded after {job.attempts} attempt(s)",
        )
        self._deliver_failed(job, result)

    def _deliver_failed(self, job: _Job, result: ChatResult) -> None:
        self.failed += 1
        if result.request_json is None:
            result.request_json = job.request.raw or job.payload.decode()
        self._deliver(job, result)

    def _deliver(self, job: _Job, result: ChatResult) -> None:
        job.state = _DONE
        if job.owner is not None:
            jobs = self._owners.get(job.owner)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self._owners[job.owner]
        self.redactor.result(result)
        try:
            job.done(result)
        except Exception:  # noqa: BLE001 - a sink that fails must not kill a worker
            log.exception("arkbatch: result callback failed for %s", self._redact(result.custom_id))

