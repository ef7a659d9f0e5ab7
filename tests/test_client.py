"""End-to-end tests of ``ArkClient.complete()``: the real aiohttp stack against ``FakeArkServer``.

Every test runs its own event loop with ``asyncio.run`` and talks to a fake server on
127.0.0.1 running in its own thread. Backoff is tiny so the suite stays fast; nothing waits
with ``time.sleep``: tests use the server's counters, ``wait_for_requests``,
``release_holds`` and arrival times recorded by an ``on_request`` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import orjson
import pytest

from arkbatch_beam import (
    ArkClient,
    Backoff,
    ChatRequest,
    ChatResult,
    ClientConfig,
    Endpoint,
    MissingApiKey,
    _attempt,
)
from arkbatch_beam._health import FATAL_AFTER
from arkbatch_beam.testing import FakeArkServer, Fault

pytestmark = pytest.mark.timeout(60)

KEY_ENV = "ARKBATCH_TEST_CLIENT_KEY"
SECRET = "sk-SECRET-123"
FAST = Backoff(initial=0.01, max_delay=0.05, jitter=0.0)
T = TypeVar("T")


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeArkServer]:
    """A fake server that expects ``SECRET``; the client reads it from ``KEY_ENV``."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeArkServer(api_key=SECRET) as srv:
        yield srv


def config(base_url: str, *, model: str | None = "ep-test", **kw: Any) -> ClientConfig:
    """A client config for ``base_url`` with fast backoff and a generous deadline."""
    kw.setdefault("backoff", FAST)
    kw.setdefault("timeout", 30.0)
    return ClientConfig(Endpoint(model, base_url=base_url, api_key_env=KEY_ENV), **kw)


def req(key: str, **extra: Any) -> ChatRequest:
    """A request whose key on the fake server (last user message) is ``key``."""
    body = {"messages": [{"role": "user", "content": key}], **extra}
    return ChatRequest(f"id-{key}", body, raw=orjson.dumps(body).decode())


def run(cfg: ClientConfig, fn: Callable[[ArkClient], Awaitable[T]]) -> T:
    """Open a client on a fresh event loop, run ``fn(client)`` and close the client."""

    async def main() -> T:
        async with ArkClient(cfg) as client:
            return await fn(client)

    return asyncio.run(main())


def complete_all(cfg: ClientConfig, requests: Sequence[ChatRequest]) -> tuple[list[ChatResult], ArkClient, float]:
    """Complete ``requests`` concurrently; return results, the client and elapsed seconds."""
    holder: dict[str, Any] = {}

    async def fn(client: ArkClient) -> list[ChatResult]:
        holder["client"] = client
        t0 = time.monotonic()
        results = await asyncio.gather(*(client.complete(r) for r in requests))
        holder["elapsed"] = time.monotonic() - t0
        return list(results)

    results = run(cfg, fn)
    return results, holder["client"], holder["elapsed"]


def complete_one(cfg: ClientConfig, request: ChatRequest) -> tuple[ChatResult, ArkClient, float]:
    results, client, elapsed = complete_all(cfg, [request])
    return results[0], client, elapsed


def record_arrivals(server: FakeArkServer) -> list[tuple[float, float]]:
    """Record ``(time.monotonic(), time.time())`` of every arrival at the server."""
    arrivals: list[tuple[float, float]] = []
    server.on_request(lambda _n: arrivals.append((time.monotonic(), time.time())))
    return arrivals


def http_date(ts: float) -> str:
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(ts, datetime.UTC), usegmt=True)


