"""The pushback gate, driven by a fake clock: exact and instant."""

import asyncio

import pytest

from arkbatch_beam._pacing import (
    ACCEPT_AFTER,
    ALPHA,
    BETA,
    MAX_SLOT_HOLD,
    NEUTRAL,
    OK,
    OVERLOADED,
    REFUSED,
    PushbackGate,
)


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


def make(n, clock, pacing="fixed", **kw):
    return PushbackGate(n, clock=clock.time, call_at=clock.call_at, pacing=pacing, **kw)


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
        # The server announces a pause: one refusal is not yet "everyone"; most answers refused is.
        for t in tickets[8:13]:
            gate.release(t, REFUSED, retry_after=5.0)
            assert not gate.paused
        gate.release(tickets[13], REFUSED, retry_after=5.0)
        gate.release(tickets[0], OK)
        gate.release(tickets[14], REFUSED, retry_after=5.0)
        assert gate.paused and gate.try_acquire() is None  # 7 of 8 refused
        # Requests sent *before* the refused ones come back OK: no evidence, still paused.
        for t in tickets[1:8]:
            gate.release(t, OK)
        assert gate.paused
        # Those sent after them are refused too.
        for t in tickets[15:]:
            gate.release(t, REFUSED, retry_after=5.0)
        # Refused attempts keep their slots a while (at most MAX_SLOT_HOLD), then free them.
        assert gate.paused and gate.in_flight == 8 and gate.try_acquire() is None
        clock.advance(MAX_SLOT_HOLD)
        assert gate.paused and gate.in_flight == 0 and gate.try_acquire() is None
        clock.advance(4.999 - MAX_SLOT_HOLD)
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
        gate = make(10, clock)
        tickets = [gate.try_acquire() for _ in range(10)]
        for t in tickets[:8]:
            gate.release(t, REFUSED, retry_after=1.0)
        assert gate.paused_until == pytest.approx(1.0)
        gate.release(tickets[8], REFUSED, retry_after=3.0)
        clock.advance(1.5)
        assert gate.paused
        clock.advance(1.5)
        assert not gate.paused

    run(main())


def test_lone_429_among_successes_narrows_instead_of_stalling():
    async def main():
        clock = FakeClock()
        gate = make(8, clock, pacing="adaptive")
        tickets = [gate.try_acquire() for _ in range(8)]
        gate.release(tickets[2], REFUSED, retry_after=30.0)
        # A lone 429: its own request waits (the client's job); the process does not pause.
        assert not gate.paused and gate.limit == 8 * BETA and gate.paused_until == 0.0
        gate.release(tickets[5], OK)
        assert gate.try_acquire() is None  # in_flight 6 > narrowed window 5.6 + 1/5.6
        for t in (tickets[0], tickets[1]):
            gate.release(t, OK)
        assert gate.try_acquire() is not None  # 4 in flight < 6
        clock.advance(60)
        assert gate.paused_seconds == 0.0 and gate.cuts == 1

    run(main())


def test_refusal_without_retry_after_narrows_only():
    async def main():
        clock = FakeClock()
        gate = make(10, clock, pacing="adaptive")
        t = gate.try_acquire()
        gate.release(t, REFUSED, retry_after=None)
        assert not gate.paused and gate.limit == 4  # still in slow start (8 < ssthresh 10): halved
        gate.release(gate.try_acquire(), NEUTRAL)
        assert gate.limit == 4

    run(main())


def test_window_never_below_one_nor_above_cap():
    async def main():
        clock = FakeClock()
        gate = make(4, clock, pacing="adaptive")
        for _ in range(10):
            gate.release(gate.try_acquire(), REFUSED)
        assert gate.limit == 1
        for _ in range(200):
            gate.release(gate.try_acquire(), OK)
        assert gate.limit == 4

    run(main())


def test_waiters_wake_when_pause_ends():
    async def main():
        clock = FakeClock()
        gate = make(2, clock)
        t = gate.try_acquire()
        gate.release(t, OVERLOADED, retry_after=2.0)  # a 503 with Retry-After: everyone waits
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
        gate.release(t, OVERLOADED, retry_after=5.0)  # announced pause
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


# --- adaptive concurrency (AIMD), lone vs broad refusals, budgets, throttled time ---------------


