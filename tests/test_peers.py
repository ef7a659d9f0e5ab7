"""Independent parties keep us honest: our client against someone else's mock server, and the
official Ark SDK against our fake server.

* ``fakellm`` (PyPI, an OpenAI-compatible mock server that is not ours), run as a subprocess:
  the CLI sends 50 prompts to it and must read every answer it gives.
* ``volcengine-ark-runtime`` (the official Ark Python SDK, ``volcenginesdkarkruntime``): it talks
  to our :class:`FakeArkServer` and must parse every answer the fake gives, completions and the
  error answers of every :class:`Fault` helper, as it would Ark's own. Where both parties read
  the same bytes, our ``parse_completion``/``classify`` must agree with the SDK.

Each test skips cleanly when its peer is not installed (``pip install -e '.[test]'`` installs both).
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pyarrow.dataset as ds
import pytest

from arkbatch_beam import ChatResult
from arkbatch_beam._attempt import classify
from arkbatch_beam._errors import EndpointError, RateLimited, RequestRejected, RetryableStatus
from arkbatch_beam._result import parse_completion
from arkbatch_beam.testing import FakeArkServer, Fault
from pipelines import batch_chat

from .conftest import write_jsonl

# -- fakellm: our CLI against an independent OpenAI-compatible mock server -------------------------

FAKELLM_CONFIG = """\
version: 1
defaults:
  fallback: deterministic_echo
rules:
  - name: refuse
    when:
      messages_contain: "please refuse me"
    respond:
      status: 400
      error: "refused by the peer"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_listening(proc: subprocess.Popen, port: int, log_path: str, within: float = 30.0) -> None:
    """Wait for the server's port to accept a connection (or the process to die), bounded."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"fakellm did not listen on {port} within {within}s: {_tail(log_path)}")
        try:  # wait on the process itself: returns at once if it died, else after 50 ms
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"fakellm exited with {proc.returncode}: {_tail(log_path)}")


def _tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-2000:]


@pytest.fixture
def fakellm_server(tmp_path):
    """``fakellm serve`` on a free 127.0.0.1 port; yields ``(port, log_path)``; always stopped."""
    pytest.importorskip("fakellm.cli", reason="fakellm is not installed (pip install 'fakellm>=0.3.5,<0.4')")
    config = tmp_path / "fakellm.yaml"
    config.write_text(FAKELLM_CONFIG, encoding="utf-8")
    port = _free_port()
    log_path = str(tmp_path / "fakellm.log")
    # A dead proxy: should anything in the peer try to fetch from the internet (tiktoken's
    # vocabularies, if installed), it fails at once instead of leaving the machine.
    env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fakellm.cli import main; main(prog_name='fakellm')",
             "serve", "--host", "127.0.0.1", "--port", str(port), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
        )
    try:
        _wait_until_listening(proc, port, log_path)
        yield port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _read(out: str, kind: str) -> list[dict[str, Any]]:
    path = os.path.join(out, kind)
    if not os.path.isdir(path):
        return []
    return ds.dataset(path, format="parquet").to_table().to_pylist()


def test_cli_reads_every_answer_of_an_independent_mock_server(fakellm_server, tmp_path, capsys):
    port, log_path = fakellm_server
    refused = json.dumps({"custom_id": "id-refused",
                          "body": {"messages": [{"role": "user", "content": "please refuse me"}]}})
    inp = write_jsonl(tmp_path / "in.jsonl", 50, extra=[refused])
    out = str(tmp_path / "out")
    rc = batch_chat.main([
        "--input", inp, "--output", out, "--model", "m", "--base_url", f"http://127.0.0.1:{port}/v1",
        "--path", "/chat/completions", "--api_key_env", "", "--max_concurrency", "8", "--timeout", "60",
        "--no_preflight",
    ])
    assert rc == 0, capsys.readouterr().err[-2000:]
    ok, failed = _read(out, "results"), _read(out, "failures")
    ids = sorted(r["custom_id"] for r in ok + failed)
    assert ids == sorted([f"id-{i}" for i in range(50)] + ["id-refused"])  # every id exactly once

    assert sorted(r["custom_id"] for r in ok) == sorted(f"id-{i}" for i in range(50))
    for r in ok:
        assert r["status"] == "ok" and r["attempts"] == 1 and r["http_status"] is None
        # fakellm's deterministic echo: "[mock response for <model>, fingerprint <8 hex>]"
        assert r["content"].startswith("[mock response for m, fingerprint ") and r["content"].endswith("]")
        assert r["model"] == "m" and r["finish_reason"] == "stop"
        assert r["response_id"].startswith("chatcmpl-")
        assert r["prompt_tokens"] >= 1 and r["completion_tokens"] >= 1
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
        assert r["cached_tokens"] is None and r["reasoning_tokens"] is None  # fakellm sends no details
        assert json.loads(r["response_json"])["choices"][0]["message"]["content"] == r["content"]
    assert len({r["content"] for r in ok}) == 50  # one fingerprint per prompt: answers not mixed up

    # fakellm's OpenAI-shaped error body: {"error": {"message", "type": "mock_error", "code": null}}
    (row,) = failed
    assert row["custom_id"] == "id-refused" and row["status"] == "failed"
    assert (row["error_type"], row["http_status"], row["retryable"]) == ("rejected", 400, False)
    assert row["error_message"] == "refused by the peer" and row["error_code"] is None
    assert row["attempts"] == 1

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fakellm/stats", timeout=10) as resp:
        stats = json.load(resp)
    assert stats["total_requests"] == 51  # one POST per prompt: nothing retried, nothing lost
    assert stats["by_rule"] == {"<fallthrough>": 50, "refuse": 1}
    assert "summary: ok=50 failed=1 " in capsys.readouterr().out


# -- the official Ark SDK against our fake server -----------------------------------------------------

KEY = "test-key"


@pytest.fixture
def sdk():
    """The SDK's module and its exceptions module (skips when it is not installed)."""
    ark = pytest.importorskip(
        "volcenginesdkarkruntime", reason="the Ark SDK is not installed (pip install 'volcengine-ark-runtime>=5,<6')")
    from volcenginesdkarkruntime import _exceptions

    return ark, _exceptions


