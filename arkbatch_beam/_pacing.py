"""The pushback gate: the in-flight cap, the adaptive window, budgets and announced pauses.

One gate per model per process (the client, ArkClient, keeps one per model). It replaces a
plain semaphore, Ark's client-side "breaker" and a hand-tuned rate flag:

* **Adaptive window (AIMD, ``pacing="adaptive"``, the default).** At most ``limit``
  requests are in flight, never above ``max_concurrency`` and never below 1. ``limit`` starts
  at a slow-start value and grows by one per accepted request (a doubling per round trip) up
  to ``ssthresh``, then by a third of a slot per round trip (``ALPHA``). A request is
  *accepted* when it comes back ``ok``, or when it has been in flight ``ACCEPT_AFTER`` seconds
  without a refusal (a server that holds requests for minutes or hours answers late, but
  refuses at once; a held one grows it by 2 in slow start, as it keeps its slot): the window
  opens as fast for held requests as for quick ones. Pushback
  (a 429, a 503, a ``Retry-After``, or latency rising well past its running baseline) cuts it
  to half, at most once per round trip (only a request admitted after the last cut can cut
  again). Several processes sharing one quota this way converge to fair shares with few
  refusals and no coordinator, the way TCP flows share a link. ``pacing="fixed"``: ``limit``
  stays at ``max_concurrency`` (only pauses and budgets hold sends back).
* **A lone refusal is not a pause.** A 429 among successes delays its own request (the client
  waits out its ``Retry-After``) and narrows the window. A *broad* refusal pauses every new
  send until the announced time (those already in flight continue), like Ark's breaker: a 503
  (overload), or refusals for most of the recent answers (3 of 4, of at least 8). A pause is
  lifted early when a request admitted after the refused one comes back ``ok`` (the server is
  evidently serving); otherwise it ends at the announced time and sending resumes from a small
  window (slow start).
* **Budgets.** ``max_rate`` (requests per second; a token bucket of 0.1 s, at least one
  token) and ``max_tokens_per_minute`` (a bucket of 10 s worth, charged an estimate per
  request at admission and corrected from ``usage`` when the answer comes: it may go into
  debt, and admits again once it is back above zero).
* **External permits.** With ``permits`` (a :class:`PermitPump`) every admission also takes
  one permit from a fleet-wide rate limiter (Beam's ``RateLimiter``, e.g. ``EnvoyRateLimiter``).

Time spent throttled (paused, waiting for a budget or a permit, or held below the cap by the
window while work waits) is summed in ``throttled_seconds``.

The gate never makes anyone wait: :meth:`PushbackGate.try_acquire` admits now or says no,
and ``on_wake`` is called whenever a refused caller may be admitted again (a slot came back,
a pause ended, a budget refilled). The client's scheduler is its only caller; it owns the
waiting. Timers use the event loop's clock (``loop.time()``/``loop.call_at``); nothing polls.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     gate = PushbackGate(2, pacing="fixed", on_wake=lambda: print("wake"))
    ...     a, b = gate.try_acquire(), gate.try_acquire()
    ...     print(gate.in_flight, gate.try_acquire())
    ...     gate.release(a, OK)
    ...     gate.release(b, OK)
    ...     print(gate.in_flight)
    >>> asyncio.run(demo())
    2 None
    wake
    0
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("arkbatch_beam")

# Outcomes reported to release().
OK = "ok"  # a completed answer: grows the window, may lift a pause
REFUSED = "refused"  # 429, or a retryable answer with Retry-After: cuts the window
OVERLOADED = "overloaded"  # 503: cuts the window; with a Retry-After, a broad refusal (pause)
NEUTRAL = "neutral"  # anything else (5xx, resets, 4xx): no signal about load

PACING_MODES = ("adaptive", "fixed")
SLOW_START = 8  # the adaptive window's first value (at most the cap)
BETA = 0.7  # a cut keeps this share of the window (as CUBIC: a shallower sawtooth than Reno's 0.5)
# Growth past ssthresh: slots per round trip. Below 1, probing for more is gentler than TCP's:
# with the small windows a shared quota leaves each replica (~5 at 100 req/s and 50 ms), one
# extra slot per round trip is refused every few round trips (measured steady refusals: 1: ~12 %,
# 0.5: ~6.5 %, 0.25: ~3.6 %, with slower convergence to fair shares as it gets smaller).
ALPHA = 1 / 3
_RECENT = 16  # outcomes remembered to tell a lone refusal from a broad one
BROAD_MIN = 8  # ... at least this many of them, and
BROAD_SHARE = 0.75  # ... at least this share refused: a broad refusal
LATENCY_SAMPLES = 32  # answers before latency can signal congestion
LATENCY_RISE = 3.0  # the recent latency this many times its baseline is pushback
MAX_SLOT_HOLD = 2.0  # the longest a refused attempt keeps its slot (seconds)
# A request in flight this long without a refusal counts as accepted for the window's growth
# (refusals come back within a round trip; an answer held by the server may take hours).
ACCEPT_AFTER = 0.5


class PushbackGate:
    """Admission control for one model in one process.

    Args:
        max_concurrency: the cap; ``limit`` never exceeds it.
        pacing: ``adaptive`` (AIMD window) or ``fixed`` (the window stays at the cap).
        loop: the event loop whose clock and timers to use (default: the running loop).
        clock: override for ``loop.time`` (tests pass a fake clock).
        call_at: override for ``loop.call_at`` (tests pass a fake scheduler).
        restart_fraction: after a pause, sending resumes at this fraction of the cap.
        max_rate: optional bound on admissions per second (a token bucket of 0.1 s, >= 1).
        max_tokens_per_minute: optional token budget (see the module docstring).
        permits: a :class:`PermitPump` (or anything with ``available``, ``take()`` and
            ``want()``): each admission also takes one of its permits.
        on_wake: called (in the loop) whenever a refused caller may now be admitted.
    """

    def __init__(
        self,
        max_concurrency: int,
        *,
        pacing: str = "adaptive",
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] | None = None,
        call_at: Callable[..., Any] | None = None,
        restart_fraction: float = 1 / 8,
        max_rate: float | None = None,
        max_tokens_per_minute: float | None = None,
        permits: Any = None,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be > 0, got {max_rate}")
        if max_tokens_per_minute is not None and not max_tokens_per_minute > 0:
            raise ValueError(f"max_tokens_per_minute must be > 0, got {max_tokens_per_minute}")
        if pacing not in PACING_MODES:
            raise ValueError(f"pacing must be one of {', '.join(PACING_MODES)}, got {pacing!r}")
        self._loop = loop
        self._clock = clock
        self._call_at = call_at
        self.max_concurrency = max_concurrency
        self.adaptive = pacing == "adaptive"
        self._restart = max(1, int(max_concurrency * restart_fraction))
        # Invariant: 1 <= limit <= max_concurrency; in_flight may exceed limit only right
        # after a cut (those requests were admitted under the old limit).
        self.limit: float = float(min(SLOW_START, max_concurrency) if self.adaptive else max_concurrency)
        self.ssthresh: float = float(max_concurrency)
        self._cut_seq = 0  # admissions up to this ticket were made before the last cut
        self.cuts = 0
        self.in_flight = 0
        self._seq = 0  # admission counter: a ticket is the seq number of its admission
        # Admissions that may still grow the window (ticket -> admitted at), oldest first: each
        # grows it once, when it comes back ok or after ACCEPT_AFTER in flight, whichever is
        # first (a request accepted while the window is at the cap grows nothing).
        self._unaccepted: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._accept_timer: Any = None
        self.on_wake = on_wake
        self._wanted = False  # a try_acquire was refused since the last wake
        # Lone or broad: the last outcomes that said something about load (True = refused).
        self._recent: collections.deque[bool] = collections.deque(maxlen=_RECENT)
        # Latency: a fast and a slow running average of clean answers' latency.
        self._lat_fast = 0.0
        self._lat_slow = 0.0
        self._lat_n = 0
        # Pause state: no admissions while now < paused_until. _hold_seq is the latest
        # ticket refused with a Retry-After in this pause; an OK for a later ticket lifts it.
        self.paused_until = 0.0
        self._hold_seq = -1
        self._timer: Any = None
        self._pause_started: float | None = None
        # Budgets: token buckets refilled lazily from the clock; _budget_timer wakes waiters
        # when the next admission is due.
        self.max_rate = max_rate
        self._burst = max(1.0, (max_rate or 0.0) / 10.0)
        self._tokens = self._burst
        self._tokens_at: float | None = None
        self.max_tokens_per_minute = max_tokens_per_minute
        self._tpm_rate = (max_tokens_per_minute or 0.0) / 60.0
        self._tpm_cap = (max_tokens_per_minute or 0.0) / 6.0  # 10 s worth
        self._tpm = self._tpm_cap
        self._tpm_at: float | None = None
        self._budget_timer: Any = None
        self._budget_at = 0.0
        self._holds: set[Any] = set()  # timers that free the slots of refused attempts
        self._permits = permits
        # Figures for metrics and tests.
        self.paused_seconds = 0.0
        self.throttled_seconds = 0.0
        self._throttled_since: float | None = None
        self.budget_waits = 0
        self.lifted_early = 0
        self.refusals = 0

    # -- clock ---------------------------------------------------------------------------
    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        """The gate's clock (the loop's monotonic time unless overridden)."""
        return self._clock() if self._clock is not None else self._get_loop().time()

    @property
    def paused(self) -> bool:
        """True while new sends are held back by an announced pause."""
        return self.paused_until > 0.0 and self.now() < self.paused_until

    # -- admission -----------------------------------------------------------------------
    def _blocked_by(self) -> str | None:
        """Why nothing can be admitted now: ``cap``, ``window``, ``held`` (refused attempts keep
        their slots), ``pause``, ``budget``, ``permit``, or ``None`` (admit)."""
        if self.in_flight >= self.limit:
            if self._holds:
                return "held"  # slots kept by refused attempts: the server is pushing back
            return "cap" if self.limit >= self.max_concurrency else "window"
        if self.paused:
            return "pause"
        if self._budget_due() > 0.0:
            return "budget"
        if self._permits is not None and self._permits.available < 1:
            return "permit"
        return None

    def _budget_due(self) -> float:
        """Seconds until the budgets allow one more admission (0: now). Refills the buckets."""
        if self.max_rate is None and self.max_tokens_per_minute is None:
            return 0.0
        now = self.now()
        due = 0.0
        if self.max_rate is not None:
            if self._tokens_at is not None:
                self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.max_rate)
            self._tokens_at = now
            if self._tokens < 1.0 - 1e-9:
                due = (1.0 - self._tokens) / self.max_rate
        if self.max_tokens_per_minute is not None:
            if self._tpm_at is not None:
                self._tpm = min(self._tpm_cap, self._tpm + (now - self._tpm_at) * self._tpm_rate)
            self._tpm_at = now
            if self._tpm < 0.0:
                due = max(due, -self._tpm / self._tpm_rate)
        return due

    def try_acquire(self, cost: float = 0.0) -> int | None:
        """Admit one request now if the gate allows it; returns its ticket or ``None``.

        ``cost`` is the request's estimated tokens (for ``max_tokens_per_minute``). After a
        ``None``, ``on_wake`` is called once the gate may admit again.
        """
        why = self._blocked_by()
        self._note_throttled(why)
        if why is None:
            return self._admit(cost)
        self._wanted = True
        if why == "budget":
            self.budget_waits += 1
            self._arm_budget_timer()
        elif why == "permit":
            self._permits.want()
        return None

    def _note_throttled(self, why: str | None) -> None:
        """Sum the time callers wait for a reason other than the cap itself."""
        throttled = why is not None and why != "cap"
        if self._throttled_since is not None and not throttled:
            self.throttled_seconds += self.now() - self._throttled_since
            self._throttled_since = None
        elif throttled and self._throttled_since is None:
            self._throttled_since = self.now()

    def throttled_so_far(self) -> float:
        """``throttled_seconds`` including a wait still going on."""
        extra = self.now() - self._throttled_since if self._throttled_since is not None else 0.0
        return self.throttled_seconds + extra

    def admittable(self) -> int:
        """How many requests the window would admit now, ignoring pauses and budgets (>= 1)."""
        return max(1, int(self.limit - self.in_flight))

    def _admit(self, cost: float) -> int:
        if self.max_rate is not None:
            self._tokens -= 1.0
        if self.max_tokens_per_minute is not None:
            self._tpm -= cost
        if self._permits is not None:
            self._permits.take()
        self.in_flight += 1
        self._seq += 1
        if self.adaptive or self.limit < self.max_concurrency:
            self._unaccepted[self._seq] = self.now()
            if self._accept_timer is None:
                self._arm_accept_timer()
        return self._seq

    def permits_arrived(self) -> None:
        """Permits came (:class:`PermitPump` calls this in the loop): wake a waiting caller."""
        self._wake()

    def _wake(self) -> None:
        if not self._wanted:
            return
        why = self._blocked_by()
        if why is None:
            self._wanted = False
            self._note_throttled(None)
            if self.on_wake is not None:
                self.on_wake()
        elif why == "budget":
            self._arm_budget_timer()
        elif why == "permit":
            self._permits.want()

    def _arm_budget_timer(self) -> None:
        """Wake a caller that waits only for a budget when it will allow an admission."""
        due = self._budget_due()
        if due <= 0.0:
            return
        # Never "now" again: float rounding may leave a bucket a hair short, and a timer due
        # at this very instant would re-arm itself forever.
        when = self.now() + max(due, 1e-6)
        if self._budget_timer is not None:
            if self._budget_at <= when:
                return
            self._budget_timer.cancel()  # the budget came back sooner (a usage correction)
        call_at = self._call_at or self._get_loop().call_at
        self._budget_at = when
        self._budget_timer = call_at(when, self._on_budget_timer)

    def _on_budget_timer(self) -> None:
        self._budget_timer = None
        self._wake()

    # -- feedback ------------------------------------------------------------------------
    def release(
        self,
        ticket: int,
        outcome: str,
        retry_after: float | None = None,
        *,
        latency: float | None = None,
        cost: float = 0.0,
        tokens: int | None = None,
    ) -> None:
        """Return a slot and report how the attempt went.

        Args:
            ticket: what :meth:`try_acquire` returned.
            outcome: ``OK``, ``REFUSED``, ``OVERLOADED`` or ``NEUTRAL``.
            retry_after: for a refusal, the seconds the server announced (if any).
            latency: for ``OK``, the attempt's seconds (the latency signal).
            cost: the estimate charged at admission; ``tokens``: what the answer's ``usage``
                says it used (the token budget is corrected by the difference).
        """
        if outcome in (REFUSED, OVERLOADED):
            self._hold_slot(retry_after)
        else:
            self.in_flight -= 1
        if tokens is not None and self.max_tokens_per_minute is not None:
            self._tpm += cost - tokens
        unaccepted = self._unaccepted.pop(ticket, None) is not None
        if outcome == OK:
            self._recent.append(False)
            if latency is not None and self._latency_rose(latency):
                self._cut(ticket)
            elif unaccepted:
                self._grow()
            if self._hold_seq >= 0 and ticket > self._hold_seq and self.paused:
                # A request sent after the refused one was served: not a pause. Reopen now.
                self.lifted_early += 1
                self._end_pause(restart=False)
        elif outcome in (REFUSED, OVERLOADED):
            self.refusals += 1
            self._recent.append(True)
            self._cut(ticket)
            if retry_after is not None and retry_after > 0 and (outcome == OVERLOADED or self._broad()):
                self._pause(ticket, retry_after)
        self._wake()

    def _grow(self, held: bool = False) -> None:
        """One request accepted: +1 below ``ssthresh`` (slow start), else ``ALPHA`` per window
        (``fixed`` grows only back to the cap after a pause's restart).

        A request still ``held`` by the server keeps its slot, where an answered one frees it
        for the next: below ``ssthresh`` it grows the window by 2, so a window of held requests
        doubles per ACCEPT_AFTER as a window of answered ones does per round trip.
        """
        if self.limit < self.ssthresh or not self.adaptive:
            step = 2.0 if held else 1.0
        else:
            step = ALPHA / self.limit
        self.limit = min(float(self.max_concurrency), self.limit + step)

    def _arm_accept_timer(self) -> None:
        call_at = self._call_at or self._get_loop().call_at
        oldest = next(iter(self._unaccepted.values()))
        # At most a few firings per ACCEPT_AFTER, however many requests age meanwhile.
        when = max(oldest + ACCEPT_AFTER, self.now() + ACCEPT_AFTER / 4)
        self._accept_timer = call_at(when, self._on_accept_timer)

    def _on_accept_timer(self) -> None:
        """Requests in flight ACCEPT_AFTER without a refusal: each grows the window once."""
        self._accept_timer = None
        due = self.now() - ACCEPT_AFTER
        pending = self._unaccepted
        grew = False
        while pending:
            ticket, admitted = next(iter(pending.items()))
            if admitted > due:
                break
            del pending[ticket]
            if self.limit < self.max_concurrency:
                self._grow(held=True)
                grew = True
        if pending:
            self._arm_accept_timer()
        if grew:  # room with no slot coming back: nobody else will wake the waiting callers
            self._wanted = True
            self._wake()

    def _hold_slot(self, retry_after: float | None) -> None:
        """A refused attempt keeps its slot for the wait the server named (or one round trip).

        A refusal comes back at once; if its slot were free at once, a queued request would
        take it at once and be refused too: the window would bound what is in flight but not
        how fast refusals come. Held, a slot sends at most once per wait or round trip.
        """
        hold = retry_after if retry_after is not None and retry_after > 0 else self._lat_fast
        hold = min(hold, MAX_SLOT_HOLD)
        if hold <= 0:
            self.in_flight -= 1
            return
        call_at = self._call_at or self._get_loop().call_at
        handle: Any = None

        def free() -> None:
            self._holds.discard(handle)
            self.in_flight -= 1
            self._wake()

        handle = call_at(self.now() + hold, free)
        self._holds.add(handle)

    def _broad(self) -> bool:
        """Whether the refusals say "everyone wait", not "you, slow down": most recent answers
        are refusals (a quota overshoot refuses only the excess, and the cut ends it)."""
        n = len(self._recent)
        return n >= BROAD_MIN and sum(self._recent) >= BROAD_SHARE * n

    def _cut(self, ticket: int) -> None:
        """Multiplicative decrease, once per round trip (the adaptive window only)."""
        if not self.adaptive or ticket <= self._cut_seq:
            return
        self.cuts += 1
        # Leaving slow start (the window doubled each round trip, so it may be up to twice what
        # the endpoint takes) halves it, as TCP does; later cuts keep BETA of it.
        beta = 0.5 if self.limit < self.ssthresh else BETA
        self.ssthresh = max(1.0, self.limit * beta)
        self.limit = self.ssthresh
        self._cut_seq = self._seq

    def _latency_rose(self, latency: float) -> bool:
        """Track the answers' latency; True when the recent average is well past the baseline."""
        self._lat_n += 1
        if self._lat_n == 1:
            self._lat_fast = self._lat_slow = latency
            return False
        self._lat_fast += 0.2 * (latency - self._lat_fast)
        self._lat_slow += 0.02 * (latency - self._lat_slow)
        return (self.adaptive and self._lat_n >= LATENCY_SAMPLES
                and self._lat_fast > LATENCY_RISE * self._lat_slow and self._lat_fast - self._lat_slow > 0.05)

    def _pause(self, ticket: int, retry_after: float) -> None:
        now = self.now()
        until = now + retry_after
        self._hold_seq = max(self._hold_seq, ticket)
        if until <= self.paused_until:
            return
        if not self.paused:
            self._pause_started = now
        self.paused_until = until
        if self._timer is not None:
            self._timer.cancel()
        call_at = self._call_at or self._get_loop().call_at
        self._timer = call_at(until, self._on_pause_timer)

    def _on_pause_timer(self) -> None:
        self._timer = None
        self._end_pause(restart=True)

    def _end_pause(self, *, restart: bool) -> None:
        now = self.now()
        if self._pause_started is not None:
            self.paused_seconds += max(0.0, min(now, self.paused_until) - self._pause_started)
        self._pause_started = None
        self.paused_until = 0.0
        self._hold_seq = -1
        self._recent.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if restart:
            # Slow start: resume from a small window (adaptive: never above what the last cut
            # found the endpoint would take); each OK adds one slot.
            restart_at: float = min(self._restart, self.max_concurrency)
            if self.adaptive:
                restart_at = max(1.0, min(restart_at, self.ssthresh))
            self.limit = float(restart_at)
            self._cut_seq = self._seq
        self._wake()

    def close(self) -> None:
        """Cancel the timers (nobody waits inside the gate)."""
        for handle in self._holds:
            handle.cancel()
        self._holds.clear()
        self._unaccepted.clear()
        for name in ("_timer", "_budget_timer", "_accept_timer"):
            handle = getattr(self, name)
            if handle is not None:
                handle.cancel()
                setattr(self, name, None)


class PermitPump:
    """Permits from a fleet-wide rate limiter, fetched on a thread of their own.

    ``limiter`` is a Beam ``apache_beam.io.components.rate_limiter.RateLimiter`` (or anything
    with ``allow() -> bool`` that blocks until a request may go, e.g. ``EnvoyRateLimiter``
    backed by an Envoy rate-limit service shared by every worker of a job). ``allow()`` is
    called on this pump's thread, one permit at a time and only while a gate wants one, never
    on the event loop; each permit is handed to the loop with ``call_soon_threadsafe`` and the
    gates are woken. The seconds spent inside ``allow()`` are throttled time.

    Example:
        >>> import asyncio
        >>> class Every(object):
        ...     def allow(self, **kw): return True
        >>> async def demo():
        ...     pump = PermitPump(Every(), asyncio.get_running_loop())
        ...     gate = PushbackGate(4, pacing="fixed", permits=pump)
        ...     pump.listeners.append(gate.permits_arrived)
        ...     first = gate.try_acquire()          # no permit yet: asks the limiter
        ...     while pump.available < 1:
        ...         await asyncio.sleep(0.001)
        ...     second = gate.try_acquire()
        ...     pump.close()
        ...     return first, second
        >>> asyncio.run(demo())
        (None, 1)
    """

    def __init__(self, limiter: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._limiter = limiter
        self._loop = loop
        self.available = 0
        self.listeners: list[Callable[[], None]] = []
        self.waited_seconds = 0.0  # inside allow(), summed (read in the loop)
        self.denied = 0
        self._wanted = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def want(self) -> None:
        """A gate needs a permit (loop thread)."""
        if self._stop:
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arkbatch-permits", daemon=True)
            self._thread.start()

    def take(self) -> None:
        """An admission used a permit (loop thread)."""
        self.available -= 1

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stop:
                return
            self._wanted.clear()
            started = time.monotonic()
            try:
                allowed = bool(self._limiter.allow())
            except Exception:  # noqa: BLE001 - the limiter's service failed: try again shortly
                log.warning("arkbatch: the rate limiter failed; asking again", exc_info=True)
                allowed = False
            waited = time.monotonic() - started
            if self._stop:
                return
            try:
                self._loop.call_soon_threadsafe(self._granted, allowed, waited)
            except RuntimeError:  # the loop is closed
                return
            if not allowed:
                time.sleep(0.1)  # a denial (its own retries exhausted): do not spin

    def _granted(self, allowed: bool, waited: float) -> None:
        self.waited_seconds += waited
        if allowed:
            self.available += 1
        else:
            self.denied += 1
        for wake in self.listeners:
            wake()  # a gate that still wants one asks again (want())

    def close(self) -> None:
        """Stop the thread (it ends after the ``allow()`` it is in, if any)."""
        self._stop = True
        self._wanted.set()