def test_adaptive_window_slow_starts_then_grows_additively_per_round_trip():
    async def main():
        clock = FakeClock()
        gate = make(100, clock, pacing="adaptive")
        sizes = []
        for _ in range(6):  # round trips: admit a window's worth, all answered cleanly
            tickets = [t for t in (gate.try_acquire() for _ in range(200)) if t is not None]
            sizes.append(len(tickets))
            for t in tickets:
                gate.release(t, OK)
        assert sizes == [8, 16, 32, 64, 100, 100]  # doubling per round trip, never above the cap
        # A refusal: cut once for the whole window (the other refusals of that window are the
        # same congestion event), then +1 per round trip.
        tickets = [gate.try_acquire() for _ in range(100)]
        for t in tickets[:10]:
            gate.release(t, REFUSED)
        assert gate.limit == pytest.approx(100 * BETA) and gate.cuts == 1
        for t in tickets[10:]:
            gate.release(t, OK)
        assert 100 * BETA < gate.limit < 100 * BETA + 2
        before = gate.limit
        tickets = [t for t in (gate.try_acquire() for _ in range(100)) if t is not None]
        for t in tickets:
            gate.release(t, OK)
        assert gate.limit == pytest.approx(before + ALPHA, abs=0.02)  # additive: ALPHA per round trip

    run(main())


def test_two_adaptive_processes_share_a_quota_fairly_with_few_refusals():
    """A deterministic round-based simulation: two gates, one server that serves at most
    ``Q`` requests per round and refuses the rest (the latest arrivals first)."""

    async def main():
        clock = FakeClock()
        gates = [make(500, clock, pacing="adaptive"), make(500, clock, pacing="adaptive")]
        q = 120
        sent = refused = 0
        served = [0, 0]
        for rnd in range(300):
            if rnd == 100:
                paused_by_then = [g.paused_seconds for g in gates]
            batches = []
            for i, g in enumerate(gates):
                tickets = [t for t in (g.try_acquire() for _ in range(600)) if t is not None]
                batches.append((i, tickets))
            arrivals = [(i, t) for i, ts in batches for t in ts]
            # Interleave the two processes' arrivals, as on a real network.
            arrivals.sort(key=lambda it: (it[1], it[0]))
            for n, (i, t) in enumerate(arrivals):
                sent += 1
                if n < q:
                    gates[i].release(t, OK)
                    if rnd >= 100:
                        served[i] += 1
                else:
                    refused += 1
                    gates[i].release(t, REFUSED, retry_after=0.1)
            clock.advance(0.01)
        share = [s / (sum(served) / 2) for s in served]
        assert all(0.8 <= x <= 1.2 for x in share), share  # within 20 % of a fair share
        # The quota is used (both cut in the same round here, the worst case for AIMD's sawtooth).
        assert sum(served) / 200 >= 0.8 * q, sum(served) / 200
        assert refused / sent < 0.05, refused / sent  # few refusals
        # Steady state: no pauses (the slow start's first overshoot may pause once, briefly).
        assert [g.paused_seconds for g in gates] == paused_by_then and not any(g.paused for g in gates)

    run(main())


def test_refusals_for_most_recent_answers_pause_everyone_a_few_do_not():
    async def main():
        clock = FakeClock()
        gate = make(40, clock)
        tickets = [gate.try_acquire() for _ in range(40)]
        # A quota overshoot: the excess is refused, among successes. No pause.
        for i, t in enumerate(tickets[:16]):
            gate.release(t, REFUSED if i % 3 == 0 else OK, retry_after=2.0)
        assert not gate.paused and gate.paused_seconds == 0.0
        # Everyone refused (an announced pause): once most recent answers are refusals, pause.
        refused = 0
        for t in tickets[16:]:
            gate.release(t, REFUSED, retry_after=2.0)
            refused += 1
            if gate.paused:
                break
        assert gate.paused and refused <= 12
        clock.advance(2.0)
        assert not gate.paused and gate.paused_seconds == pytest.approx(2.0)

    run(main())


def test_latency_rising_well_past_its_baseline_cuts_the_window():
    async def main():
        clock = FakeClock()
        gate = make(64, clock, pacing="adaptive")
        for _ in range(40):
            gate.release(gate.try_acquire(), OK, latency=0.1)
        grown = gate.limit
        assert gate.cuts == 0
        for _ in range(10):
            gate.release(gate.try_acquire(), OK, latency=2.0)  # the server is queueing us
        assert gate.cuts >= 1 and gate.limit < grown

    run(main())


def test_tokens_per_minute_budget_charges_estimates_corrects_from_usage_and_wakes_by_timer():
    async def main():
        clock = FakeClock()
        gate = make(100, clock, max_tokens_per_minute=6000)  # 100 tokens/s, bucket of 1000
        a = gate.try_acquire(cost=700)
        b = gate.try_acquire(cost=700)  # the bucket (300 left) may go into debt: -400
        assert a and b and gate.try_acquire(cost=10) is None
        gate.release(a, OK, cost=700, tokens=300)  # usage says 300: 400 back, bucket at 0
        callers = Callers(gate)
        callers.add("x")
        assert callers.names() == ["x"]  # 0 is not debt: admitted at once
        gate.release(b, OK, cost=700, tokens=900)  # 200 more than charged: debt again
        callers.waiting.append("y")
        callers.pump()
        assert callers.names() == ["x"] and gate.budget_waits >= 1
        clock.advance(1.99)
        assert callers.names() == ["x"]
        clock.advance(0.02)  # the timer fires when the debt is paid (200 tokens at 100/s)
        assert callers.names() == ["x", "y"]

    run(main())