@pytest.fixture
def fake():
    with FakeArkServer(api_key=KEY) as srv:
        yield srv


def sdk_run(sdk, base_url: str, body, *, api_key: str = KEY) -> Any:
    """Run ``await body(client)`` with a fresh ``AsyncArk`` (no SDK retries); returns its result."""
    ark, _ = sdk

    async def main() -> Any:
        async with ark.AsyncArk(base_url=base_url, api_key=api_key, max_retries=0, timeout=30) as client:
            return await body(client)

    return asyncio.run(main())


def sdk_error(sdk, base_url: str, body, **kw: Any) -> Any:
    """The exception ``await body(client)`` raises."""

    async def catching(client):
        try:
            await body(client)
        except Exception as exc:  # noqa: BLE001 - returned for the test to judge
            return exc
        raise AssertionError("the SDK call did not fail")

    return sdk_run(sdk, base_url, catching, **kw)


def _msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _completion_id(key: str) -> str:
    return "chatcmpl-" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:12]


def test_the_sdk_parses_a_completion_on_the_chat_and_batch_paths(sdk, fake):
    async def body(client):
        # The SDK sends every optional parameter it was not given as null: the fake must accept it.
        chat = await client.chat.completions.create(model="ep-peer", messages=_msgs("hello peer"),
                                                    temperature=0.2, max_tokens=16)
        batch = await client.batch.chat.completions.create(model="ep-thinking-1", messages=_msgs("hello batch"),
                                                           timeout=10)
        parts = await client.chat.completions.create(model="ep-peer", messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "parts"}]},
        ])
        raw = await client.chat.completions.with_raw_response.create(model="ep-peer", messages=_msgs("raw one"))
        return chat, batch, parts, raw, await raw.read(), await raw.parse()

    chat, batch, parts, raw, raw_bytes, raw_parsed = sdk_run(sdk, fake.base_url, body)
    assert type(chat).__name__ == "ChatCompletion"
    assert (chat.id, chat.object, chat.model, chat.created) == (
        _completion_id("hello peer"), "chat.completion", "ep-peer", 1700000000)
    (choice,) = chat.choices
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "stop", "assistant")
    assert choice.message.content == "echo: hello peer" and choice.message.reasoning_content is None
    u = chat.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2, 3, 5)  # words, the fake's "tokens"
    assert u.prompt_tokens_details.cached_tokens == 0 and u.completion_tokens_details.reasoning_tokens == 0

    # The batch path; a model named "thinking" answers with reasoning_content too.
    assert batch.model == "ep-thinking-1" and batch.choices[0].message.content == "echo: hello batch"
    assert batch.choices[0].message.reasoning_content == "thinking about: hello batch"
    assert batch.usage.completion_tokens_details.reasoning_tokens == 4
    # Multi-part content: the text parts, joined by a space.
    assert parts.choices[0].message.content == "echo: two parts"
    assert parts.usage.prompt_tokens == 4

    # The fake echoes the SDK's X-Client-Request-Id as X-Request-Id, and saw one request per call.
    assert raw.http_response.status_code == 200
    assert raw.headers["x-request-id"] == fake.client_request_ids[-1] != ""
    assert raw.headers["content-type"].startswith("application/json")
    assert fake.total_requests == 4 and fake.ok_responses == 4
    assert fake.attempts_by_key == {"hello peer": 1, "hello batch": 1, "two parts": 1, "raw one": 1}

    # Both parties read the same bytes the same way.
    ours = ChatResult("x", "ok")
    parse_completion(raw_bytes, ours)
    msg = raw_parsed.choices[0].message
    assert (ours.content, ours.finish_reason, ours.response_id) == (
        msg.content, raw_parsed.choices[0].finish_reason, raw_parsed.id)
    assert (ours.prompt_tokens, ours.completion_tokens, ours.total_tokens) == (
        raw_parsed.usage.prompt_tokens, raw_parsed.usage.completion_tokens, raw_parsed.usage.total_tokens)
    assert ours.cached_tokens == raw_parsed.usage.prompt_tokens_details.cached_tokens


