"""The pushback gate, driven by a fake clock: exact and instant."""

import asyncio

import pytest

from arkbatch_beam._pacing import NEUTRAL, OK, REFUSED, PushbackGate


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.timers = []

    def time(self):
        return self.t

    def call_at(self, when, cb):
        h = asyncio.get_running_loop().call_soon(lambda: None)
        h.cancel()  # a cancellable handle to return; we fire callbacks ourselves
        self.timers.append([when, cb, h])
        return _Handle(self.timers[-1])

    def advance(self, dt):
        self.t += dt
        for entry in list(self.timers):
            if entry[0] <= self.t and entry[1] is not None:
                cb, entry[1] = entry[1], None
                cb()


class _Handle:
    def __init__(self, entry):
        self.entry = entry

    def cancel(self):
        self.entry[1] = None


def run(coro):
    return asyncio.run(coro)


def make(n, clock):
    return PushbackGate(n, clock=clock.time, call_at=clock.call_at)


class Callers:
    """What the client's scheduler does: callers wait in FIFO order, admitted on ``on_wake``."""

    def __init__(self, gate):
        self.gate = gate
        self.waiting = []
        self.admitted = []
        self.wakes = 0
        gate.on_wake = self._on_wake

    def _on_wake(self):
        self.wakes += 1
        self.pump()

    def add(self, *names):
        self.waiting.extend(names)
        self.pump()

    def pump(self):
        while self.waiting:
            t = self.gate.try_acquire()
            if t is None:
                return
            self.admitted.append((self.waiting.pop(0), t))

    def names(self):
        return [n for n, _ in self.admitted]


def test_cap_is_never_exceeded_and_waiters_are_fifo():
    async def main():
        clock = FakeClock()
        gate = make(3, clock)
        tickets = [gate.try_acquire() for _ in range(3)]
        assert None not in tickets and gate.try_acquire() is None
        callers = Callers(gate)
        callers.add(0, 1, 2, 3)
        assert gate.in_flight == 3 and callers.names() == []
        gate.release(tickets[0], OK)
        gate.release(tickets[1], OK)
        assert callers.names() == [0, 1] and gate.in_flight == 3

    run(main())


def test_broad_refusal_pauses_new_sends_until_announced_time_then_slow_start():
    async def main():
        clock = FakeClock()
        gate = make(16, clock)
        tickets = [gate.try_acquire() for _ in range(16)]
        # The server announces a pause: the first refusal closes the gate for new sends.
        gate.release(tickets[8], REFUSED, retry_after=5.0)
        assert gate.paused and gate.try_acquire() is None
        # Requests sent *before* the refused one come back OK: no evidence, still paused.
        for t in tickets[:8]:
            gate.release(t, OK)
        assert gate.paused
        # Those sent after it are refused too.
        for t in tickets[9:]:
            gate.release(t, REFUSED, retry_after=5.0)
        assert gate.paused and gate.in_flight == 0 and gate.try_acquire() is None
        clock.advance(4.999)
        assert gate.paused and gate.try_acquire() is None
        clock.advance(0.001)
        assert not gate.paused
        # Slow start: only a fraction of the cap at first, growing with each success.
        got = [gate.try_acquire() for _ in range(16)]
        admitted = [t for t in got if t is not None]
        assert len(admitted) == 2  # 16 // 8
        for t in admitted:
            gate.release(t, OK)
        assert gate.limit == 4
        assert gate.paused_seconds == pytest.approx(5.0)

    run(main())


def test_later_refusals_extend_the_pause():
    async def main():
        clock = FakeClock()
        gate = make(4, clock)
        a, b = gate.try_acquire(), gate.try_acquire()
        gate.release(a, REFUSED, retry_after=1.0)
        gate.release(b, REFUSED, retry_after=3.0)
        clock.advance(1.5)
        assert gate.paused
        clock.advance(1.5)
        assert not gate.paused

    run(main())


