"""Tests for the fake Ark batch-inference server (arkbatch_beam.testing)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import email.utils
import http.client
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from arkbatch_beam.testing import FakeArkServer, Fault, fake_server

pytestmark = pytest.mark.timeout(30)

BATCH = "/api/v3/batch/chat/completions"
CHAT = "/api/v3/chat/completions"
OPENAI = "/v1/chat/completions"
AUTH = {"Authorization": "Bearer test-key"}


class Reply:
    """A received HTTP answer."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Store the status, the (lower-cased) headers and the raw body."""
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    def json(self) -> Any:
        """Decode the body as JSON."""
        return orjson.loads(self.body)


def post(
    srv: FakeArkServer,
    payload: Any = None,
    *,
    path: str = BATCH,
    headers: Mapping[str, str] | None = AUTH,
    raw: bytes | None = None,
) -> Reply:
    """POST ``payload`` (or ``raw`` bytes) to the fake server and return the reply."""
    body = raw if raw is not None else orjson.dumps(payload)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    with contextlib.closing(conn):
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, dict(resp.getheaders()), resp.read())


def chat(key: str, model: str = "ep-test", **extra: Any) -> dict[str, Any]:
    """A minimal chat request whose key (last user message) is ``key``."""
    return {"model": model, "messages": [{"role": "user", "content": key}], **extra}


@pytest.fixture
def srv() -> Iterator[FakeArkServer]:
    """A running fake server with the default key ``test-key``."""
    with FakeArkServer() as server:
        yield server