def closed_port() -> int:
    """A local port nobody listens on (bound, then closed)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_distinct_request_ids(server: FakeArkServer, result: ChatResult, n: int) -> None:
    ids = server.client_request_ids
    assert len(ids) == n and all(ids), ids
    assert len(set(ids)) == n, f"X-Client-Request-Id reused across attempts: {ids}"
    assert result.request_id == ids[-1]


# -- the good path ------------------------------------------------------------------------


def test_ok_answer_parsed_into_chat_result(server: FakeArkServer) -> None:
    cfg = config(server.base_url, model="doubao-thinking-pro")
    res, client, _ = complete_one(cfg, req("hello there"))
    assert res.status == "ok" and res.ok
    assert res.custom_id == "id-hello there"
    assert res.model == "doubao-thinking-pro"
    assert res.content == "echo: hello there"
    assert res.reasoning_content == "thinking about: hello there"
    assert res.finish_reason == "stop"
    assert res.response_id is not None and res.response_id.startswith("chatcmpl-")
    assert (res.prompt_tokens, res.completion_tokens, res.total_tokens) == (2, 3, 5)
    assert res.cached_tokens == 0
    assert res.reasoning_tokens == 4
    assert res.attempts == 1
    assert res.error_type is None and res.error_message is None and res.retryable is None
    assert res.latency_ms is not None and res.latency_ms > 0
    assert res.request_id == server.client_request_ids[0] != ""
    response = orjson.loads(res.response_json or "")
    assert response["choices"][0]["message"]["content"] == "echo: hello there"
    assert response["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert res.request_json is None  # only failure rows keep the request
    assert (client.ok, client.failed, client.attempts) == (1, 0, 1)
    assert server.total_requests == 1


def test_openai_compatible_path(server: FakeArkServer) -> None:
    cfg = ClientConfig(
        Endpoint.openai_compatible("gpt-x", server.openai_base_url, api_key_env=KEY_ENV),
        backoff=FAST,
        timeout=30.0,
    )
    res, _, _ = complete_one(cfg, req("plain"))
    assert res.ok and res.content == "echo: plain" and res.model == "gpt-x"
    assert res.reasoning_content is None and res.reasoning_tokens == 0


def test_stream_true_is_sent_as_false_on_batch_path(server: FakeArkServer) -> None:
    # The fake server answers 400 "Streaming is not supported" to stream: true on /batch/.
    request = req("streamed", stream=True)
    res, _, _ = complete_one(config(server.base_url), request)
    assert res.ok, res.error_message
    assert res.content == "echo: streamed" and res.attempts == 1
    assert request.body["stream"] is True  # the caller's body is not mutated
    assert server.statuses == {200: 1}


def test_body_model_wins_and_missing_model_fails_without_sending(server: FakeArkServer) -> None:
    res, _, _ = complete_one(config(server.base_url), req("m", model="ep-from-body"))
    assert res.ok and res.model == "ep-from-body"
    res, client, _ = complete_one(config(server.base_url, model=None), req("nomodel"))
    assert res.status == "failed" and res.error_type == "invalid_request"
    assert res.attempts == 0 and res.request_json is not None and client.failed == 1
    assert server.total_requests == 1  # the second request never left the client


def test_concurrent_results_are_not_mixed_up(server: FakeArkServer) -> None:
    server.latency_jitter = 0.02  # answers come back out of order
    server.add_fault(Fault.server_error(502, match="k3", times=2))
    server.add_fault(Fault.bad_request("nope", match="k7"))
    server.add_fault(Fault.reset(match="k11"))
    requests = [req(f"k{i}") for i in range(40)]
    results, client, _ = complete_all(config(server.base_url, max_concurrency=8), requests)
    for i, res in enumerate(results):
        assert res.custom_id == f"id-k{i}"
        if i == 7:
            assert res.status == "failed" and res.error_message == "nope"
        else:
            assert res.ok and res.content == f"echo: k{i}", res
    assert results[3].attempts == 3 and results[11].attempts == 2
    assert (client.ok, client.failed) == (39, 1)
    assert client.attempts == server.total_requests == 43


# -- retryable failures -------------------------------------------------------------------

RETRYABLE = {
    "429-retry-after": lambda k: Fault.rate_limited("0.05", match=k, times=2),
    "500": lambda k: Fault.server_error(500, match=k, times=2),
    "502": lambda k: Fault.server_error(502, match=k, times=2),
    "503": lambda k: Fault.server_error(503, match=k, times=2),
    "408": lambda k: Fault.server_error(408, code="RequestTimeout", match=k, times=2),
    "409": lambda k: Fault.server_error(409, code="Conflict", match=k, times=2),
    "reset": lambda k: Fault.reset(match=k, times=2),
    "truncated": lambda k: Fault.truncate(match=k, times=2),
    "invalid-json": lambda k: Fault.invalid_json(match=k, times=2),
    "empty-body": lambda k: Fault.empty(match=k, times=2),
}


@pytest.mark.parametrize("name", sorted(RETRYABLE))
def test_retryable_failure_ends_ok(server: FakeArkServer, name: str) -> None:
    server.add_fault(RETRYABLE[name]("q"))
    res, client, _ = complete_one(config(server.base_url, max_invalid_responses=3), req("q"))
    assert res.ok, (res.error_type, res.error_message)
    assert res.content == "echo: q"
    assert res.attempts == 3 == server.attempts_by_key["q"] == client.attempts
    assert res.error_type is None and res.http_status is None
    assert_distinct_request_ids(server, res, 3)
    assert server.pending_faults() == []


# -- Retry-After --------------------------------------------------------------------------


def _retry_after_cases() -> dict[str, Callable[[], tuple[int, dict[str, str], float | None]]]:
    """name -> () -> (status, headers, announced wait in seconds or None for HTTP-date)."""
    return {
        "seconds-int": lambda: (429, {"Retry-After": "1"}, 1.0),
        "seconds-float": lambda: (429, {"Retry-After": "0.45"}, 0.45),
        "retry-after-ms": lambda: (429, {"retry-after-ms": "400"}, 0.4),
        "http-date": lambda: (429, {"Retry-After": http_date(math.ceil(time.time() + 0.3))}, None),
        "503-with-retry-after": lambda: (503, {"Retry-After": "0.35"}, 0.35),
    }


@pytest.mark.parametrize("form", sorted(_retry_after_cases()))
def test_retry_after_is_honoured(server: FakeArkServer, form: str) -> None:
    status, headers, wait = _retry_after_cases()[form]()
    server.add_fault(Fault("status", match="ra", status=status, headers=headers, code="RateLimitExceeded"))
    arrivals = record_arrivals(server)
    res, _, _ = complete_one(config(server.base_url), req("ra"))
    assert res.ok and res.attempts == 2
    assert len(arrivals) == 2
    (mono1, _), (mono2, wall2) = arrivals
    if wait is not None:
        # The retry arrived no earlier than the announced wait after the refused one.
        assert mono2 - mono1 >= wait - 1e-3, (mono2 - mono1, wait)
    else:
        announced = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
        assert wall2 >= announced - 1e-3, (wall2, announced)


# -- not retried --------------------------------------------------------------------------


def test_400_is_rejected_not_retried(server: FakeArkServer) -> None:
    server.add_fault(Fault.bad_request("temperature must be <= 2", match="bad"))
    request = req("bad", temperature=5)
    res, client, _ = complete_one(config(server.base_url), request)
    assert res.status == "failed" and not res.ok
    assert res.error_type == "rejected"
    assert res.error_message == "temperature must be <= 2"
    assert res.error_code == "InvalidParameter"
    assert res.http_status == 400
    assert res.retryable is False
    assert res.attempts == 1 == server.attempts_by_key["bad"]
    assert res.request_json == request.raw  # kept so the row can be fixed and re-run
    assert res.content is None
    assert client.fatal is None and (client.ok, client.failed) == (0, 1)


def test_401_is_endpoint_error_and_fatal_when_every_answer_is_one(
    server: FakeArkServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.add_fault(Fault.unauthorized(times=-1))
    cfg = config(server.base_url)
    fatal_seen: list[str | None] = []

    async def fn(client: ArkClient) -> list[ChatResult]:
        out = []
        for i in range(FATAL_AFTER):
            out.append(await client.complete(req(f"u{i}")))
            fatal_seen.append(client.fatal)
        return out

    holder: dict[str, ArkClient] = {}

    async def keep(client: ArkClient) -> list[ChatResult]:
        holder["c"] = client
        return await fn(client)

    results = run(cfg, keep)
    client = holder["c"]
    for res in results:
        assert res.status == "failed" and res.error_type == "endpoint_error"
        assert res.http_status == 401 and res.error_code == "AuthenticationError"
        assert res.retryable is False and res.attempts == 1
    assert fatal_seen[:-1] == [None] * (FATAL_AFTER - 1)
    assert client.fatal is not None and fatal_seen[-1] == client.fatal
    assert "HTTP 401" in client.fatal
    assert KEY_ENV in client.fatal and SECRET not in client.fatal
    assert server.total_requests == FATAL_AFTER
    assert any(r.levelno == logging.ERROR and "HTTP 401" in r.getMessage() for r in caplog.records)


def test_endpoint_errors_after_another_answer_are_not_fatal(server: FakeArkServer) -> None:
    # One 400 first: the endpoint and key work, so later 401s are per-request problems.
    server.add_fault(Fault.bad_request("no", match="b"))
    server.add_fault(Fault.unauthorized(match="u", times=-1))

    async def fn(client: ArkClient) -> tuple[str | None, int]:
        assert (await client.complete(req("b"))).error_type == "rejected"
        for _ in range(FATAL_AFTER + 2):
            assert (await client.complete(req("u"))).error_type == "endpoint_error"
        return client.fatal, client.failed

    assert run(config(server.base_url), fn) == (None, FATAL_AFTER + 3)


def test_endpoint_errors_after_a_success_are_not_fatal(server: FakeArkServer) -> None:
    server.add_fault(Fault.unauthorized(match="u", times=-1))

    async def fn(client: ArkClient) -> str | None:
        assert (await client.complete(req("fine"))).ok
        for _ in range(4):
            assert (await client.complete(req("u"))).error_type == "endpoint_error"
        return client.fatal

    assert run(config(server.base_url), fn) is None


def test_wrong_key_is_fatal_without_leaking_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeArkServer(api_key="the-right-key") as srv:
        results, client, _ = complete_all(config(srv.base_url), [req(f"w{i}") for i in range(FATAL_AFTER)])
    assert all(r.error_type == "endpoint_error" and r.http_status == 401 for r in results)
    assert client.fatal is not None and "401" in client.fatal
    assert SECRET not in client.fatal
    for res in results:
        assert SECRET not in repr(res)


def test_invalid_json_forever_is_bounded(server: FakeArkServer) -> None:
    server.add_fault(Fault.invalid_json(match="junk", times=-1))
    cfg = config(server.base_url, max_invalid_responses=4)
    res, _, _ = complete_one(cfg, req("junk"))
    assert res.status == "failed" and res.error_type == "invalid_response"
    assert res.attempts == 4 == cfg.max_invalid_responses == server.attempts_by_key["junk"]
    assert res.http_status == 200


# -- deadlines ----------------------------------------------------------------------------


def test_retry_after_beyond_deadline_fails_at_once(server: FakeArkServer) -> None:
    server.add_fault(Fault.rate_limited("5", match="late"))
    res, _, _ = complete_one(config(server.base_url, timeout=1.0), req("late"))
    assert res.status == "failed" and res.error_type == "deadline_exceeded"
    assert res.attempts == 1 == server.total_requests
    assert res.http_status == 429 and res.retryable is True
    assert "rate_limited" in (res.error_message or "")


def test_server_error_forever_ends_at_deadline(server: FakeArkServer) -> None:
    server.add_fault(Fault.server_error(500, match="down", times=-1))
    timeout = 1.0
    res, _, _ = complete_one(config(server.base_url, timeout=timeout, max_attempts=0), req("down"))
    assert res.status == "failed" and res.error_type == "deadline_exceeded"
    assert res.http_status == 500 and res.error_code == "InternalServiceError"
    assert res.attempts > 5 and res.attempts == server.attempts_by_key["down"]


def test_held_attempt_is_bounded_by_the_deadline(server: FakeArkServer) -> None:
    server.add_fault(Fault.hold(10.0, match="stuck"))
    timeout = 1.0
    res, _, _ = complete_one(config(server.base_url, timeout=timeout), req("stuck"))
    assert res.status == "failed" and res.error_type == "deadline_exceeded"
    assert res.attempts == 1


def test_connection_refused_ends_deadline_exceeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = config(f"http://127.0.0.1:{closed_port()}/api/v3", timeout=1.0)
    res, _, _ = complete_one(cfg, req("nobody"))
    assert res.status == "failed" and res.error_type == "deadline_exceeded"
    assert "connect" in (res.error_message or "").lower(), res.error_message
    assert res.attempts > 1
    assert SECRET not in (res.error_message or "")


def test_slot_wait_before_first_send_does_not_count_against_deadline(
    server: FakeArkServer,
) -> None:
    # One slot, 0.15 s per answer, 8 requests: the last waits ~1 s for the slot, beyond the
    # 1 s timeout, yet the deadline starts at its first send.
    server.latency = 0.15
    cfg = config(server.base_url, max_concurrency=1, timeout=1.0)
    results, _, _ = complete_all(cfg, [req(f"s{i}") for i in range(8)])
    assert all(r.ok and r.attempts == 1 for r in results), [r.error_type for r in results]
    assert all((r.latency_ms or 0) < 900 for r in results)
    assert server.peak_in_flight == 1


# -- attempt timeout and holds ------------------------------------------------------------


def test_attempt_timeout_retries_a_held_attempt(server: FakeArkServer) -> None:
    server.add_fault(Fault.hold(2.0, match="slow", times=1))
    cfg = config(server.base_url, attempt_timeout=0.3, timeout=10.0)
    res, _, _ = complete_one(cfg, req("slow"))
    assert res.ok and res.attempts == 2 == server.attempts_by_key["slow"]
    assert_distinct_request_ids(server, res, 2)


def test_hold_without_attempt_timeout_is_waited_out(server: FakeArkServer) -> None:
    server.add_fault(Fault.hold(0.6, match="queued"))
    res, _, _ = complete_one(config(server.base_url, timeout=5.0), req("queued"))
    assert res.ok and res.attempts == 1 == server.total_requests


def test_held_request_answers_when_released(server: FakeArkServer) -> None:
    server.add_fault(Fault.hold(30.0, match="held"))

    async def fn(client: ArkClient) -> ChatResult:
        task = asyncio.create_task(client.complete(req("held")))
        assert await asyncio.to_thread(server.wait_for_requests, 1, 10)
        assert not task.done()
        server.release_holds()
        return await task

    res = run(config(server.base_url, timeout=60.0), fn)
    assert res.ok and res.attempts == 1


def test_slot_wait_does_not_count_against_the_attempt(server: FakeArkServer) -> None:
    server.latency = 0.1
    cfg = config(server.base_url, max_concurrency=1, attempt_timeout=0.2)
    results, client, _ = complete_all(cfg, [req(f"a{i}") for i in range(10)])
    assert all(r.ok and r.attempts == 1 for r in results), [r.error_type for r in results]
    assert server.total_requests == 10 == client.attempts
    assert server.peak_in_flight == 1


# -- concurrency and pushback -------------------------------------------------------------


def test_in_flight_cap_holds_under_1000_concurrent_calls(server: FakeArkServer) -> None:
    server.latency = 0.005
    cfg = config(server.base_url, max_concurrency=50)
    results, client, elapsed = complete_all(cfg, [req(f"c{i}") for i in range(1000)])
    print(f"\n1000 requests, cap 50: peak_in_flight={server.peak_in_flight}, {elapsed:.2f}s")
    assert all(r.ok for r in results)
    assert server.peak_in_flight <= 50
    assert server.peak_in_flight >= 10  # the cap is actually used
    assert server.total_requests == 1000 == client.ok


@pytest.mark.parametrize("form", ["seconds", "float", "http-date", "ms"])
def test_global_pause_is_honoured_by_all_callers(server: FakeArkServer, form: str) -> None:
    cap, n, pause = 20, 200, 1.0
    server.pause(pause, retry_after_form=form)
    pause_ends_at = server.pause_ends_at
    assert pause_ends_at is not None
    arrivals = record_arrivals(server)
    results, client, elapsed = complete_all(
        config(server.base_url, max_concurrency=cap), [req(f"p{i}") for i in range(n)]
    )
    during = server.requests_during_pause
    print(
        f"\npause form={form}: requests_during_pause={during} total_requests="
        f"{server.total_requests} elapsed={elapsed:.2f}s paused_s={client.paused_seconds:.2f}"
    )
    assert all(r.ok for r in results), {r.error_type for r in results}
    assert 1 <= during <= cap
    # Every refused request was retried once, after the pause: none was refused twice.
    assert server.total_requests == n + during
    assert server.statuses[429] == during and server.statuses[200] == n
    assert all(t < pause_ends_at for t, _ in arrivals[:during])
    assert all(t >= pause_ends_at for t, _ in arrivals[during:])
    assert sum(r.attempts for r in results) == n + during


def test_lone_429_does_not_stall_the_others(server: FakeArkServer) -> None:
    server.latency = 0.01
    server.add_fault(Fault.rate_limited("2", match="lone"))
    arrivals: list[tuple[float, int]] = []
    server.on_request(lambda n: arrivals.append((time.monotonic(), n)))

    async def fn(client: ArkClient) -> tuple[ChatResult, list[ChatResult], float, bool, float]:
        t0 = time.monotonic()
        lone = asyncio.create_task(client.complete(req("lone")))
        others = [asyncio.create_task(client.complete(req(f"o{i}"))) for i in range(100)]
        done_others = await asyncio.gather(*others)
        t_others = time.monotonic() - t0
        lone_pending = not lone.done()
        lone_res = await lone
        return lone_res, list(done_others), t_others, lone_pending, time.monotonic() - t0

    lone_res, others, t_others, lone_pending, t_lone = run(config(server.base_url, max_concurrency=10), fn)
    print(f"\nlone 429: 100 others done in {t_others:.2f}s, lone request in {t_lone:.2f}s")
    assert all(r.ok and r.attempts == 1 for r in others)
    assert t_others < 1.5, t_others
    assert lone_pending
    assert lone_res.ok and lone_res.attempts == 2 == server.attempts_by_key["lone"]
    assert t_lone >= 2.0


# -- the API key stays secret -------------------------------------------------------------


def test_api_key_never_leaks(server: FakeArkServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.add_fault(Fault.bad_request("bad thing", match="b"))
    server.add_fault(Fault.server_error(500, match="e"))
    server.add_fault(Fault.reset(match="r"))
    server.add_fault(Fault.invalid_json(match="j", times=-1))
    server.add_fault(Fault.unauthorized(match="u", times=-1))
    cfg = config(server.base_url, max_invalid_responses=2)
    keys = ["u", "b", "e", "r", "j", "ok"]
    holder: dict[str, ArkClient] = {}

    async def fn(client: ArkClient) -> list[ChatResult]:
        holder["c"] = client
        out = [await client.complete(req("u")) for _ in range(FATAL_AFTER)]  # -> fatal, logged
        out += await asyncio.gather(*(client.complete(req(k)) for k in keys[1:]))
        return out

    results = run(cfg, fn)
    client = holder["c"]
    assert client.fatal is not None and caplog.records  # the checks below are not vacuous
    assert {r.status for r in results} == {"ok", "failed"}
    assert SECRET not in repr(client)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.describe())
    assert SECRET not in client.fatal
    for res in results:
        for field, value in res.to_row().items():
            assert SECRET not in str(value), field
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in (record.exc_text or "")


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARKBATCH_OTHER_VAR", SECRET)  # a key elsewhere must not show up
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv(KEY_ENV, raising=False)
        else:
            monkeypatch.setenv(KEY_ENV, value)
        cfg = config(f"http://127.0.0.1:{closed_port()}/api/v3")
        client = ArkClient(cfg)
        with pytest.raises(MissingApiKey) as info:
            asyncio.run(client.complete(req("k")))
        text = str(info.value)
        assert KEY_ENV in text and SECRET not in text
        assert SECRET not in repr(client)


# -- robustness ---------------------------------------------------------------------------


def test_cancelled_call_gives_its_slot_back(server: FakeArkServer) -> None:
    # A caller may cancel complete() (asyncio.wait_for, shutdown): its slot must come back,
    # or with max_concurrency=1 every later request would wait forever.
    server.add_fault(Fault.hold(30.0, match="abandoned"))

    async def fn(client: ArkClient) -> ChatResult:
        task = asyncio.create_task(client.complete(req("abandoned")))
        assert await asyncio.to_thread(server.wait_for_requests, 1, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5.0):
            return await client.complete(req("next"))

    res = run(config(server.base_url, max_concurrency=1), fn)
    assert res.ok and res.attempts == 1
    server.release_holds()


def test_retry_waiting_on_a_paused_gate_still_ends_at_its_deadline(server: FakeArkServer) -> None:
    # "b" is refused with 503 + Retry-After: 5 (overloaded), which pauses the gate for 5 s; "a"
    # keeps getting 500s, and its next retry waits for the paused gate: it must give up at its
    # own deadline.
    server.add_fault(Fault.server_error(500, match="a", times=-1))
    server.add_fault(Fault.server_error(503, match="b", headers={"Retry-After": "5"}))
    timeout = 1.0

    async def fn(client: ArkClient) -> tuple[ChatResult, ChatResult, bool]:
        a, b = await asyncio.gather(client.complete(req("a")), client.complete(req("b")))
        return a, b, client.gate("ep-test").paused

    a, b, still_paused = run(config(server.base_url, max_concurrency=4, timeout=timeout, max_attempts=0), fn)
    assert b.error_type == "deadline_exceeded" and b.attempts == 1
    assert a.error_type == "deadline_exceeded" and a.http_status == 500
    assert still_paused  # "a" gave up while the 5 s pause was still on


def test_a_key_echoed_by_the_server_is_redacted(server: FakeArkServer) -> None:
    server.add_fault(Fault.bad_request(f"invalid token Bearer {SECRET} for this model", match="echo"))
    (res,) = complete_all(config(server.base_url), [req("echo")])[0]
    assert res.error_type == "rejected" and res.http_status == 400
    assert res.error_message == "invalid token Bearer [redacted] for this model"
    for value in res.to_row().values():
        assert SECRET not in str(value)


def test_token_counts_outside_int64_are_dropped_not_fatal() -> None:
    from arkbatch_beam._client import parse_completion

    res = ChatResult("x", "ok")
    body = {"id": "c", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": 3, "total_tokens": -(2**70)}}
    parse_completion(json.dumps(body).encode(), res)  # (orjson refuses ints this big)
    assert (res.prompt_tokens, res.completion_tokens, res.total_tokens) == (None, 3, None)


def test_an_oversized_body_is_an_invalid_response_not_a_memory_hog(server: FakeArkServer, monkeypatch) -> None:

    monkeypatch.setattr(_attempt, "MAX_RESPONSE_BYTES", 64)  # every fake answer is bigger
    (res,) = complete_all(config(server.base_url, max_invalid_responses=2), [req("big")])[0]
    assert res.status == "failed" and res.error_type == "invalid_response"
    assert "over 64 bytes" in res.error_message and res.attempts == 2


def test_max_requests_per_second_bounds_the_send_rate(server: FakeArkServer) -> None:
    arrivals = record_arrivals(server)
    cfg = config(server.base_url, max_concurrency=50, max_requests_per_second=50.0)
    results, client, _ = complete_all(cfg, [req(f"r{i}") for i in range(30)])
    assert all(r.ok for r in results) and client.gate("ep-test").max_rate == 50.0
    starts = sorted(m for m, _ in arrivals)
    assert len(starts) == 30
    # A tenth of a second's worth (5) may go at once; the other 25 wait for tokens at 50/s.
    assert starts[-1] - starts[0] >= 25 / 50.0 - 0.02
    for k in range(5, 30):  # never more than 5 + 50 x elapsed sent by any arrival
        assert starts[k] - starts[0] >= (k - 4) / 50.0 - 0.02


def test_the_client_alone_imports_neither_beam_nor_pyarrow() -> None:
    import subprocess
    import sys

    code = ("import sys, arkbatch_beam as a; a.ArkClient, a.ClientConfig, a.PushbackGate; "
            "print(sorted(m for m in ('apache_beam', 'pyarrow') if m in sys.modules)); "
            "a.BatchChatInference; print('apache_beam' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]
