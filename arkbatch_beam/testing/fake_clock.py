"""A fake monotonic clock with ``call_at`` timers, for testing retry timing without waiting.

Give :class:`FakeClock`'s ``time`` and ``call_at`` to ``ArkClient(clock=..., call_at=...)`` (or a
``PushbackGate``); time then moves only when the test calls :meth:`FakeClock.advance`, which
fires the timers that came due, in order, and lets the event loop run what they started.

Example:
    >>> import asyncio
    >>> async def demo():
    ...     clock = FakeClock()
    ...     fired = []
    ...     clock.call_at(1.5, fired.append, "a")
    ...     await clock.advance(1.0)
    ...     print(fired, clock.time())
    ...     await clock.advance(0.5)
    ...     print(fired, clock.time())
    >>> asyncio.run(demo())
    [] 1.0
    ['a'] 1.5
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any


class FakeTimer:
    """What :meth:`FakeClock.call_at` returns: ``cancel()`` it like a loop timer handle."""

    __slots__ = ("when", "cancelled")

    def __init__(self, when: float) -> None:
        self.when = when
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until :meth:`advance` moves it.

    Args:
        start: the initial reading.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, FakeTimer, Callable[..., Any], tuple[Any, ...]]] = []

    def time(self) -> float:
        """The current reading."""
        return self._now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        """Run ``callback(*args)`` once the clock reaches ``when``."""
        timer = FakeTimer(when)
        heapq.heappush(self._heap, (when, next(self._seq), timer, callback, args))
        return timer

    def pending(self) -> list[float]:
        """The due times of the timers not yet fired or cancelled, soonest first."""
        return sorted(t.when for _, _, t, _, _ in self._heap if not t.cancelled)

    async def settle(self, rounds: int = 50) -> None:
        """Let the event loop run what is ready (no real time passes)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move the clock forward, firing due timers in order and settling after each."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        target = self._now + seconds
        await self.settle()
        while self._heap and self._heap[0][0] <= target:
            when, _, timer, callback, args = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            callback(*args)
            await self.settle()
        self._now = target
        await self.settle()