def test_ok_answer_shape_and_determinism(srv: FakeArkServer) -> None:
    payload = {
        "model": "ep-m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "what is two plus two"},
        ],
    }
    first, second = post(srv, payload), post(srv, payload)
    assert first.status == 200 and first.headers["content-type"].startswith(
        "application/json"
    )
    assert first.body == second.body
    answer = first.json()
    assert (
        answer["id"].startswith("chatcmpl-")
        and len(answer["id"]) == len("chatcmpl-") + 12
    )
    assert answer["object"] == "chat.completion" and answer["model"] == "ep-m"
    assert answer["created"] == 1700000000
    (choice,) = answer["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "echo: what is two plus two"},
        "finish_reason": "stop",
    }
    assert answer["usage"] == {
        "prompt_tokens": 2 + 2 + 1 + 5,
        "completion_tokens": 6,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert post(srv, chat("other")).json()["id"] != answer["id"]

    parts = (
        {"type": "text", "text": "a b"},
        {"type": "image_url"},
        {"type": "text", "text": "c"},
    )
    thinking = post(
        srv,
        {"model": "m-thinking", "messages": [{"role": "user", "content": list(parts)}]},
    ).json()
    message = thinking["choices"][0]["message"]
    assert message["content"] == "echo: a b c"
    assert message["reasoning_content"] == "thinking about: a b c"
    assert thinking["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    assert srv.ok_by_key == {"what is two plus two": 2, "other": 1, "a b c": 1}
    assert srv.total_requests == srv.ok_responses == 4 and srv.statuses == {200: 4}


def test_auth_rejects_without_echoing_the_key(srv: FakeArkServer) -> None:
    wrong = post(
        srv, chat("k"), headers={"Authorization": "Bearer sk-secret-wrong-123"}
    )
    missing = post(srv, chat("k"), headers=None)
    for reply in (wrong, missing):
        assert reply.status == 401
        assert reply.json()["error"] == {
            "code": "AuthenticationError",
            "message": reply.json()["error"]["message"],
            "type": "Unauthorized",
            "param": "",
        }
    assert b"sk-secret-wrong-123" not in wrong.body
    assert not any("sk-secret" in v for v in wrong.headers.values())
    assert (
        srv.attempts_by_key["k"] == 2
        and srv.ok_responses == 0
        and srv.statuses == {401: 2}
    )

    with FakeArkServer(api_key=None) as open_srv:
        assert post(open_srv, chat("k"), headers=None).status == 200


def test_bad_requests_and_stream_rule(srv: FakeArkServer) -> None:
    for raw in (
        b"{not json",
        b"[1, 2]",
        b'{"model": "m"}',
        b'{"model": "m", "messages": []}',
    ):
        reply = post(srv, raw=raw)
        assert reply.status == 400
        assert reply.json()["error"]["code"] == "InvalidParameter"
        assert reply.json()["error"]["type"] == "BadRequest"
        assert reply.json()["error"]["param"] == "messages"

    streamed = post(srv, chat("s", stream=True))
    assert streamed.status == 400 and streamed.json()["error"]["param"] == "stream"
    for path in (OPENAI, CHAT):
        reply = post(srv, chat("s", stream=True), path=path)
        assert (
            reply.status == 200
            and reply.json()["choices"][0]["message"]["content"] == "echo: s"
        )
    assert srv.statuses == {400: 5, 200: 2}


def test_status_faults_match_order_and_times(srv: FakeArkServer) -> None:
    srv.add_fault(
        Fault.rate_limited("250", header="retry-after-ms", match="a", times=2)
    )
    srv.add_fault(Fault.server_error(503, headers={"Retry-After": "7"}, match="a"))
    srv.add_fault(Fault.bad_request("nope", match="b", times=-1))
    srv.add_fault(Fault.unauthorized(match="c"))

    first, second = post(srv, chat("a")), post(srv, chat("a"))
    for reply in (first, second):
        assert reply.status == 429 and reply.headers["retry-after-ms"] == "250"
        assert reply.json()["error"]["code"] == "RateLimitExceeded.EndpointRPMExceeded"
        assert reply.json()["error"]["type"] == "TooManyRequests"
    third = post(srv, chat("a"))
    assert third.status == 503 and third.headers["retry-after"] == "7"
    assert third.json()["error"]["code"] == "InternalServiceError"
    assert post(srv, chat("a")).status == 200

    for _ in range(3):
        reply = post(srv, chat("b"))
        assert reply.status == 400 and reply.json()["error"]["message"] == "nope"
    unauthorized = post(srv, chat("c"))
    assert unauthorized.status == 401
    assert unauthorized.json()["error"]["code"] == "AuthenticationError"
    assert post(srv, chat("c")).status == 200
    assert [remaining for _, remaining in srv.pending_faults()] == [-1]
    assert srv.attempts_by_key == {"a": 4, "b": 3, "c": 2}
    assert srv.ok_by_key == {"a": 1, "c": 1}


def test_body_faults_truncate_invalid_json_empty(srv: FakeArkServer) -> None:
    good = post(srv, chat("x")).body
    srv.add_fault(Fault.truncate())
    srv.add_fault(Fault.invalid_json())
    srv.add_fault(Fault.empty())
    truncated, invalid, empty = (post(srv, chat("x")) for _ in range(3))
    assert truncated.status == 200 and truncated.body == good[: len(good) // 2]
    with pytest.raises(orjson.JSONDecodeError):
        truncated.json()
    assert invalid.status == 200 and invalid.body == b"not json"
    assert empty.status == 200 and empty.body == b""
    assert (
        srv.statuses == {200: 4} and srv.ok_responses == 1 and srv.ok_by_key == {"x": 1}
    )


def test_reset_fault_drops_the_connection(srv: FakeArkServer) -> None:
    srv.add_fault(Fault.reset(match="r"))
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        post(srv, chat("r"))
    assert post(srv, chat("r")).status == 200
    assert srv.attempts_by_key["r"] == 2 and srv.statuses == {200: 1}
    assert srv.in_flight == 0


@pytest.mark.parametrize("form", ["seconds", "float", "http-date", "ms"])
def test_pause_announces_its_end(srv: FakeArkServer, form: str) -> None:
    srv.pause(30, retry_after_form=form)
    assert srv.pause_started_at is not None and srv.pause_ends_at is not None
    replies = [post(srv, chat(f"p{i}")) for i in range(3)]
    for reply in replies:
        assert (
            reply.status == 429 and reply.json()["error"]["code"] == "ServerOverloaded"
        )
    header = replies[0].headers
    remaining = srv.pause_ends_at - time.monotonic()
    if form == "seconds":
        assert header["retry-after"] in {"30", "31"}
    elif form == "float":
        assert 29.0 < float(header["retry-after"]) <= 30.0
        assert len(header["retry-after"].split(".")[1]) == 3
    elif form == "ms":
        assert 29_000 < int(header["retry-after-ms"]) <= 30_000
        assert "retry-after" not in header
    else:
        end = email.utils.parsedate_to_datetime(header["retry-after"]).timestamp()
        assert header["retry-after"].endswith(" GMT")
        assert end == math.ceil(end) and abs((end - time.time()) - remaining) < 0.05
        assert 30 - 0.5 < srv.pause_ends_at - srv.pause_started_at <= 31
    assert srv.requests_during_pause == 3 and len(srv.pause_arrival_times) == 3
    assert srv.pause_arrival_times == sorted(srv.pause_arrival_times)
    assert all(0 < t < 5 for t in srv.pause_arrival_times)
    assert srv.ok_responses == 0 and srv.total_requests == 3

    srv.pause(0)  # end the pause early
    assert post(srv, chat("after")).status == 200
    assert srv.requests_during_pause == 3


def test_pause_skips_latency_and_expires(srv: FakeArkServer) -> None:
    srv.latency = 5.0  # paused answers are immediate, whatever the latency
    srv.pause(30)
    started = time.monotonic()
    assert post(srv, chat("q")).status == 429
    assert time.monotonic() - started < 2
    srv.latency = 0.0

    srv.pause(0.05, retry_after_form="ms")
    refused = 0
    deadline = time.monotonic() + 5
    while (reply := post(srv, chat("q"))).status == 429:
        refused += 1
        assert int(reply.headers["retry-after-ms"]) <= 50
        assert time.monotonic() < deadline
    assert reply.status == 200
    assert srv.pause_ends_at is not None and time.monotonic() >= srv.pause_ends_at
    assert refused >= 1 and srv.requests_during_pause == refused


def test_hold_release_and_peak_in_flight(srv: FakeArkServer) -> None:
    srv.add_fault(Fault.hold(30, times=-1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(post, srv, chat(f"h{i}")) for i in range(6)]
        assert srv.wait_for_requests(6, timeout=10)
        srv.release_holds()
        replies = [f.result(timeout=10) for f in futures]
    assert all(r.status == 200 for r in replies)
    assert srv.peak_in_flight == 6 and srv.in_flight == 0 and srv.ok_responses == 6

    srv.clear_faults()
    quick = Fault.hold(0.01)
    assert (
        quick.kind == "hold"
        and quick.hold == 0.01
        and hash(quick) == hash(Fault.hold(0.01))
    )
    srv.add_fault(quick)
    assert post(srv, chat("short")).status == 200


def test_stop_cancels_held_requests() -> None:
    server = FakeArkServer().start()
    server.add_fault(Fault.hold(60))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(post, server, chat("held"))
        assert server.wait_for_requests(1, timeout=10)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            future.result(timeout=10)


def test_on_request_callbacks_and_wait_for_requests(srv: FakeArkServer) -> None:
    seen: list[int] = []

    def broken(total: int) -> None:
        raise RuntimeError("callback failure must not break the server")

    srv.on_request(broken)
    srv.on_request(seen.append)
    for i in range(3):
        assert post(srv, chat(str(i))).status == 200
    assert seen == [1, 2, 3]
    assert srv.wait_for_requests(3, timeout=1)
    assert not srv.wait_for_requests(4, timeout=0.01)

    srv.reset_counters()
    assert srv.total_requests == 0 and not srv.attempts_by_key and not srv.statuses
    post(srv, chat("again"))
    assert seen[-1] == 1 and srv.snapshot()["ok_by_key"] == {"again": 1}


def test_request_id_echo_and_latency(srv: FakeArkServer) -> None:
    with_id = post(srv, chat("i"), headers={**AUTH, "X-Client-Request-Id": "req-42"})
    assert with_id.headers["x-request-id"] == "req-42"
    srv.add_fault(Fault.server_error(500))
    failed = post(srv, chat("i"), headers={**AUTH, "X-Client-Request-Id": "req-43"})
    assert failed.status == 500 and failed.headers["x-request-id"] == "req-43"
    without = post(srv, chat("i"))
    assert "x-request-id" not in without.headers
    assert srv.client_request_ids == ["req-42", "req-43", ""]

    srv.latency, srv.latency_jitter = 0.05, 0.02
    started = time.monotonic()
    assert post(srv, chat("slow")).status == 200
    assert 0.05 <= time.monotonic() - started < 2


def test_fault_validation_and_urls() -> None:
    with pytest.raises(ValueError):
        Fault("explode")
    with pytest.raises(ValueError):
        Fault("reset", times=0)
    fault = Fault("status", status=502, headers={"Retry-After": "1"})
    assert fault.headers == (("Retry-After", "1"),) and hash(fault) == hash(
        Fault("status", status=502, headers={"Retry-After": "1"})
    )
    assert Fault.rate_limited(None).headers == ()
    with FakeArkServer() as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/api/v3"
        assert server.openai_base_url == f"http://127.0.0.1:{server.port}/v1"


@contextlib.contextmanager
def cli_server(*args: str):
    """The fake server's command line in a subprocess: yields (process, its first line); on a
    clean exit of the block it must stop on SIGTERM with status 0."""
    # Run the module file directly: same main() as ``python -m
    # arkbatch_beam.testing.fake_server`` without importing the whole package
    # (and Apache Beam) in the subprocess, which keeps these tests fast.
    cmd = [sys.executable, str(Path(fake_server.__file__)), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_command_line_server() -> None:
    with cli_server("--api-key", "cli-key") as (_, line):
        assert line.startswith("listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with contextlib.closing(conn):
            conn.request(
                "POST",
                OPENAI,
                body=orjson.dumps(chat("cli")),
                headers={"Authorization": "Bearer cli-key"},
            )
            resp = conn.getresponse()
            assert (
                resp.status == 200
                and orjson.loads(resp.read())["choices"][0]["message"]["content"]
                == "echo: cli"
            )


# ---------------------------------------------------------------- quota mode


class ManualClock:
    """A clock that moves only when the test moves it (read from the server thread)."""

    def __init__(self) -> None:
        """Start at 0."""
        self.now = 0.0

    def __call__(self) -> float:
        """The current reading."""
        return self.now


@pytest.fixture
def clocked() -> Iterator[tuple[FakeArkServer, ManualClock]]:
    """A running fake server on a manual clock (pause, quota and timeline use it)."""
    clock = ManualClock()
    with FakeArkServer(clock=clock) as server:
        yield server, clock


def burst(srv: FakeArkServer, n: int, key: str = "q", client: str = "c") -> list[Reply]:
    """``n`` requests one after the other, with request ids ``<client>-<i>``."""
    return [
        post(srv, chat(key), headers={**AUTH, "X-Client-Request-Id": f"{client}-{i}"})
        for i in range(n)
    ]


def until_refused(srv: FakeArkServer, key: str = "q") -> tuple[int, Reply]:
    """Send until the quota refuses; return the number admitted and the refusal."""
    admitted = 0
    while (reply := post(srv, chat(key))).status == 200:
        admitted += 1
        assert admitted < 1000
    return admitted, reply


def test_quota_admits_at_the_configured_rate(
    clocked: tuple[FakeArkServer, ManualClock],
) -> None:
    srv, clock = clocked
    assert srv.quota is None
    srv.set_quota(requests_per_second=10)  # holds 1 s: 10 requests
    replies = burst(srv, 15, client="alpha")
    assert [r.status for r in replies] == [200] * 10 + [429] * 5
    refusal = replies[-1]
    assert refusal.json()["error"]["code"] == "RateLimitExceeded.EndpointRPMExceeded"
    assert refusal.json()["error"]["type"] == "TooManyRequests"
    assert refusal.headers["retry-after"] == "0.1" and refusal.headers["retry-after-ms"] == "100"
    assert srv.ok_responses == 10 and srv.total_requests == 15
    assert srv.quota_refusals == {"RateLimitExceeded.EndpointRPMExceeded": 5}
    assert srv.accepted_by_client == {"alpha": 10} and srv.refused_by_client == {"alpha": 5}

    clock.now = 0.35  # 3.5 requests earned: 3 in, the 4th told to wait the 0.05 s left (0.1 s step)
    admitted, refusal = until_refused(srv)
    assert admitted == 3 and refusal.headers["retry-after"] == "0.1"

    # Ten more seconds in steps of 0.05 s, sending until refused each time: exactly the rate.
    admitted = 0
    for step in range(1, 201):
        clock.now = 0.35 + step * 0.05
        got, refusal = until_refused(srv)
        admitted += got
        assert float(refusal.headers["retry-after"]) <= 0.1
    assert admitted == 100
    timeline = srv.timeline()
    assert [row[0] for row in timeline] == [float(s) for s in range(11)]
    assert [row[1] for row in timeline[1:10]] == [10] * 9  # accepted per whole second
    assert sum(row[1] for row in timeline) == srv.ok_responses == 113
    assert sum(row[2] for row in timeline) == sum(srv.quota_refusals.values())
    assert srv.snapshot()["quota_refusals"] == srv.quota_refusals
    assert srv.quota == {
        "requests_per_second": 10,
        "tokens_per_minute": None,
        "burst_seconds": 1.0,
        "retry_after_step": 0.1,
    }


def test_quota_is_shared_by_concurrent_clients(
    clocked: tuple[FakeArkServer, ManualClock],
) -> None:
    srv, _ = clocked
    srv.set_quota(requests_per_second=12, burst_seconds=1.0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [
            pool.submit(
                post, srv, chat(f"k{i}"), headers={**AUTH, "X-Client-Request-Id": f"p{i % 3}-{i}"}
            )
            for i in range(60)
        ]
        statuses = collections.Counter(f.result(timeout=20).status for f in futures)
    assert statuses == {200: 12, 429: 48}
    assert sum(srv.accepted_by_client.values()) == 12
    assert sum(srv.refused_by_client.values()) == 48
    assert set(srv.accepted_by_client) | set(srv.refused_by_client) == {"p0", "p1", "p2"}
    for name in ("p0", "p1", "p2"):
        ((start, accepted, refused),) = srv.timeline(client=name)
        assert start == 0.0 and accepted == srv.accepted_by_client[name]
        assert refused == srv.refused_by_client[name]
    assert srv.timeline(client="nobody") == []


def test_quota_tokens_per_minute(clocked: tuple[FakeArkServer, ManualClock]) -> None:
    srv, clock = clocked
    srv.set_quota(tokens_per_minute=600)  # 10 tokens a second, holds 10
    first = post(srv, chat("a b c"))
    assert first.status == 200 and first.json()["usage"]["total_tokens"] == 3 + 4  # costs 7
    refusal = post(srv, chat("a b c"))  # 3 left, 7 needed: 0.4 s
    assert refusal.status == 429
    assert refusal.json()["error"]["code"] == "RateLimitExceeded.EndpointTPMExceeded"
    assert refusal.headers["retry-after"] == "0.4" and refusal.headers["retry-after-ms"] == "400"
    clock.now = 0.39
    assert post(srv, chat("a b c")).status == 429
    clock.now = 0.4
    assert post(srv, chat("a b c")).status == 200

    # A request larger than the bucket gets in once the bucket is full, and leaves a debt.
    big = " ".join(["w"] * 20)  # 20 + 21 tokens
    clock.now = 1.0
    assert post(srv, chat(big)).status == 429
    clock.now = 1.4
    assert post(srv, chat(big)).status == 200  # level 10 - 41 = -31
    after = post(srv, chat("a b c"))
    assert after.headers["retry-after"] == "3.8"  # (7 + 31) / 10
    assert srv.quota_refusals == {"RateLimitExceeded.EndpointTPMExceeded": 4}

    # Both limits: the refusal names the bucket that makes the longer wait.
    clock.now = 10.0
    srv.set_quota(requests_per_second=1, tokens_per_minute=600)
    assert post(srv, chat("a b c")).status == 200  # rps bucket empty, tokens 3 left
    both = post(srv, chat("a b c"))  # rps: 1 s, tokens: 0.4 s
    assert both.json()["error"]["code"] == "RateLimitExceeded.EndpointRPMExceeded"
    assert both.headers["retry-after"] == "1"
    clock.now = 11.0
    assert post(srv, chat(big)).status == 200  # both full again; tokens left: -31
    clock.now = 12.0
    both = post(srv, chat("a b c"))  # rps: admits, tokens: (7 + 21) / 10 s
    assert both.json()["error"]["code"] == "RateLimitExceeded.EndpointTPMExceeded"
    assert both.headers["retry-after"] == "2.8"
    assert srv.quota_refusals == {
        "RateLimitExceeded.EndpointTPMExceeded": 5,
        "RateLimitExceeded.EndpointRPMExceeded": 1,
    }


def test_set_quota_mid_run_and_off(clocked: tuple[FakeArkServer, ManualClock]) -> None:
    srv, clock = clocked
    srv.set_quota(requests_per_second=10)
    assert until_refused(srv)[0] == 10
    clock.now = 1.0  # full again: 10
    srv.set_quota(requests_per_second=5)  # halved: the level is capped, no extra burst
    admitted, refusal = until_refused(srv)
    assert admitted == 5 and refusal.headers["retry-after"] == "0.2"
    clock.now = 2.0
    assert until_refused(srv)[0] == 5

    srv.set_quota(None, None)  # off
    assert srv.quota is None
    assert all(r.status == 200 for r in burst(srv, 20))
    srv.set_quota(requests_per_second=2, retry_after_step=None)  # a new bucket starts full
    admitted, refusal = until_refused(srv)
    assert admitted == 2 and "retry-after" not in refusal.headers
    assert "retry-after-ms" not in refusal.headers
    srv.set_quota(requests_per_second=0.5, retry_after_step=1)
    assert post(srv, chat("q")).headers["retry-after"] == "2"

    for bad in (
        {"requests_per_second": 0},
        {"tokens_per_minute": -1},
        {"requests_per_second": 1, "burst_seconds": 0},
        {"requests_per_second": 1, "retry_after_step": 0},
    ):
        with pytest.raises(ValueError):
            srv.set_quota(**bad)

    srv.reset_counters()
    assert not srv.quota_refusals and srv.timeline() == [] and not srv.accepted_by_client
    assert srv.quota is not None and srv.quota["requests_per_second"] == 0.5


def test_announced_pause_answers_the_remaining_time(
    clocked: tuple[FakeArkServer, ManualClock],
) -> None:
    srv, clock = clocked
    srv.set_quota(requests_per_second=1)
    clock.now = 1.0
    srv.pause(5, status=503)
    for t, left in ((1.0, "5"), (2.5, "4"), (3.0, "3"), (5.9, "1")):
        clock.now = t
        reply = post(srv, chat("p"), headers={**AUTH, "X-Client-Request-Id": "w-1"})
        assert reply.status == 503 and reply.headers["retry-after"] == left
        assert reply.json()["error"]["code"] == "ServerOverloaded"
    assert srv.requests_during_pause == 4
    assert srv.pause_arrival_times == [0.0, 1.5, 2.0, 4.9]
    assert srv.refused_by_client == {"w": 4} and not srv.quota_refusals

    clock.now = 6.0  # the pause is over; refusals inside it spent no quota
    assert post(srv, chat("p")).status == 200
    assert post(srv, chat("p")).status == 429  # the quota again

    clock.now = 10.0
    srv.pause(2, retry_after_form="float")
    clock.now = 10.75
    reply = post(srv, chat("p"))
    assert reply.status == 429 and reply.headers["retry-after"] == "1.250"
    assert srv.timeline(bin_seconds=5.0) == [(0.0, 0, 3), (5.0, 1, 2), (10.0, 0, 1)]
    with pytest.raises(ValueError):
        srv.pause(1, status=200)


def test_command_line_server_with_a_quota() -> None:
    with cli_server("--no-auth", "--rps", "0.1", "--retry-after-step", "1") as (_, line):
        port = int(line.rsplit(":", 1)[1])
        answers = []
        for _ in range(2):  # the bucket holds one request; the next is due in 10 s
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with contextlib.closing(conn):
                conn.request("POST", CHAT, body=orjson.dumps(chat("cli")))
                resp = conn.getresponse()
                answers.append((resp.status, resp.getheader("Retry-After"), resp.read()))
        assert answers[0][0] == 200
        assert answers[1][0] == 429 and answers[1][1] in ("9", "10")  # (the real clock: 10 s less what passed)
        assert b"EndpointRPMExceeded" in answers[1][2]


# ---------------------------------------------------------------- HTTPS and connections


def test_connections_opened_counts_connections_not_requests(srv: FakeArkServer) -> None:
    assert srv.connections_opened == 0
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    with contextlib.closing(conn):
        for _ in range(3):  # keep-alive: three requests, one connection
            conn.request("POST", BATCH, body=orjson.dumps(chat("k")), headers=AUTH)
            assert conn.getresponse().read()
    post(srv, chat("k"))  # a new connection
    assert (srv.total_requests, srv.connections_opened) == (4, 2)
    assert srv.snapshot()["connections_opened"] == 2
    srv.reset_counters()
    assert srv.connections_opened == 0
    with pytest.raises(RuntimeError, match="tls=True"):
        _ = srv.ca_pem_path


def test_tls_server_certificate_verifies_against_its_ca_only() -> None:
    import ssl

    with FakeArkServer(tls=True) as server:
        assert server.base_url == f"https://127.0.0.1:{server.port}/api/v3"
        assert server.openai_base_url == f"https://127.0.0.1:{server.port}/v1"
        ca = server.ca_pem_path
        assert Path(ca).read_text().startswith("-----BEGIN CERTIFICATE-----")
        for host in ("127.0.0.1", "localhost"):  # the certificate names both
            ctx = ssl.create_default_context(cafile=ca)
            conn = http.client.HTTPSConnection(host, server.port, timeout=10, context=ctx)
            with contextlib.closing(conn):
                conn.request("POST", OPENAI, body=orjson.dumps(chat("tls")), headers=AUTH)
                resp = conn.getresponse()
                assert resp.status == 200
                assert orjson.loads(resp.read())["choices"][0]["message"]["content"] == "echo: tls"
        untrusted = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                                context=ssl.create_default_context())
        with contextlib.closing(untrusted), pytest.raises(ssl.SSLCertVerificationError):
            untrusted.request("POST", OPENAI, body=orjson.dumps(chat("tls")), headers=AUTH)
        # the failed handshake is a connection too; no request got through
        assert (server.connections_opened, server.total_requests) == (3, 2)
    assert not Path(ca).exists()  # the CA's file is removed when the server stops


def test_command_line_server_with_tls_and_stats() -> None:
    import ssl

    with cli_server("--api-key", "cli-key", "--tls") as (proc, line):
        assert line.startswith("listening on https://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        ca_line = proc.stdout.readline().strip()
        assert ca_line.startswith("ca_bundle ")
        ctx = ssl.create_default_context(cafile=ca_line.split(" ", 1)[1])
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        with contextlib.closing(conn):
            conn.request("POST", CHAT, body=orjson.dumps(chat("cli")), headers={"Authorization": "Bearer cli-key"})
            resp = conn.getresponse()
            assert resp.status == 200 and b"echo: cli" in resp.read()
            conn.request("GET", "/_fake/stats")  # same connection
            stats = orjson.loads(conn.getresponse().read())
        assert stats["total_requests"] == 1 and stats["ok_responses"] == 1
        assert stats["connections_opened"] == 1