# (fault, SDK exception class name, status, Ark error type the fake names, response header or None,
#  our error class). Retried answers (429/5xx) go through chat.completions only: the SDK's batch
# path retries them in a loop until its timeout.
ERROR_CASES = [
    (Fault.bad_request("peer says no"), "ArkBadRequestError", 400, "BadRequest", None, RequestRejected),
    (Fault.unauthorized(), "ArkAuthenticationError", 401, "Unauthorized", None, EndpointError),
    (Fault.server_error(403, code="AccessDenied", message="no access"), "ArkPermissionDeniedError", 403,
     "Forbidden", None, EndpointError),
    (Fault.server_error(404, code="InvalidEndpointOrModel.NotFound", message="no such endpoint"),
     "ArkNotFoundError", 404, "NotFound", None, EndpointError),
    (Fault.rate_limited("7"), "ArkRateLimitError", 429, "TooManyRequests", ("retry-after", "7"), RateLimited),
    (Fault.rate_limited("250", header="retry-after-ms"), "ArkRateLimitError", 429, "TooManyRequests",
     ("retry-after-ms", "250"), RateLimited),
    (Fault.rate_limited(None), "ArkRateLimitError", 429, "TooManyRequests", None, RateLimited),
    (Fault.server_error(500), "ArkInternalServerError", 500, "InternalServerError", None, RetryableStatus),
    (Fault.server_error(502, code="BadGateway", message="upstream"), "ArkInternalServerError", 502, "BadGateway",
     None, RetryableStatus),
    (Fault.server_error(503, code="ServiceUnavailable", message="down for a bit"), "ArkInternalServerError", 503,
     "ServiceUnavailable", None, RetryableStatus),
    (Fault.server_error(503, code="ServerOverloaded", message="busy", headers={"Retry-After": "2"}),
     "ArkInternalServerError", 503, "ServiceUnavailable", ("retry-after", "2"), RateLimited),
    (Fault.server_error(504, code="GatewayTimeout", message="slow"), "ArkInternalServerError", 504,
     "GatewayTimeout", None, RetryableStatus),
]


