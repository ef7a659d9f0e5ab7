"""The async Ark / OpenAI-compatible chat client: one session, one cap, one request -> one result.

``ArkClient.complete(request)`` never raises for a per-request problem: it retries what is
retryable until the request's deadline (first send + ``timeout``), honours the server's
``Retry-After`` through the pushback gate, and returns a :class:`ChatResult` (``ok``, or
``failed`` with the reason). Two clocks: the request's deadline, and an optional
``attempt_timeout``; the time a request waits for a free slot in our own gate never counts
against an attempt, and aiohttp's own pool never makes it wait (its limit equals the cap).

The API key is read from the environment when the client starts and lives only in the
session's default headers: it is not in the config, the repr, a log line or an error.

Example:
    >>> import asyncio, os
    >>> from arkbatch_beam import ArkClient, ClientConfig, Endpoint, ChatRequest
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> async def main(url):
    ...     os.environ["DEMO_KEY"] = "test-key"
    ...     cfg = ClientConfig(Endpoint("ep-demo", base_url=url, api_key_env="DEMO_KEY"))
    ...     async with ArkClient(cfg) as client:
    ...         res = await client.complete(
    ...             ChatRequest("q1", {"messages": [{"role": "user", "content": "hi"}]}))
    ...     return res.status, res.content
    >>> with FakeArkServer() as server:
    ...     asyncio.run(main(server.base_url))
    ('ok', 'echo: hi')
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from ._config import ClientConfig
from ._errors import (
    ArkError,
    DeadlineExceeded,
    EndpointError,
    InvalidResponse,
    RateLimited,
    error_for_status,
    map_transport_error,
    mapped_transport_errors,
)
from ._pacing import NEUTRAL, OK, REFUSED, PushbackGate
from ._retry import next_delay, parse_retry_after
from ._types import STATUS_FAILED, STATUS_OK, ChatRequest, ChatResult

log = logging.getLogger("arkbatch_beam")

# When the first this-many answers the endpoint gives are all 401/403/404 (no success, no
# other answer of any kind in between), the endpoint is declared unusable (wrong key or
# endpoint id) and the client reports it as fatal. A few scripted or transient 401s among
# other answers never are.
FATAL_AFTER = 10

# A chat completion is kilobytes; a body beyond this is a broken or hostile server.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class MissingApiKey(RuntimeError):
    """The environment variable that should hold the API key is unset or empty."""


_INT64 = range(-(2**63), 2**63)


def _int_or_none(v: Any) -> int | None:
    """An int that fits the int64 columns (a hostile 2**64 must not crash the writer)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v in _INT64 else None


