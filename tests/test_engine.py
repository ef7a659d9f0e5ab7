"""The client's scheduler and retry loop on a fake clock, through a scripted transport.

No network and no real time: :class:`FakeClock` moves only when a test advances it, so every
timing promise (backoff, Retry-After, deadlines, attempt limits) is checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from arkbatch_beam import ArkClient, Backoff, ChatRequest, ChatResult, ClientConfig, Endpoint
from arkbatch_beam._errors import TransportError
from arkbatch_beam.testing import FakeClock

OK_BODY = orjson.dumps({"id": "c", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})


def err_body(message: str = "boom") -> bytes:
    return orjson.dumps({"error": {"code": "X", "message": message}})


class Script:
    """A transport: ``answer(key, n)`` gives the n-th (1-based) answer for a request key.

    An answer is ``(status, headers, body)``, an exception to raise, or ``"hold"`` (wait for
    ``release()``). Records every call and the most attempts on the wire at once.
    """

    def __init__(self, answer: Callable[[str, int], Any]) -> None:
        self.answer = answer
        self.calls: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.aborted = 0
        self._release = asyncio.Event()

    def count(self, key: str) -> int:
        return self.calls.count(key)

    def release(self) -> None:
        self._release.set()

    async def __call__(self, payload: bytes, rid: str) -> tuple[int, dict[str, str], bytes]:
        key = orjson.loads(payload)["messages"][-1]["content"]
        self.calls.append(key)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            ans = self.answer(key, self.count(key))
            if ans == "hold":
                await self._release.wait()
                return 200, {}, OK_BODY
            await asyncio.sleep(0)
            if isinstance(ans, BaseException):
                raise ans
            return ans
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.in_flight -= 1


def ok(key: str, n: int) -> Any:
    return 200, {}, OK_BODY


def cfg(**kw: Any) -> ClientConfig:
    kw.setdefault("backoff", Backoff(initial=0.5, max_delay=8.0, jitter=0.5))
    kw.setdefault("timeout", 3600.0)
    kw.setdefault("progress_seconds", 0)
    return ClientConfig(Endpoint("m", base_url="http://127.0.0.1:9", api_key_env=""), **kw)


def req(key: str, model: str | None = None) -> ChatRequest:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": key}]}
    if model:
        body["model"] = model
    return ChatRequest(f"id-{key}", body)


class Harness:
    def __init__(self, config: ClientConfig, script: Script) -> None:
        self.clock = FakeClock(1000.0)
        self.script = script
        self.client = ArkClient(
            config, transport=script, clock=self.clock.time, call_at=self.clock.call_at, rand=lambda: 0.0
        )
        self.results: dict[str, ChatResult] = {}

    def submit(self, *requests: ChatRequest, owner: Any = None) -> None:
        for r in requests:
            self.client.submit(r, lambda res: self.results.__setitem__(res.custom_id, res), owner)


def run(config: ClientConfig, script: Script, body: Callable[[Harness], Any]) -> Harness:
    async def main() -> Harness:
        h = Harness(config, script)
        await h.client.start()
        try:
            await body(h)
        finally:
            await h.client.close()
        return h

    return asyncio.run(main())


# -- backoff and Retry-After --------------------------------------------------------------


def test_backoff_schedule_is_exact_and_a_retry_holds_no_worker() -> None:
    # cap 1: while "a" waits out its backoff, "b" uses the only worker.
    script = Script(lambda k, n: (500, {}, err_body()) if k == "a" and n <= 3 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("a"))
        await h.clock.settle()
        assert script.calls == ["a"]
        h.submit(req("b"))
        await h.clock.settle()
        assert script.calls == ["a", "b"] and h.results["id-b"].ok  # not behind a's backoff
        await h.clock.advance(0.499)
        assert script.count("a") == 1
        await h.clock.advance(0.001)  # first retry at 0.5 s
        assert script.count("a") == 2
        await h.clock.advance(0.999)
        assert script.count("a") == 2
        await h.clock.advance(0.001)  # then 1 s
        assert script.count("a") == 3
        await h.clock.advance(2.0)  # then 2 s
        assert script.count("a") == 4 and h.results["id-a"].ok and h.results["id-a"].attempts == 4

    run(cfg(max_concurrency=1), script, body)


@pytest.mark.parametrize("header", [
    {"Retry-After": "0"},
    {"retry-after-ms": "0"},
    {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"},  # a date in the past (clock skew)
])
def test_an_announced_zero_wait_never_retries_sooner_than_the_backoff(header: dict[str, str]) -> None:
    # Before: Retry-After: 0 retried at once; one request made 6,950 attempts in 2 s.
    script = Script(lambda k, n: (429, header, err_body("slow down")) if n <= 4 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("z"))
        await h.clock.advance(0.49)
        assert script.count("z") == 1
        await h.clock.advance(0.01)
        assert script.count("z") == 2
        await h.clock.advance(0.99)
        assert script.count("z") == 2  # the next delay is 1 s, not 0
        await h.clock.advance(10.0)
        assert h.results["id-z"].ok and script.count("z") == 5

    run(cfg(), script, body)


def test_a_tiny_announced_wait_is_honoured_but_floored_not_a_storm() -> None:
    # A server's Retry-After is the wait (a quota's refill time), however often it refuses; a
    # wait of 10 ms is taken as MIN_ANNOUNCED_WAIT (50 ms), never as "at once".
    script = Script(lambda k, n: (429, {"Retry-After": "0.01"}, err_body("slow down")) if n <= 4 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("z"))
        await h.clock.advance(0.049)
        assert script.count("z") == 1
        await h.clock.advance(0.001)
        assert script.count("z") == 2
        await h.clock.advance(0.15)
        assert h.results["id-z"].ok and script.count("z") == 5  # 4 waits of 50 ms, not a backoff's 7.5 s

    run(cfg(), script, body)


def test_a_longer_retry_after_is_honoured_exactly() -> None:
    script = Script(lambda k, n: (429, {"Retry-After": "7"}, err_body()) if n == 1 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("r"))
        await h.clock.advance(6.999)
        assert script.count("r") == 1
        await h.clock.advance(0.001)
        assert script.count("r") == 2 and h.results["id-r"].ok

    run(cfg(), script, body)


# -- limits: attempts, deadline, min attempt time -----------------------------------------


def test_a_prompt_that_always_fails_ends_after_max_attempts_not_the_deadline() -> None:
    # Before: retried until the 24 h deadline, holding its bundle and compaction.
    script = Script(lambda k, n: (500, {}, err_body("always broken")))

    async def body(h: Harness) -> None:
        h.submit(req("bad"))
        await h.clock.advance(600.0)
        res = h.results["id-bad"]
        assert res.error_type == "attempts_exhausted" and res.retryable is True
        assert res.attempts == 20 == script.count("bad")
        assert res.http_status == 500 and "always broken" in res.error_message
        assert "max_attempts=20" in res.error_message

    run(cfg(timeout=86400.0), script, body)


def test_announced_waits_do_not_count_against_max_attempts() -> None:
    # 429 + Retry-After x5, then 500 x2, then ok: max_attempts=3 counts only the 500s.
    def answer(k: str, n: int) -> Any:
        if n <= 5:
            return 429, {"Retry-After": "1"}, err_body()
        if n <= 7:
            return 500, {}, err_body()
        return ok(k, n)

    script = Script(answer)

    async def body(h: Harness) -> None:
        h.submit(req("w"))
        await h.clock.advance(300.0)
        assert h.results["id-w"].ok and script.count("w") == 8

    run(cfg(max_attempts=3), script, body)


def test_max_attempts_zero_retries_until_the_deadline() -> None:
    script = Script(lambda k, n: TransportError("reset"))

    async def body(h: Harness) -> None:
        h.submit(req("x"))
        await h.clock.advance(400.0)
        res = h.results["id-x"]
        assert res.error_type == "deadline_exceeded" and res.retryable is True
        assert res.attempts > 20 and "connection_error" in res.error_message

    run(cfg(max_attempts=0, timeout=300.0), script, body)


def test_no_attempt_starts_with_less_than_min_attempt_seconds_left() -> None:
    # deadline 10 s; the schedule 0.5, 1, 2, 4 puts attempt 5 at 7.5 s and the next at 8 s
    # later (15.5 s > 10 s): 5 attempts. With min_attempt_seconds=3, attempt 5 (2.5 s left)
    # must not start: 4 attempts.
    for min_left, attempts in ((0.0, 5), (3.0, 4)):
        script = Script(lambda k, n: (503, {}, err_body()))

        async def body(h: Harness) -> None:
            h.submit(req("d"))
            await h.clock.advance(30.0)

        h = run(cfg(timeout=10.0, min_attempt_seconds=min_left), script, body)
        res = h.results["id-d"]
        assert res.error_type == "deadline_exceeded" and script.count("d") == attempts == res.attempts


def test_a_held_attempt_ends_at_the_deadline() -> None:
    script = Script(lambda k, n: "hold")

    async def body(h: Harness) -> None:
        h.submit(req("h"))
        await h.clock.advance(59.9)
        assert "id-h" not in h.results
        await h.clock.advance(0.1)
        res = h.results["id-h"]
        assert res.error_type == "deadline_exceeded" and res.attempts == 1
        assert script.aborted == 1 and script.in_flight == 0

    run(cfg(timeout=60.0), script, body)


def test_attempt_timeout_retries_a_held_attempt() -> None:
    script = Script(lambda k, n: "hold" if n == 1 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("s"))
        await h.clock.advance(4.999)
        assert script.count("s") == 1
        await h.clock.advance(0.001)  # attempt times out at 5 s, retried 0.5 s later
        await h.clock.advance(0.5)
        assert script.count("s") == 2 and h.results["id-s"].ok

    run(cfg(attempt_timeout=5.0), script, body)


# -- one owner for concurrency --------------------------------------------------------------


def test_several_models_share_one_cap() -> None:
    # Before: each model's gate allowed the cap, and the extra waited in aiohttp's pool.
    script = Script(lambda k, n: "hold")

    async def body(h: Harness) -> None:
        h.submit(*[req(f"{m}-{i}", model=m) for m in ("m1", "m2", "m3") for i in range(10)])
        await h.clock.settle()
        assert script.in_flight == 4 and script.peak == 4
        assert {k.split("-")[0] for k in script.calls} == {"m1", "m2", "m3"}  # models take turns
        script.release()
        await h.clock.advance(1.0)
        assert len(h.results) == 30 and all(r.ok for r in h.results.values()) and script.peak == 4

    run(cfg(max_concurrency=4), script, body)


def test_a_paused_model_does_not_block_another() -> None:
    def answer(k: str, n: int) -> Any:
        if k.startswith("p") and n == 1:
            return 429, {"Retry-After": "60"}, err_body()
        return ok(k, n)

    script = Script(answer)

    async def body(h: Harness) -> None:
        h.submit(*[req(f"p{i}", model="paused") for i in range(3)])
        await h.clock.settle()
        h.submit(*[req(f"q{i}", model="other") for i in range(3)])
        await h.clock.settle()
        assert all(h.results[f"id-q{i}"].ok for i in range(3))
        assert not any(f"id-p{i}" in h.results for i in range(3))
        await h.clock.advance(200.0)  # p2's own first attempt is refused once the pause ends
        assert all(h.results[f"id-p{i}"].ok for i in range(3))

    run(cfg(max_concurrency=2), script, body)


# -- owners ----------------------------------------------------------------------------------


def test_cancelling_an_owner_drops_its_queued_and_aborts_its_in_flight_requests() -> None:
    script = Script(lambda k, n: "hold" if k.startswith("a") else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(*[req(f"a{i}") for i in range(10)], owner="bundle-1")
        await h.clock.settle()
        assert script.in_flight == 3
        h.submit(*[req(f"b{i}") for i in range(5)], owner="bundle-2")
        assert h.client.cancel_owner("bundle-1") == 10
        await h.clock.settle()
        assert script.aborted == 3 and script.in_flight == 0
        assert sorted(h.results) == [f"id-b{i}" for i in range(5)]  # no row for bundle-1
        assert [k for k in script.calls if k.startswith("a")] == ["a0", "a1", "a2"]  # queued ones never sent
        assert h.client.stats().in_flight == 0 and h.client.stats().queued == 0

    run(cfg(max_concurrency=3), script, body)


def test_cancelling_an_owner_drops_its_parked_retries() -> None:
    script = Script(lambda k, n: (500, {}, err_body()))

    async def body(h: Harness) -> None:
        h.submit(req("r"), owner="o")
        await h.clock.settle()
        assert script.count("r") == 1 and h.client.stats().parked == 1
        h.client.cancel_owner("o")
        await h.clock.advance(100.0)
        assert script.count("r") == 1 and "id-r" not in h.results

    run(cfg(), script, body)


def test_close_cancels_every_task() -> None:
    script = Script(lambda k, n: "hold")

    async def main() -> None:
        h = Harness(cfg(max_concurrency=5), script)
        await h.client.start()
        h.submit(*[req(f"c{i}") for i in range(20)])
        await h.clock.settle()
        await h.client.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == [] and script.in_flight == 0

    asyncio.run(main())


# -- found by review (each failed before its fix) ---------------------------------------------


def test_a_caller_cancelled_in_the_tick_its_attempt_times_out_is_cancelled() -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        victim: dict[str, asyncio.Task[Any]] = {}

        def call_at(when: float, cb: Callable[..., Any], *args: Any) -> Any:
            if getattr(cb, "__name__", "") == "_abort_attempt":
                def both(*a: Any) -> None:
                    cb(*a)  # the attempt times out ...
                    victim["task"].cancel()  # ... and its caller is cancelled in the same tick
                return clock.call_at(when, both, *args)
            return clock.call_at(when, cb, *args)

        script = Script(lambda k, n: "hold" if n == 1 else ok(k, n))
        client = ArkClient(cfg(max_concurrency=2, attempt_timeout=5.0), transport=script,
                           clock=clock.time, call_at=call_at, rand=lambda: 0.0)
        await client.start()
        victim["task"] = task = asyncio.ensure_future(client.complete(req("x")))
        await clock.advance(15.0)
        assert task.cancelled() and script.count("x") == 1  # before: swallowed, retried, returned a row
        await client.close()

    asyncio.run(main())


def test_a_cancelled_error_from_inside_the_http_client_is_a_retried_transport_error() -> None:
    script = Script(lambda k, n: asyncio.CancelledError() if n == 1 else ok(k, n))

    async def body(h: Harness) -> None:
        h.submit(req("x"), owner="bundle")
        await h.clock.advance(60.0)
        assert h.results["id-x"].ok and script.count("x") == 2  # before: worker died, no row ever

    run(cfg(max_concurrency=1), script, body)


def test_retry_after_zero_counts_against_max_attempts() -> None:
    script = Script(lambda k, n: (429, {"Retry-After": "0"}, err_body()))

    async def body(h: Harness) -> None:
        h.submit(req("z"))
        await h.clock.advance(3600.0)
        res = h.results["id-z"]
        assert res.error_type == "attempts_exhausted" and script.count("z") == 5  # before: 454 in an hour

    run(cfg(max_attempts=5), script, body)


def test_close_ends_every_unfinished_request_with_a_cancelled_row() -> None:
    def answer(k: str, n: int) -> Any:
        if k == "p":
            return 503, {"Retry-After": "100"}, err_body()  # overloaded: everyone waits
        if k == "r" and n == 1:
            return 500, {}, err_body()
        return ok(k, n)

    async def main() -> None:
        h = Harness(cfg(max_concurrency=4, timeout=30.0), Script(answer))
        await h.client.start()
        h.submit(req("r"))
        await h.clock.settle()
        h.submit(req("p"))  # pauses the gate for 100 s
        await h.clock.advance(0.5)  # "r" is back in the queue, behind the pause
        waiter = asyncio.ensure_future(h.client.complete(req("c")))  # queued behind the pause
        await h.clock.settle()
        await h.client.close()
        await h.clock.advance(100.0)
        assert waiter.done() and waiter.result().error_type == "cancelled"  # before: waited forever
        assert h.results["id-r"].error_type == "cancelled" and h.client.stats().queued == 0

    asyncio.run(main())


def test_the_rate_timer_never_spins_at_the_same_instant() -> None:
    from arkbatch_beam._pacing import PushbackGate

    async def main() -> None:
        clock = FakeClock(1024.0000000000002)
        woken: list[float] = []
        gate = PushbackGate(5, max_rate=5.0, clock=clock.time, call_at=clock.call_at,
                            on_wake=lambda: woken.append(clock.time()))
        # The bucket state a randomized run reached: a hair under one token after float rounding
        # (set directly: reaching it through the API takes a long random walk).
        gate._tokens, gate._tokens_at = 0.9999999999996589, clock.time()
        if gate.try_acquire() is None:
            await clock.advance(1.0)  # before: a timer due "now" re-armed itself forever (FakeClock hung)
            assert woken and gate.try_acquire() is not None

    asyncio.run(main())


def test_a_secret_the_server_escapes_in_json_is_still_scrubbed() -> None:
    from arkbatch_beam._result import Redactor, parse_completion

    red = Redactor(["tok/abc123+xyz"])
    for body in (b'{"choices":[{"message":{"content":"you sent tok\\/abc123+xyz"}}]}',
                 b'{"choices":[{"message":{"content":"you sent tok\\u002fabc123+xyz"}}]}'):
        r = ChatResult("a", "ok")
        parse_completion(body, r)
        r.response_json = body.decode()
        red.result(r)
        assert "abc123" not in r.content and "abc123" not in r.response_json  # before: both kept it


def test_a_request_submitted_after_close_ends_at_once_and_the_client_can_start_again() -> None:
    script = Script(ok)

    async def main() -> None:
        h = Harness(cfg(), script)
        await h.client.start()
        await h.client.close()
        h.submit(req("late"))  # before: queued for a worker that never came
        assert h.results["id-late"].error_type == "cancelled" and script.calls == []
        assert (await h.client.complete(req("again"))).ok  # complete() starts a closed client again
        await h.client.close()

    asyncio.run(main())


def test_held_requests_fill_the_adaptive_window_up_to_the_cap() -> None:
    # Ark holds batch requests for minutes or hours. Before: the window grew only on answers
    # (8 in flight for a whole hold); then, grown on time, nobody was woken to use the room.
    script = Script(lambda k, n: "hold")

    async def body(h: Harness) -> None:
        h.submit(*(req(f"k{i}") for i in range(1500)))
        await h.clock.settle()
        assert script.in_flight == 8
        seen = []
        for _ in range(30):  # 15 s of a server that answers nothing
            await h.clock.advance(0.5)
            seen.append(script.in_flight)
        assert script.in_flight == 1000 == script.peak  # the cap, never above it
        assert seen.index(1000) * 0.5 <= 8.0, seen  # doubling every ACCEPT_AFTER: ~5 s
        script.release()
        await h.clock.advance(1.0)
        await h.clock.settle()

    run(cfg(max_concurrency=1000), script, body)