def test_throttled_time_counts_pauses_and_budgets_not_the_cap():
    async def main():
        clock = FakeClock()
        gate = make(1, clock)
        t = gate.try_acquire()
        assert gate.try_acquire() is None  # waiting for our own cap is not throttling
        clock.advance(5.0)
        assert gate.throttled_so_far() == 0.0
        gate.release(t, OVERLOADED, retry_after=3.0)
        callers = Callers(gate)
        callers.add("w")
        clock.advance(3.0)  # the pause ends, w is admitted
        assert callers.names() == ["w"] and gate.throttled_so_far() == pytest.approx(3.0)

    run(main())


def test_external_permits_gate_admissions():
    class Permits:  # what PermitPump offers the gate
        available = 0
        wanted = 0

        def want(self):
            self.wanted += 1

        def take(self):
            self.available -= 1

    async def main():
        clock = FakeClock()
        permits = Permits()
        gate = make(10, clock, permits=permits)
        assert gate.try_acquire() is None and permits.wanted == 1
        callers = Callers(gate)
        callers.add("a", "b")
        permits.available += 1
        gate.permits_arrived()
        assert callers.names() == ["a"] and permits.available == 0
        permits.available += 1
        gate.permits_arrived()
        assert callers.names() == ["a", "b"]

    run(main())


def test_a_refused_attempt_keeps_its_slot_so_refusals_come_no_faster_than_the_waits_allow():
    # Before: a 429 came back in a millisecond and freed its slot at once; a queued request took
    # it and was refused too: ~1,000 refusals/s per process against a quota (benchmarks/fleet.py).
    async def main():
        clock = FakeClock()
        gate = make(10, clock)
        sent = 0
        for _ in range(100):  # 1 s in steps of 10 ms; every attempt is refused with Retry-After 0.1
            while (t := gate.try_acquire()) is not None:
                sent += 1
                gate.release(t, REFUSED, retry_after=0.1)
            clock.advance(0.01)
        assert sent <= 10 * 11  # each of 10 slots sends at most once per 0.1 s

    run(main())


def test_the_window_opens_while_the_server_holds_requests():
    """Ark holds batch requests for minutes or hours: the window must not wait for answers to
    grow (it would double once per hold). A request in flight ACCEPT_AFTER without a refusal
    counts as accepted."""

    async def main():
        clock = FakeClock()
        gate = make(10_000, clock, pacing="adaptive")
        held = []
        seen = []
        for _ in range(40):  # 20 s of a server that answers nothing (a one-hour hold)
            while (t := gate.try_acquire()) is not None:
                held.append(t)
            seen.append(gate.in_flight)
            clock.advance(0.5)
        assert seen[0] == 8
        # Doubling per ACCEPT_AFTER: 8 -> 10,000 in about log2(1250) ~ 10.3 of them.
        assert gate.in_flight == 10_000
        assert seen.index(10_000) * 0.5 <= 12 * ACCEPT_AFTER
        # Each admission grew the window once: their answers, an hour later, grow nothing more.
        gate.limit = 500.0
        for t in held[:100]:
            gate.release(t, OK)
        assert gate.limit == 500.0

    run(main())


def test_a_refusal_before_acceptance_grows_nothing():
    async def main():
        clock = FakeClock()
        gate = make(1000, clock, pacing="adaptive")
        tickets = [gate.try_acquire() for _ in range(8)]
        assert gate.try_acquire() is None
        clock.advance(ACCEPT_AFTER / 2)
        for t in tickets:
            gate.release(t, NEUTRAL)  # e.g. 500s: no signal, and never accepted
        for _ in range(10):
            clock.advance(ACCEPT_AFTER)
        assert gate.limit == 8.0
        tickets = [gate.try_acquire() for _ in range(8)]
        clock.advance(ACCEPT_AFTER / 2)
        gate.release(tickets[0], REFUSED)
        for t in tickets[1:]:
            gate.release(t, NEUTRAL)
        for _ in range(10):
            clock.advance(ACCEPT_AFTER)
        assert gate.limit == pytest.approx(4.0)  # cut (leaving slow start halves), never grown

    run(main())
