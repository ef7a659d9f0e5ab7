"""The pushback gate: the in-flight cap, the congestion window, and server-announced pauses.

One gate per model per process (the client, ArkClient, keeps one per model). It replaces both a plain
semaphore and Ark's client-side "breaker":

* **Cap and window.** At most ``limit`` requests are in flight; ``limit`` starts at
  ``max_concurrency`` and never exceeds it. Each success grows it by one (a doubling per
  round trip: slow start), each rate-limit refusal halves it.
* **Announced pause (the breaker).** A refusal that names a ``Retry-After`` closes the gate
  to *new* sends until that time (those already in flight continue), exactly like Ark's
  breaker. When the pause ends, sending resumes from a small window and ramps back up.
* **A lone 429 does not stall the process.** The pause above is provisional: if a request
  that was *sent after* the refused one comes back ``ok``, the server is evidently still
  serving, so the refusal was a lone rate-limit. The gate then reopens at once with a
  halved window instead of waiting out the ``Retry-After`` (the refused request itself
  still waits out its own ``Retry-After``: that is the client's job, not the gate's).
* **Optional rate bound.** With ``max_rate`` (requests per second), admissions also take a
  token from a bucket refilled at that rate that holds at most a tenth of a second's worth
  (at least one token), so in any one-second window the process starts at most
  ``1.1 x max_rate`` requests (``max_rate`` on average), however fast answers come.

The gate never makes anyone wait: :meth:`PushbackGate.try_acquire` admits now or says no,
and ``on_wake`` is called whenever a refused caller may be admitted again (a slot came back,
a pause ended, a token is due). The client's scheduler is its only caller; it owns the
waiting. Timers use the event loop's clock (``loop.time()``/``loop.call_at``); nothing polls.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     gate = PushbackGate(2, on_wake=lambda: print("wake"))
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
from collections.abc import Callable
from typing import Any

# Outcomes reported to release().
OK = "ok"  # a completed answer: grows the window, may lift a provisional pause
REFUSED = "refused"  # 429 / 503-with-Retry-After: halves the window
NEUTRAL = "neutral"  # anything else (5xx, resets, 4xx): no signal about load


class PushbackGate:
    """Admission control for one model in one process.

    Args:
        max_concurrency: the cap; ``limit`` never exceeds it.
        loop: the event loop whose clock and timers to use (default: the running loop).
        clock: override for ``loop.time`` (tests pass a fake clock).
        call_at: override for ``loop.call_at`` (tests pass a fake scheduler).
        restart_fraction: after a pause, sending resumes at this fraction of the cap.
        max_rate: optional bound on admissions per second (a token bucket of 0.1 s, >= 1).
        on_wake: called (in the loop) whenever a refused caller may now be admitted.
    """

    def __init__(
        self,
        max_concurrency: int,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] | None = None,
        call_at: Callable[..., Any] | None = None,
        restart_fraction: float = 1 / 8,
        max_rate: float | None = None,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_rate is not None and not max_rate > 0:
            raise ValueError(f"max_rate must be > 0, got {max_rate}")
        self._loop = loop
        self._clock = clock
        self._call_at = call_at
        self.max_concurrency = max_concurrency
        self._restart = max(1, int(max_concurrency * restart_fraction))
        # Invariant: 1 <= limit <= max_concurrency; in_flight may exceed limit only right
        # after a halving (those requests were admitted under the old limit).
        self.limit: float = float(max_concurrency)
        self.in_flight = 0
        self._seq = 0  # admission counter: a ticket is the seq number of its admission
        self.on_wake = on_wake
        self._wanted = False  # a try_acquire was refused since the last wake
        # Pause state: no admissions while now < paused_until. _hold_seq is the latest
        # ticket refused with a Retry-After in this pause; an OK for a later ticket lifts it.
        self.paused_until = 0.0
        self._hold_seq = -1
        self._timer: Any = None
        self._pause_started: float | None = None
        # Rate bound: a token bucket (capacity 0.1 s of tokens, at least 1), refilled
        # lazily from the clock; _rate_timer wakes waiters when the next token is due.
        self.max_rate = max_rate
        self._burst = max(1.0, (max_rate or 0.0) / 10.0)
        self._tokens = self._burst
        self._tokens_at: float | None = None
        self._rate_timer: Any = None
        # Figures for metrics and tests.
        self.paused_seconds = 0.0
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
    def _can_admit(self) -> bool:
        return (self.in_flight < self.limit and not self.paused
                and (self.max_rate is None or self._has_token()))

    def _has_token(self) -> bool:
        """Refill the bucket from the clock; True when a whole token is there (rate bound set)."""
        assert self.max_rate is not None
        now = self.now()
        if self._tokens_at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.max_rate)
        self._tokens_at = now
        return self._tokens >= 1.0 - 1e-9

    def try_acquire(self) -> int | None:
        """Admit one request now if the gate allows it; returns its ticket or ``None``.

        After a ``None``, ``on_wake`` is called once the gate may admit again.
        """
        if self._can_admit():
            return self._admit()
        self._wanted = True
        if self.max_rate is not None:
            self._arm_rate_timer()
        return None

    def admittable(self) -> int:
        """How many requests the window would admit now, ignoring pauses and tokens (>= 1)."""
        return max(1, int(self.limit - self.in_flight))

    def _admit(self) -> int:
        if self.max_rate is not None:
            self._tokens -= 1.0
        self.in_flight += 1
        self._seq += 1
        return self._seq

    def _wake(self) -> None:
        if self._wanted and self.on_wake is not None and self._can_admit():
            self._wanted = False
            self.on_wake()
        elif self._wanted and self.max_rate is not None:
            self._arm_rate_timer()

    def _arm_rate_timer(self) -> None:
        """If a refused caller waits only for a token, wake it when the next one is due."""
        assert self.max_rate is not None
        if (self._rate_timer is not None or self.in_flight >= self.limit or self.paused
                or self._has_token()):
            return
        now = self.now()
        # Never "now" again: float rounding may leave the bucket a hair under one token, and a
        # timer due at this very instant would re-arm itself forever.
        due = max(now + (1.0 - self._tokens) / self.max_rate, now + 1e-6)
        call_at = self._call_at or self._get_loop().call_at
        self._rate_timer = call_at(due, self._on_rate_timer)

    def _on_rate_timer(self) -> None:
        self._rate_timer = None
        self._wake()

    # -- feedback ------------------------------------------------------------------------
    def release(self, ticket: int, outcome: str, retry_after: float | None = None) -> None:
        """Return a slot and report how the attempt went.

        Args:
            ticket: what :meth:`acquire` returned.
            outcome: ``OK``, ``REFUSED`` or ``NEUTRAL``.
            retry_after: for ``REFUSED``, the seconds the server announced (if any).
        """
        self.in_flight -= 1
        if outcome == OK:
            if self.limit < self.max_concurrency:
                self.limit = min(float(self.max_concurrency), self.limit + 1.0)
            if self._hold_seq >= 0 and ticket > self._hold_seq and self.paused:
                # A request sent after the refused one was served: a lone rate-limit,
                # not a pause. Reopen now; the window was already halved.
                self.lifted_early += 1
                self._end_pause(restart=False)
        elif outcome == REFUSED:
            self.refusals += 1
            self.limit = max(1.0, self.limit / 2.0)
            if retry_after is not None and retry_after > 0:
                self._pause(ticket, retry_after)
        self._wake()

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if restart:
            # Slow start: resume from a small window; each OK adds one slot.
            self.limit = float(self._restart)
        self._wake()

    def close(self) -> None:
        """Cancel the timers (nobody waits inside the gate)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._rate_timer is not None:
            self._rate_timer.cancel()
            self._rate_timer = None