@pytest.mark.parametrize("path, fault, exc_name, status, err_type, header, ours", [
    pytest.param(path, *case, id=f"{path}-{case[2]}-{case[0].code}-{case[4][0] if case[4] else 'none'}")
    for path in ("chat", "batch") for case in ERROR_CASES
    if path == "chat" or case[2] in (400, 401, 403, 404)
])
def test_the_sdk_maps_every_error_answer_of_the_fake(sdk, fake, path, fault, exc_name, status, err_type, header,
                                                     ours):
    _, exceptions = sdk
    fake.add_fault(fault)

    async def call(client):
        api = client.batch.chat.completions if path == "batch" else client.chat.completions
        kw = {"timeout": 10} if path == "batch" else {}
        return await api.create(model="ep-peer", messages=_msgs("err"), **kw)

    e = sdk_error(sdk, fake.base_url, call)
    assert type(e) is getattr(exceptions, exc_name), repr(e)
    assert isinstance(e, exceptions.ArkAPIStatusError) and e.status_code == status
    # The SDK reads Ark's error object: code, message, type, param.
    assert e.body == {"code": fault.code, "message": fault.message, "type": err_type, "param": ""}
    assert (e.code, e.type, e.param) == (fault.code, err_type, "")
    assert fault.message in e.message
    assert e.request_id == fake.client_request_ids[-1] == e.response.headers["x-request-id"]
    if header is not None:
        assert e.response.headers[header[0]] == header[1]
    assert fake.total_requests == 1  # max_retries=0 / not retried on the batch path

    # Our client reads the very same answer the same way (status, code, message).
    outcome = classify(e.status_code, e.response.headers, e.response.content, time.time())
    assert type(outcome.error) is ours
    assert (outcome.error.http_status, outcome.error.error_code, outcome.error.message) == (
        status, fault.code, fault.message)


def test_the_sdk_reads_the_fakes_own_refusals(sdk, fake):
    """Not Fault helpers: the fake's built-in answers (wrong key, bad body, streaming on batch, pause)."""
    _, exceptions = sdk
    e = sdk_error(sdk, fake.base_url, lambda c: c.chat.completions.create(model="m", messages=_msgs("x")),
                  api_key="wrong-key")
    assert type(e) is exceptions.ArkAuthenticationError and e.code == "AuthenticationError"
    assert e.body["type"] == "Unauthorized"

    e = sdk_error(sdk, fake.base_url, lambda c: c.chat.completions.create(model="m", messages=[]))
    assert type(e) is exceptions.ArkBadRequestError
    assert (e.code, e.param, e.type) == ("InvalidParameter", "messages", "BadRequest")

    e = sdk_error(sdk, fake.base_url, lambda c: c.batch.chat.completions.create(
        model="m", messages=_msgs("x"), extra_body={"stream": True}, timeout=10))
    assert type(e) is exceptions.ArkBadRequestError and (e.code, e.param) == ("InvalidParameter", "stream")

    fake.pause(60)
    try:
        e = sdk_error(sdk, fake.base_url, lambda c: c.chat.completions.create(model="m", messages=_msgs("x")))
    finally:
        fake.pause(0)
    assert type(e) is exceptions.ArkRateLimitError and e.code == "ServerOverloaded"
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert sdk_run(sdk, fake.base_url, lambda c: c.chat.completions.create(model="m", messages=_msgs("after"))
                   ).choices[0].message.content == "echo: after"


def test_the_sdk_finds_the_broken_answers_broken(sdk, fake):
    """A reset is a connection error; a truncated, non-JSON or empty 200 is no completion."""
    _, exceptions = sdk

    def call(c):
        return c.chat.completions.create(model="m", messages=_msgs("b"))

    fake.add_fault(Fault.reset())
    assert isinstance(sdk_error(sdk, fake.base_url, call), exceptions.ArkAPIConnectionError)
    for fault in (Fault.truncate(), Fault.invalid_json(), Fault.empty()):
        fake.add_fault(fault)
        e = sdk_error(sdk, fake.base_url, call)
        assert isinstance(e, (ValueError, exceptions.ArkAPIError)), (fault.kind, repr(e))
    assert fake.ok_responses == 0 and fake.total_requests == 4


def test_the_sdk_batch_path_retries_what_our_client_retries(sdk, fake):
    """Ark's batch client retries 408/409/429/5xx on its own: the same statuses ours retries."""
    statuses = (408, 409, 429, 500, 502, 503, 504)
    for status in statuses:
        # Retry-After: 0 keeps the SDK's breaker from sleeping between its retries.
        fake.add_fault(Fault.server_error(status, headers={"Retry-After": "0"}, match="again"))
        assert classify(status, {}, b"", 0.0).error.retryable
    res = sdk_run(sdk, fake.base_url, lambda c: c.batch.chat.completions.create(
        model="m", messages=_msgs("again"), timeout=20))
    assert res.choices[0].message.content == "echo: again"
    assert fake.attempts_by_key["again"] == len(statuses) + 1
    assert fake.snapshot()["statuses"] == {**{s: 1 for s in statuses}, 200: 1}