def _str_or_none(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return orjson.dumps(v).decode()


def parse_completion(data: bytes, result: ChatResult) -> None:
    """Fill ``result`` from a 200 body; raise :class:`InvalidResponse` if it is not one.

    Example:
        >>> r = ChatResult("x", "ok")
        >>> parse_completion(b'{"id":"c1","choices":[{"message":{"content":"hi"},'
        ...                  b'"finish_reason":"stop"}],"usage":{"prompt_tokens":2}}', r)
        >>> r.content, r.finish_reason, r.prompt_tokens
        ('hi', 'stop', 2)
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidResponse(
            "200 answer is not valid JSON" + (" (empty body)" if not data else ""),
            http_status=200,
        ) from None
    if not isinstance(obj, dict):
        raise InvalidResponse("200 answer is not a JSON object", http_status=200)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise InvalidResponse("200 answer has no choices", http_status=200)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}
    result.response_id = _str_or_none(obj.get("id"))
    if isinstance(obj.get("model"), str):
        result.model = obj["model"]
    result.content = _str_or_none(message.get("content"))
    result.reasoning_content = _str_or_none(message.get("reasoning_content"))
    result.finish_reason = _str_or_none(choice.get("finish_reason"))
    usage = obj.get("usage")
    if isinstance(usage, dict):
        result.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        result.completion_tokens = _int_or_none(usage.get("completion_tokens"))
        result.total_tokens = _int_or_none(usage.get("total_tokens"))
        ptd = usage.get("prompt_tokens_details")
        if isinstance(ptd, dict):
            result.cached_tokens = _int_or_none(ptd.get("cached_tokens"))
        ctd = usage.get("completion_tokens_details")
        if isinstance(ctd, dict):
            result.reasoning_tokens = _int_or_none(ctd.get("reasoning_tokens"))


class ArkClient:
    """One aiohttp session, a connector sized to the cap, and one pushback gate per model.

    Use it from one event loop (the shared runtime's). See the module docstring.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._gates: dict[str, PushbackGate] = {}
        self._rid_prefix = uuid.uuid4().hex[:12]
        self._rid_counter = 0
        self._rand = random.Random()
        # Counters (read by the runtime for metrics).
        self.attempts = 0
        self.ok = 0
        self.failed = 0
        self._endpoint_errors = 0
        self._other_answers = 0
        self._redact_key: str | None = None  # a server may echo the key back: never keep it
        self.backing_off = 0  # requests sleeping before a retry right now
        self.on_backoff: Callable[[], None] | None = None
        self.fatal: str | None = None

    def __repr__(self) -> str:
        return f"ArkClient(url={self.config.endpoint.url!r}, max_concurrency={self.config.max_concurrency})"

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Read the key from the environment and open the session (idempotent)."""
        if self._session is not None:
            return
        ep = self.config.endpoint
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update(dict(ep.headers))
        if ep.api_key_env:
            key = os.environ.get(ep.api_key_env, "")
            if not key:
                raise MissingApiKey(
                    f"environment variable {ep.api_key_env} is not set: put the API key there "
                    "(in the worker's environment), or pass api_key_env='' for a server "
                    "without authentication"
                )
            headers["Authorization"] = f"Bearer {key}"
            self._redact_key = key
        connector = aiohttp.TCPConnector(
            limit=self.config.max_concurrency,
            limit_per_host=0,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,  # CPython < 3.12.8 leaks aborted SSL transports
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self.config.connect_timeout,
            sock_read=None,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=timeout,
            raise_for_status=False,
            auto_decompress=True,
            trust_env=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        """Close the session and cancel gate timers."""
        for gate in self._gates.values():
            gate.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ArkClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- gates ---------------------------------------------------------------------------
    def gate(self, model: str) -> PushbackGate:
        """The pushback gate for ``model`` (created on first use)."""
        g = self._gates.get(model)
        if g is None:
            g = self._gates[model] = PushbackGate(
                self.config.max_concurrency, max_rate=self.config.max_requests_per_second
            )
        return g

    @property
    def paused_seconds(self) -> float:
        """Seconds all gates have spent paused so far."""
        return sum(g.paused_seconds for g in self._gates.values())

    # -- one request ---------------------------------------------------------------------
    def _prepare(self, request: ChatRequest) -> tuple[str, bytes]:
        body = request.body
        ep = self.config.endpoint
        model = body.get("model") or ep.model
        if not isinstance(model, str) or not model:
            raise ValueError("request has no model and the endpoint names none")
        if body.get("model") != model or (ep.is_batch and body.get("stream")):
            body = dict(body)
            body["model"] = model
            if ep.is_batch and body.get("stream"):
                body["stream"] = False  # streaming is not allowed on the batch path
        return model, orjson.dumps(body)

    async def complete(self, request: ChatRequest) -> ChatResult:
        """Send one request with retries until its deadline; never raises for its failures."""
        if self._session is None:
            await self.start()
        try:
            model, payload = self._prepare(request)
        except (ValueError, TypeError, orjson.JSONEncodeError) as exc:
            self.failed += 1
            return ChatResult.failure(
                request.custom_id,
                "invalid_request",
                str(exc),
                request_json=request.raw,
            )
        result = await self._run(request, model, payload)
        if result.status == STATUS_OK:
            self.ok += 1
        else:
            self.failed += 1
            if result.request_json is None:
                result.request_json = request.raw or payload.decode()
        return result

    async def _run(self, request: ChatRequest, model: str, payload: bytes) -> ChatResult:
        cfg = self.config
        loop = asyncio.get_running_loop()
        gate = self.gate(model)
        result = ChatResult(request.custom_id, STATUS_OK, model=model)
        first_send: float | None = None
        deadline = float("inf")
        attempts = invalid = 0
        last: ArkError | None = None
        while True:
            # 1. A slot. Waiting here never counts against an attempt; once the request has
            #    been sent it does count against the deadline.
            ticket = gate.try_acquire()
            if ticket is None:
                if first_send is None:
                    ticket = await gate.acquire()
                else:
                    remaining = deadline - loop.time()
                    try:
                        if remaining <= 0:
                            raise TimeoutError
                        async with asyncio.timeout(remaining):
                            ticket = await gate.acquire()
                    except TimeoutError:
                        return self._give_up(result, attempts, last, first_send, loop.time())
            now = loop.time()
            if first_send is None:
                first_send = now
                deadline = now + cfg.timeout
            attempts += 1
            self.attempts += 1
            self._rid_counter += 1
            rid = f"{self._rid_prefix}-{self._rid_counter}"
            budget = deadline - now
            if cfg.attempt_timeout is not None:
                budget = min(budget, cfg.attempt_timeout)
            outcome, retry_after = NEUTRAL, None
            try:
                try:
                    async with asyncio.timeout(budget):
                        status, headers, data = await self._post(payload, rid)
                except TimeoutError:
                    if loop.time() >= deadline - 1e-6:
                        raise DeadlineExceeded("deadline reached during an attempt") from None
                    raise
                if status == 200:
                    parse_completion(data, result)
                    outcome = OK
                else:
                    body = None
                    try:
                        body = orjson.loads(data) if data else None
                    except orjson.JSONDecodeError:
                        pass
                    retry_after = parse_retry_after(headers, time.time())
                    err = error_for_status(
                        status,
                        body,
                        retry_after=retry_after,
                        text=data[:500].decode("utf-8", "replace"),
                    )
                    if isinstance(err, RateLimited) or (err.retryable and retry_after is not None):
                        outcome = REFUSED  # the server named a time: it is pushing back
                    raise err
            except DeadlineExceeded as exc:
                gate.release(ticket, NEUTRAL)
                return self._give_up(result, attempts, last or exc, first_send, loop.time())
            except (ArkError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                gate.release(ticket, outcome, retry_after)
                last = exc if isinstance(exc, ArkError) else map_transport_error(exc)
                if isinstance(last, InvalidResponse):
                    invalid += 1
                self._note_answer(last)
            except BaseException:
                # Cancelled (or an unexpected error) mid-attempt: give the slot back, or
                # the gate would count this request in flight forever.
                gate.release(ticket, NEUTRAL)
                raise
            else:
                gate.release(ticket, OK)
                self._other_answers += 1
                result.attempts = attempts
                result.latency_ms = (loop.time() - first_send) * 1000.0
                result.request_id = rid
                result.response_json = data.decode("utf-8", "replace")
                return result
            # 2. Decide: retry after a delay, or give up.
            now = loop.time()
            decision = next_delay(
                attempts,
                last,
                now=now,
                deadline=deadline,
                backoff=cfg.backoff,
                rand=self._rand.random(),
                invalid_responses=invalid,
                max_invalid_responses=cfg.max_invalid_responses,
            )
            if decision.give_up:
                if decision.reason == "deadline_exceeded":
                    return self._give_up(result, attempts, last, first_send, now)
                return self._fail(result, attempts, last, first_send, now, rid)
            # Waiting out a backoff or Retry-After holds no slot on the wire; tell the owner
            # (the runtime), so it can let another request use the worker time meanwhile.
            self.backing_off += 1
            if self.on_backoff is not None:
                self.on_backoff()
            try:
                await asyncio.sleep(decision.delay)
            finally:
                self.backing_off -= 1

    async def _post(self, payload: bytes, rid: str) -> tuple[int, Any, bytes]:
        assert self._session is not None
        with mapped_transport_errors():
            async with self._session.post(
                self.config.endpoint.url,
                data=payload,
                headers={"X-Client-Request-Id": rid},
            ) as resp:
                size = resp.content_length
                if size is not None and size <= MAX_RESPONSE_BYTES:
                    data = await resp.read()
                else:  # unknown or too large: read at most the limit, never an endless body
                    chunks, total = [], 0
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        total += len(chunk)
                        if total > MAX_RESPONSE_BYTES:
                            raise InvalidResponse(f"response body over {MAX_RESPONSE_BYTES} bytes")
                        chunks.append(chunk)
                    data = b"".join(chunks)
                return resp.status, resp.headers, data

    def _note_answer(self, err: ArkError) -> None:
        if not isinstance(err, EndpointError):
            if err.http_status is not None:  # the endpoint answered something else
                self._other_answers += 1
            return
        self._endpoint_errors += 1
        if self.ok == 0 and self._other_answers == 0:
            if self._endpoint_errors >= FATAL_AFTER and self.fatal is None:
                self.fatal = (
                    f"the endpoint {self.config.endpoint.url} answered HTTP {err.http_status} "
                    f"({self._redact(err.error_code) or 'no code'}: {self._redact(err.message)}) to the first "
                    f"{self._endpoint_errors} requests and never succeeded: check the model/"
                    f"endpoint id, base_url, path and the key in ${self.config.endpoint.api_key_env}"
                )
                log.error("%s", self.fatal)

    def _redact(self, text: str | None) -> str | None:
        key = self._redact_key
        if text and key and key in text:
            return text.replace(key, "[redacted]")
        return text

    def _fill_error(self, result: ChatResult, err: ArkError | None) -> None:
        if err is None:
            return
        result.http_status = err.http_status
        result.error_code = self._redact(err.error_code)
        result.error_message = self._redact(err.message)

    def _fail(
        self,
        result: ChatResult,
        attempts: int,
        err: ArkError,
        first_send: float | None,
        now: float,
        rid: str,
    ) -> ChatResult:
        result.status = STATUS_FAILED
        self._fill_error(result, err)
        result.error_type = err.error_type
        result.retryable = err.retryable
        result.attempts = attempts
        result.request_id = rid
        result.latency_ms = (now - first_send) * 1000.0 if first_send is not None else 0.0
        return result

    def _give_up(
        self,
        result: ChatResult,
        attempts: int,
        last: ArkError | None,
        first_send: float | None,
        now: float,
    ) -> ChatResult:
        result.status = STATUS_FAILED
        self._fill_error(result, last)
        result.error_type = DeadlineExceeded.error_type
        why = f"; last error: {last.error_type}: {last.message}" if last is not None else ""
        result.error_message = (
            f"deadline of {self.config.timeout:g}s exceeded after {attempts} attempt(s){why}"
        )
        result.retryable = True
        result.attempts = attempts
        result.latency_ms = (now - first_send) * 1000.0 if first_send is not None else 0.0
        return result
