"""Engine defects found in review, each against the real aiohttp stack and the fake server.

Every test here failed on the engine before the v2 reshape (see the closing note of that
change); they use only the public API of both, so they can be run against either.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import orjson
import pytest
from apache_beam.transforms.window import GlobalWindow

from arkbatch_beam import ArkClient, Backoff, ChatRequest, ChatResult, ClientConfig, Endpoint, _runtime
from arkbatch_beam._dofn import InferDoFn
from arkbatch_beam.testing import FakeArkServer, Fault

from .conftest import write_jsonl

pytestmark = pytest.mark.timeout(120)

KEY_ENV = "ARKBATCH_TEST_DEFECT_KEY"
SECRET = "sk-DEFECT-7f3a9c"
FAST = Backoff(initial=0.01, max_delay=0.05, jitter=0.0)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeArkServer(api_key=SECRET) as srv:
        yield srv


def config(url: str, **kw: Any) -> ClientConfig:
    kw.setdefault("backoff", FAST)
    kw.setdefault("timeout", 30.0)
    kw.setdefault("progress_seconds", 0)
    return ClientConfig(Endpoint("ep-d", base_url=url, api_key_env=KEY_ENV), **kw)


def req(key: str) -> ChatRequest:
    body = {"messages": [{"role": "user", "content": key}]}
    return ChatRequest(f"id-{key}", body, raw=orjson.dumps(body).decode())


def complete(cfg: ClientConfig, *requests: ChatRequest) -> list[ChatResult]:
    async def main() -> list[ChatResult]:
        async with ArkClient(cfg) as client:
            return list(await asyncio.gather(*(client.complete(r) for r in requests)))

    return asyncio.run(main())


def text_of(result: ChatResult) -> str:
    return " ".join(str(v) for v in result.to_row().values() if v is not None)


# 1. The key in the output --------------------------------------------------------------------


def test_a_key_echoed_on_retryable_and_deadline_paths_never_reaches_a_row_or_a_log(
    server: FakeArkServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    echo = f"upstream rejected Authorization: Bearer {SECRET}"
    server.add_fault(Fault.server_error(502, message=echo, match="retryable", times=-1))
    server.add_fault(Fault.server_error(503, message=echo, match="deadline", times=1))
    server.add_fault(Fault.hold(30.0, match="deadline"))
    server.add_fault(Fault.rate_limited("0.01", match="limited", times=2))
    server.add_fault(Fault.bad_request(echo, match="rejected"))
    results = complete(config(server.base_url, timeout=3.0), req("retryable"), req("deadline"),
                       req("limited"), req("rejected"))
    by_id = {r.custom_id: r for r in results}
    assert by_id["id-retryable"].status == "failed" and by_id["id-retryable"].http_status == 502
    assert by_id["id-deadline"].error_type == "deadline_exceeded"
    assert by_id["id-deadline"].http_status == 503  # the last server answer is kept ...
    assert "[redacted]" in by_id["id-deadline"].error_message  # ... without the key
    assert by_id["id-limited"].ok and by_id["id-rejected"].error_type == "rejected"
    for r in results:
        assert SECRET not in text_of(r), r
    assert SECRET not in caplog.text


# 2. The retry storm -------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", "Thu, 01 Jan 1970 00:00:00 GMT"])
def test_retry_after_zero_or_past_is_not_a_storm(server: FakeArkServer, retry_after: str) -> None:
    server.add_fault(Fault.rate_limited(retry_after, match="z", times=-1))
    # Default backoff (0.5 s first): within a 2.5 s deadline at most a handful of attempts.
    (res,) = complete(config(server.base_url, timeout=2.5, backoff=Backoff()), req("z"))
    assert res.status == "failed" and res.http_status == 429
    assert server.attempts_by_key["z"] <= 4, server.attempts_by_key["z"]


# 3. One bad prompt holds the job ---------------------------------------------------------------


def test_a_prompt_that_always_gets_a_500_ends_after_max_attempts(server: FakeArkServer) -> None:
    server.add_fault(Fault.server_error(500, match="bad", times=-1))
    (res,) = complete(config(server.base_url, timeout=60.0), req("bad"))
    assert res.error_type == "attempts_exhausted" and res.retryable is True
    assert res.attempts == 20 == server.attempts_by_key["bad"]
    assert res.http_status == 500


# 4. Keepalive on held connections --------------------------------------------------------------


def _sockets_to(port: int) -> list[socket.socket]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.getpeername()[1] == port:
                found.append(s)
                continue
        except (OSError, IndexError, TypeError):
            pass
        s.close()
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux TCP socket options")
def test_held_connections_carry_tcp_keepalive(server: FakeArkServer) -> None:
    for i in range(3):
        server.add_fault(Fault.hold(60.0, match=f"held {i}"))

    async def main() -> list[tuple[int, int, int, int]]:
        async with ArkClient(config(server.base_url)) as client:
            tasks = [asyncio.create_task(client.complete(req(f"held {i}"))) for i in range(3)]
            assert await asyncio.to_thread(server.wait_for_requests, 3, 30)
            socks = _sockets_to(server.port)
            try:
                opts = [(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) for s in socks]
            finally:
                for s in socks:
                    s.close()
            server.release_holds()
            assert all(r.ok for r in await asyncio.gather(*tasks))
            return opts

    opts = asyncio.run(main())
    assert len(opts) >= 3, opts  # the three held connections (server-side sockets are not ours)
    client_side = [o for o in opts if o[0]]
    assert len(client_side) == len(opts), opts
    for on, idle, interval, count in client_side:
        assert on == 1 and 1 <= idle <= 60 and 1 <= interval <= 15 and 1 <= count <= 10


# 5. Paying twice after a bundle failure ------------------------------------------------------


def _process(dofn: InferDoFn, request: ChatRequest) -> list[Any]:
    return list(dofn.process(request, GlobalWindow(), 0))


def test_a_failed_bundle_cancels_its_requests_and_never_sends_its_queued_ones(server: FakeArkServer) -> None:
    keys = [f"b{i}" for i in range(10)]
    for k in keys:
        server.add_fault(Fault.hold(60.0, match=k))
    cfg = config(server.base_url, max_concurrency=3)
    other = _runtime.acquire(cfg)  # another DoFn thread of the same worker keeps the runtime open
    try:
        dofn = InferDoFn(cfg, max_pending=50, handoff=1)
        dofn.setup()
        dofn.start_bundle()
        for k in keys:
            assert _process(dofn, req(k)) == []
        assert server.wait_for_requests(3, 30)  # 3 on the wire (the cap), 7 queued
        dofn.teardown()  # what Beam does with the DoFns of a failed bundle
        server.clear_faults()
        server.release_holds()
        # A marker after them: the runtime is FIFO, so anything of the dead bundle still
        # queued would be sent before it.
        marker = other.submit(req("marker")).result(30)
        assert marker.ok
        sent = sorted(k for k in server.attempts_by_key if k != "marker")
        assert len(sent) == 3 and all(server.attempts_by_key[k] == 1 for k in sent), server.attempts_by_key
        assert server.total_requests == 4
    finally:
        _runtime.release(other)


def test_a_bundle_started_after_a_failed_one_cancels_the_failed_ones_requests(server: FakeArkServer) -> None:
    for i in range(6):
        server.add_fault(Fault.hold(60.0, match=f"old {i}"))
    cfg = config(server.base_url, max_concurrency=2)
    dofn = InferDoFn(cfg, max_pending=50, handoff=1)
    dofn.setup()
    try:
        dofn.start_bundle()
        for i in range(6):
            _process(dofn, req(f"old {i}"))
        assert server.wait_for_requests(2, 30)
        # The bundle failed downstream; the runner reuses this DoFn for the retry.
        dofn.start_bundle()
        server.clear_faults()
        server.release_holds()
        for i in range(6):
            _process(dofn, req(f"new {i}"))
        rows = list(dofn.finish_bundle())
        assert len(rows) == 6
        assert sorted(k for k in server.attempts_by_key if k.startswith("old")) == ["old 0", "old 1"]
    finally:
        dofn.teardown()


# 6. A dead loop thread --------------------------------------------------------------------------


def test_a_dead_loop_thread_fails_the_bundle_and_the_next_gets_a_fresh_runtime(server: FakeArkServer) -> None:
    server.add_fault(Fault.hold(60.0, match="stuck"))
    cfg = config(server.base_url)
    dofn = InferDoFn(cfg, handoff=1)
    dofn.setup()
    rt = _runtime.acquire(cfg)
    dofn.start_bundle()
    _process(dofn, req("stuck"))
    assert server.wait_for_requests(1, 30)
    rt.loop.call_soon_threadsafe(rt.loop.stop)  # the loop thread ends
    outcome: queue.SimpleQueue = queue.SimpleQueue()

    def finish() -> None:
        try:
            list(dofn.finish_bundle())
            outcome.put("returned")
        except Exception as exc:  # noqa: BLE001
            outcome.put(exc)

    t = threading.Thread(target=finish, daemon=True)
    t.start()
    got = outcome.get(timeout=60)  # before: waited forever
    assert isinstance(got, RuntimeError) and "event-loop thread" in str(got), got
    _runtime.release(rt)
    dofn.teardown()
    server.release_holds()
    fresh = _runtime.acquire(cfg)
    try:
        assert fresh is not rt and fresh.submit(req("after")).result(30).ok
    finally:
        _runtime.release(fresh)


# 7. Useless last attempts ------------------------------------------------------------------------


def test_no_attempt_starts_in_the_last_second_of_the_deadline(server: FakeArkServer) -> None:
    server.add_fault(Fault.server_error(500, match="late", times=-1))
    arrivals: list[float] = []
    server.on_request(lambda _n: arrivals.append(time.monotonic()))
    (res,) = complete(config(server.base_url, timeout=3.0, backoff=Backoff(initial=0.2, max_delay=0.2, jitter=0.0)),
                      req("late"))
    assert res.error_type == "deadline_exceeded"
    # The deadline is 3 s after the first send; with min_attempt_seconds=1 the last attempt
    # starts no later than 2 s after it (0.15 s of slack for the hop to the server).
    assert arrivals[-1] - arrivals[0] <= 2.0 + 0.15, arrivals[-1] - arrivals[0]


# 8. A fatal endpoint stops cleanly -----------------------------------------------------------------


def test_a_wrong_key_ends_with_one_message_not_thousands_of_lines(server: FakeArkServer, tmp_path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", 2000)
    env = {**os.environ, KEY_ENV: "sk-wrong-key-123"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.batch_chat", "--input", inp, "--output", str(tmp_path / "o"),
         "--model", "ep-cli", "--base_url", server.base_url, "--api_key_env", KEY_ENV,
         "--max_concurrency", "500", "--no_preflight", "--progress_seconds", "0"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "answered HTTP 401" in proc.stderr
    assert "Task was destroyed" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 40, proc.stderr[-3000:]
    assert "sk-wrong-key-123" not in proc.stderr + proc.stdout


# Credentials in headers, and plain http ------------------------------------------------------------


def test_secret_headers_come_from_the_environment_and_are_scrubbed(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import pickle

    from aiohttp import web

    monkeypatch.setenv("ARKBATCH_TEST_XKEY", "xk-VERY-SECRET-99")
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Api-Key", ""))
        return web.json_response({"error": {"message": f"bad header {request.headers['X-Api-Key']}"}}, status=400)

    async def main() -> ChatResult:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the test's own server
        try:
            ep = Endpoint.openai_compatible("m", f"http://127.0.0.1:{port}/v1", api_key_env="",
                                            secret_headers={"X-Api-Key": "ARKBATCH_TEST_XKEY"})
            cfg = ClientConfig(ep, progress_seconds=0)
            assert b"xk-VERY-SECRET-99" not in pickle.dumps(cfg)
            assert "xk-VERY-SECRET-99" not in repr(cfg) + str(cfg.describe())
            async with ArkClient(cfg) as client:
                return await client.complete(req("h"))
        finally:
            await runner.cleanup()

    res = asyncio.run(main())
    assert seen == ["xk-VERY-SECRET-99"]
    assert res.error_type == "rejected" and "[redacted]" in res.error_message
    assert "xk-VERY-SECRET-99" not in text_of(res)
    with pytest.raises(ValueError, match="secret_headers"):
        Endpoint("m", headers={"X-Api-Key": "xk-literal"})


def test_a_key_over_plain_http_to_a_remote_host_warns(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from arkbatch_beam._attempt import read_credentials

    monkeypatch.setenv(KEY_ENV, SECRET)
    read_credentials(ClientConfig(Endpoint("m", base_url="http://127.0.0.1:1/v3", api_key_env=KEY_ENV)))
    assert "plain http://" not in caplog.text
    read_credentials(ClientConfig(Endpoint("m", base_url="http://10.1.2.3/v3", api_key_env=KEY_ENV)))
    assert "plain http://" in caplog.text and SECRET not in caplog.text


def test_library_log_records_are_scrubbed_of_secrets(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import logging

    from arkbatch_beam._attempt import read_credentials

    monkeypatch.setenv(KEY_ENV, SECRET)
    read_credentials(ClientConfig(Endpoint("m", base_url="http://127.0.0.1:1/v3", api_key_env=KEY_ENV)))
    logging.getLogger("arkbatch_beam").warning("server said %s", f"Bearer {SECRET}")
    assert "server said Bearer [redacted]" in caplog.text and SECRET not in caplog.text


def test_a_failed_bundles_generator_closed_late_never_cancels_the_next_bundle(server: FakeArkServer) -> None:
    cfg = config(server.base_url, max_concurrency=4)
    dofn = InferDoFn(cfg, max_pending=2, handoff=1)
    dofn.setup()
    try:
        dofn.start_bundle()
        _process(dofn, req("a1"))
        stuck = dofn.process(req("a2"), GlobalWindow(), 0)
        next(stuck)  # a row is emitted; the fused step after us raises here: the generator is left open
        dofn.start_bundle()  # the runner retries on this DoFn
        _process(dofn, req("b1"))
        stuck.close()  # ... and the old traceback (holding the generator) is freed only now
        rows = list(dofn.finish_bundle())  # before: b1 had been cancelled and this waited forever
        assert len(rows) == 1
    finally:
        dofn.teardown()