def test_lone_429_among_successes_narrows_instead_of_stalling():
    async def main():
        clock = FakeClock()
        gate = make(8, clock)
        tickets = [gate.try_acquire() for _ in range(8)]
        gate.release(tickets[2], REFUSED, retry_after=30.0)
        assert gate.paused and gate.limit == 4
        # A request sent after the refused one is answered: the server is serving.
        gate.release(tickets[5], OK)
        assert not gate.paused and gate.lifted_early == 1
        assert gate.try_acquire() is None  # in_flight 6 > narrowed window 5
        for t in (tickets[0], tickets[1]):
            gate.release(t, OK)
        assert gate.try_acquire() is not None
        clock.advance(60)  # the cancelled timer must not fire a slow-start later
        assert gate.limit >= 6

    run(main())


def test_refusal_without_retry_after_narrows_only():
    async def main():
        clock = FakeClock()
        gate = make(10, clock)
        t = gate.try_acquire()
        gate.release(t, REFUSED, retry_after=None)
        assert not gate.paused and gate.limit == 5
        gate.release(gate.try_acquire(), NEUTRAL)
        assert gate.limit == 5

    run(main())


def test_window_never_below_one_nor_above_cap():
    async def main():
        clock = FakeClock()
        gate = make(4, clock)
        for _ in range(10):
            gate.release(gate.try_acquire(), REFUSED)
        assert gate.limit == 1
        for _ in range(20):
            gate.release(gate.try_acquire(), OK)
        assert gate.limit == 4

    run(main())


def test_waiters_wake_when_pause_ends():
    async def main():
        clock = FakeClock()
        gate = make(2, clock)
        t = gate.try_acquire()
        gate.release(t, REFUSED, retry_after=2.0)
        callers = Callers(gate)
        callers.add("w")
        assert callers.names() == []
        clock.advance(2.0)
        assert callers.names() == ["w"] and gate.in_flight == 1

    run(main())


def test_rejects_impossible_cap():
    with pytest.raises(ValueError, match="max_concurrency"):
        PushbackGate(0)


def test_rate_bound_spreads_admissions_over_time_and_wakes_waiters_by_timer():
    async def main():
        clock = FakeClock()
        gate = PushbackGate(100, clock=clock.time, call_at=clock.call_at, max_rate=64.0)
        # A full bucket holds a tenth of a second's worth (6.4): 6 admissions at once, not a 7th.
        tickets = [gate.try_acquire() for _ in range(6)]
        assert None not in tickets and gate.try_acquire() is None
        for t in tickets:  # answers coming back do not refill it: only time does
            gate.release(t, OK)
        assert gate.try_acquire() is None
        callers = Callers(gate)
        callers.add("a", "b", "c")
        assert callers.names() == []
        admitted = []
        for _ in range(6):
            clock.advance(1 / 128)  # half a token per step
            admitted.append(len(callers.admitted))
        assert admitted == [0, 1, 1, 2, 2, 3]  # one every 1/64 s, FIFO, woken by the timer
        assert callers.names() == ["a", "b", "c"] and gate.in_flight == 3

    run(main())


def test_rate_bound_and_pause_together_and_close_cancels_the_timer():
    async def main():
        clock = FakeClock()
        gate = PushbackGate(100, clock=clock.time, call_at=clock.call_at, max_rate=1.0)
        t = gate.try_acquire()
        gate.release(t, REFUSED, retry_after=5.0)  # announced pause
        callers = Callers(gate)
        callers.add("first")
        clock.advance(4.0)  # tokens are back, the pause is not over
        assert callers.names() == []
        clock.advance(1.0)
        assert callers.names() == ["first"]
        callers.add("second")  # the bucket (1 token) is empty again
        assert callers.names() == ["first"]
        gate.close()  # cancels the timer that would have admitted it a second later
        clock.advance(5.0)
        assert callers.names() == ["first"] and gate.in_flight == 1

    run(main())


def test_rejects_impossible_rate():
    with pytest.raises(ValueError, match="max_rate"):
        PushbackGate(1, max_rate=0)


def test_a_refused_caller_is_woken_once_per_refusal_not_per_release():
    async def main():
        clock = FakeClock()
        gate = make(2, clock)
        callers = Callers(gate)
        a, b = gate.try_acquire(), gate.try_acquire()
        gate.release(a, OK)  # nobody was refused: no wake
        assert callers.wakes == 0
        gate.try_acquire()  # takes the freed slot
        assert gate.try_acquire() is None  # refused: the next release wakes
        gate.release(b, OK)
        assert callers.wakes == 1

    run(main())
