"""A fake Volcengine Ark batch-inference server for tests, demos and benchmarks.

The server speaks the subset of the Ark chat-completions protocol that
``arkbatch_beam`` uses (``POST /api/v3/batch/chat/completions``,
``POST /api/v3/chat/completions`` and the OpenAI-compatible
``POST /v1/chat/completions``). It answers deterministically
(``"echo: <last user message>"``), can be scripted to misbehave with
:class:`Fault` objects, can refuse all traffic for a while with
:meth:`FakeArkServer.pause` (a pause it announces to every client), can hold
all its clients to one shared quota of requests per second and tokens per
minute with :meth:`FakeArkServer.set_quota` (429 with ``Retry-After`` when a
bucket is empty), and counts everything it sees so tests can make assertions
from another thread.

It runs an aiohttp server in its own daemon thread with its own asyncio loop,
so synchronous code, code running its own event loop, and Beam pipelines can
all talk to it.

Example::

    import json
    import urllib.request

    from arkbatch_beam.testing import FakeArkServer

    with FakeArkServer(api_key="test-key") as srv:
        req = urllib.request.Request(
            srv.base_url + "/batch/chat/completions",
            data=json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            headers={
                "Authorization": "Bearer test-key",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req) as resp:
            print(json.loads(resp.read())["choices"][0]["message"]["content"])
        # -> echo: hi

Command line::

    python -m arkbatch_beam.testing.fake_server --port 8080 --latency 0.05
    python -m arkbatch_beam.testing.fake_server --port 8080 --rps 300 --tpm 600000
    python -m arkbatch_beam.testing.fake_server --port 8443 --tls

HTTPS: ``FakeArkServer(tls=True)`` (``--tls``) serves TLS with a certificate for
``127.0.0.1``, ``::1`` and ``localhost`` (plus ``host``) issued by a throw-away test CA
(``trustme``, from the test extra). The CA's PEM is written to ``ca_pem_path`` while the
server runs (``--tls`` prints it on a second line, ``ca_bundle PATH``): clients trust it
with ``--ca_bundle PATH`` or ``SSL_CERT_FILE=PATH``, never by turning verification off.
``connections_opened`` counts accepted connections (over TLS: handshakes), so tests can
check that clients keep their connections alive; ``GET /_fake/stats`` returns the counters
as JSON for a server running in another process.

Many concurrent connections: every connection uses a file descriptor in the
process running the server (and one in the client). :meth:`FakeArkServer.start`
tries to raise the soft ``RLIMIT_NOFILE`` to the hard limit; if the hard limit
itself is low (e.g. 1024), run the test process under a larger ``ulimit -n``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import hmac
import logging
import math
import os
import random
import shutil
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, Self

import orjson
from aiohttp import web

__all__ = ["FakeArkServer", "Fault", "main"]

logger = logging.getLogger(__name__)

_FAULT_KINDS = frozenset(
    {"status", "reset", "truncate", "invalid_json", "hold", "empty"}
)
_PAUSE_FORMS = frozenset({"seconds", "float", "http-date", "ms"})
_ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    408: "RequestTimeout",
    413: "RequestEntityTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_JSON_CT = "application/json"
_CREATED = 1700000000
_TICK = 0.1  # resolution of the timeline (seconds)
_ROUTES = (
    "/api/v3/batch/chat/completions",
    "/api/v3/chat/completions",
    "/v1/chat/completions",
)
_STATS_ROUTE = "/_fake/stats"


def _error_body(status: int, code: str, message: str, param: str = "") -> bytes:
    """Serialise an Ark-style error object."""
    return orjson.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "type": _ERROR_TYPE_BY_STATUS.get(status, "ServerError"),
                "param": param,
            }
        }
    )


def _content_text(content: Any) -> str:
    """Return the text of a message ``content`` (a string or a list of parts).

    Text parts of a multi-part content are joined with a single space;
    anything else (``None``, images, ...) contributes nothing.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _parse_request(raw: bytes) -> tuple[dict[str, Any] | None, str | None, int]:
    """Parse a request body.

    Returns ``(body, key, prompt_words)``; ``body`` is None when the body is
    not a JSON object with a non-empty ``messages`` list of objects, and
    ``key`` (the text of the last ``user`` message, ``""`` if there is none)
    is None in the same case.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None, 0
    if not isinstance(body, dict):
        return None, None, 0
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, None, 0
    key = ""
    words = 0
    for msg in messages:
        if not isinstance(msg, dict):
            return None, None, 0
        text = _content_text(msg.get("content"))
        words += len(text.split())
        if msg.get("role") == "user":
            key = text
    return body, key, max(words, 1)


def _completion_words(key: str) -> int:
    """The ``completion_tokens`` of the answer to ``key`` (its word count)."""
    return len(("echo: " + key).split())


def _completion(model: str, key: str, prompt_words: int) -> bytes:
    """Build the deterministic completion JSON for ``key``."""
    answer = "echo: " + key
    completion_words = _completion_words(key)
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    reasoning_words = 0
    if "thinking" in model:
        reasoning = "thinking about: " + key
        message["reasoning_content"] = reasoning
        reasoning_words = len(reasoning.split())
    digest = hashlib.sha1(key.encode("utf-8"), usedforsecurity=False).hexdigest()
    return orjson.dumps(
        {
            "id": "chatcmpl-" + digest[:12],
            "object": "chat.completion",
            "model": model,
            "created": _CREATED,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": reasoning_words},
            },
        }
    )


class _HoldAccessor:
    """Make ``Fault.hold`` both a field (on instances) and a constructor (on the class).

    This is a non-data descriptor installed on :class:`Fault` after the
    dataclass machinery ran: instances store ``hold`` in their ``__dict__``,
    which shadows the descriptor, so ``fault.hold`` is the float field, while
    ``Fault.hold(2.0)`` reaches :meth:`Fault._hold_ctor`.
    """

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        """Return the constructor on class access, the field on instance access."""
        if obj is None:
            assert objtype is not None
            return functools.partial(objtype._hold_ctor.__func__, objtype)  # type: ignore[attr-defined]
        return obj.__dict__["hold"]  # pragma: no cover - shadowed by the instance dict


@dataclasses.dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour of :class:`FakeArkServer`.

    Attributes:
        kind: ``"status"`` (answer ``status`` with ``headers`` and an Ark
            error built from ``code``/``message``), ``"reset"`` (abort the
            connection without any HTTP response), ``"truncate"`` (200 with
            the first half of a valid JSON answer), ``"invalid_json"`` (200
            with body ``not json``), ``"hold"`` (wait ``hold`` seconds, or
            until :meth:`FakeArkServer.release_holds`, then answer normally)
            or ``"empty"`` (200 with an empty body).
        match: apply only to requests whose key (last user message) equals
            this; ``None`` matches every request.
        times: how many matching requests the fault applies to; ``-1`` means
            forever.
        status: HTTP status for ``kind="status"``.
        headers: extra response headers for ``kind="status"``; a mapping is
            accepted and stored as a tuple of pairs so the fault stays hashable.
        code: Ark error code for ``kind="status"``.
        message: Ark error message for ``kind="status"``.
        hold: seconds to hold for ``kind="hold"``.

    ``Fault.hold(seconds, ...)`` called on the class is a convenience
    constructor; on an instance ``fault.hold`` is the field.
    """

    kind: str
    match: str | None = None
    times: int = 1
    status: int = 500
    headers: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    code: str = "InternalServiceError"
    message: str = "fake fault"
    hold: float = 0.0

    def __post_init__(self) -> None:
        """Validate the fields and freeze ``headers`` into a tuple of pairs."""
        if self.kind not in _FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {sorted(_FAULT_KINDS)}"
            )
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be a positive count or -1 (forever)")
        headers = self.headers
        pairs = (
            tuple(headers.items()) if isinstance(headers, Mapping) else tuple(headers)
        )
        object.__setattr__(self, "headers", tuple((str(k), str(v)) for k, v in pairs))

    @classmethod
    def rate_limited(
        cls,
        retry_after: str | None = "1",
        *,
        match: str | None = None,
        times: int = 1,
        header: str = "Retry-After",
    ) -> Fault:
        """A 429 ``RateLimitExceeded.EndpointRPMExceeded`` with an optional retry header.

        ``header`` may be e.g. ``"retry-after-ms"``; ``retry_after=None`` sends
        no retry header at all.
        """
        headers = {header: retry_after} if retry_after is not None else {}
        return cls(
            "status",
            match=match,
            times=times,
            status=429,
            headers=headers,
            code="RateLimitExceeded.EndpointRPMExceeded",
            message="The request rate of the endpoint exceeded the RPM limit (fake).",
        )

    @classmethod
    def server_error(
        cls,
        status: int = 500,
        *,
        code: str = "InternalServiceError",
        message: str = "fake fault",
        headers: Mapping[str, str] | None = None,
        match: str | None = None,
        times: int = 1,
    ) -> Fault:
        """An error answer with the given status (500 by default)."""
        return cls(
            "status",
            match=match,
            times=times,
            status=status,
            headers=dict(headers or {}),
            code=code,
            message=message,
        )

    @classmethod
    def bad_request(
        cls,
        message: str = "fake invalid parameter",
        *,
        match: str | None = None,
        times: int = 1,
    ) -> Fault:
        """A 400 ``InvalidParameter`` answer."""
        return cls(
            "status",
            match=match,
            times=times,
            status=400,
            code="InvalidParameter",
            message=message,
        )

    @classmethod
    def unauthorized(cls, *, match: str | None = None, times: int = 1) -> Fault:
        """A 401 ``AuthenticationError`` answer."""
        return cls(
            "status",
            match=match,
            times=times,
            status=401,
            code="AuthenticationError",
            message="The API key in the request is missing or invalid (fake).",
        )

    @classmethod
    def reset(cls, *, match: str | None = None, times: int = 1) -> Fault:
        """Abort the connection without sending a response."""
        return cls("reset", match=match, times=times)

    @classmethod
    def truncate(cls, *, match: str | None = None, times: int = 1) -> Fault:
        """Answer 200 with only the first half of a valid JSON body."""
        return cls("truncate", match=match, times=times)

    @classmethod
    def invalid_json(cls, *, match: str | None = None, times: int = 1) -> Fault:
        """Answer 200 with the body ``not json``."""
        return cls("invalid_json", match=match, times=times)

    @classmethod
    def empty(cls, *, match: str | None = None, times: int = 1) -> Fault:
        """Answer 200 with an empty body."""
        return cls("empty", match=match, times=times)

    @classmethod
    def _hold_ctor(
        cls, seconds: float, *, match: str | None = None, times: int = 1
    ) -> Fault:
        """Hold matching requests ``seconds`` (or until released), then answer normally.

        Reached as ``Fault.hold(seconds, match=..., times=...)``.
        """
        return cls("hold", match=match, times=times, hold=float(seconds))


# ``Fault.hold`` on the class is the constructor; ``fault.hold`` is the field.
# Installed after @dataclass so the field default (0.0) is unaffected.
setattr(Fault, "hold", _HoldAccessor())  # noqa: B010


class _FaultSlot:
    """A registered fault, its place in insertion order, and how many more requests it applies to."""

    __slots__ = ("fault", "remaining", "seq")

    def __init__(self, fault: Fault, seq: int) -> None:
        self.fault = fault
        self.remaining = fault.times
        self.seq = seq


def _format_seconds(seconds: float) -> str:
    """``1.0 -> "1"``, ``0.1 -> "0.1"``, ``0.25 -> "0.25"`` (at most 3 decimals)."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


class _Bucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``capacity``; starts full."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        """Add what ``rate`` earned since the last refill (never above ``capacity``)."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, cost: float) -> float:
        """Seconds until the bucket admits ``cost`` (0 if it does now).

        A cost above the capacity is admitted by a full bucket (the level goes
        negative: a debt the next requests wait out), so no request is refused forever.
        """
        need = min(cost, self.capacity)
        missing = need - self.level
        return 0.0 if missing <= 1e-9 else missing / self.rate


@dataclasses.dataclass(frozen=True)
class _Quota:
    """What :meth:`FakeArkServer.set_quota` configured."""

    requests_per_second: float | None
    tokens_per_minute: float | None
    burst_seconds: float
    retry_after_step: float | None


class _CountingSite(web.TCPSite):
    """A TCP site that calls ``on_connection()`` for every connection it accepts.

    The protocol factory handed to ``loop.create_server`` runs once per accepted socket
    (before any TLS handshake), so this counts connections, not requests.
    """

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *,
        backlog: int, ssl_context: ssl.SSLContext | None, on_connection: Callable[[], None],
    ) -> None:
        super().__init__(runner, host, port, backlog=backlog, ssl_context=ssl_context)
        self._on_connection = on_connection

    async def start(self) -> None:
        """Register with the runner and listen, with the counting protocol factory."""
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        count = self._on_connection

        def factory() -> asyncio.BaseProtocol:
            count()
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
        )


class FakeArkServer:
    """A fake Ark / OpenAI-compatible chat-completions server in a background thread.

    Counters (read them from any thread; they are updated under a lock in the
    server thread; use :meth:`snapshot` for a consistent copy):

    * ``total_requests``: every arrival at a chat route, faulted or not.
    * ``ok_responses``: 200 answers carrying a real completion.
    * ``in_flight`` / ``peak_in_flight``: requests currently being handled /
      the maximum seen.
    * ``attempts_by_key`` / ``ok_by_key``: per key (last user message)
      arrivals / real completions.
    * ``client_request_ids``: ``X-Client-Request-Id`` of every arrival
      (``""`` if absent), in arrival order.
    * ``statuses``: HTTP statuses sent (aborted connections are not counted).
    * ``pause_started_at`` / ``pause_ends_at`` (readings of ``clock``),
      ``requests_during_pause`` and ``pause_arrival_times`` (seconds since
      the pause started) for the latest :meth:`pause`.
    * ``quota_refusals``: arrivals refused by the quota of :meth:`set_quota`,
      by error code (``RateLimitExceeded.EndpointRPMExceeded`` /
      ``RateLimitExceeded.EndpointTPMExceeded``).
    * ``accepted_by_client`` / ``refused_by_client``: arrivals let through /
      refused by the pause or the quota, per client (see ``client_of``).
    * :meth:`timeline`: accepted and refused arrivals per time bin, in
      seconds since ``started_at`` (the ``clock`` reading at creation).
    * ``connections_opened``: connections the server accepted (every
      connection, whatever its requests; over TLS each one is a handshake:
      the server resumes no session).

    Handling order of a request: count the arrival -> global pause (429 or the
    pause's status, no latency) -> quota (429, no latency) -> latency ->
    authentication (401) -> validation (400) -> scripted fault -> answer.
    """

    _SHUTDOWN_TIMEOUT: ClassVar[float] = 0.5

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        client_of: Callable[[str], str] | None = None,
        tls: bool = False,
    ) -> None:
        """Configure the server; call :meth:`start` (or use ``with``) to run it.

        Args:
            api_key: the expected ``Authorization: Bearer`` key; ``None``
                disables authentication.
            latency: seconds every answered request is delayed by
                (settable attribute).
            latency_jitter: extra uniform random delay in ``[0, jitter]``
                seconds, from a ``random.Random(0)`` (settable attribute).
            host: interface to listen on.
            port: port to listen on; 0 picks a free port.
            clock: the monotonic clock of the pause, the quota and the
                timeline (tests pass a manual clock; latency and holds
                always take real time).
            client_of: names the client of a request from its key (last user
                message), for ``accepted_by_client`` / ``refused_by_client``;
                by default the client is the ``X-Client-Request-Id`` up to its
                last ``-`` (arkbatch's clients send ``<client>-<n>``).
            tls: serve HTTPS with a certificate from a test CA made at
                :meth:`start` (needs ``trustme``); its PEM is at ``ca_pem_path``.
        """
        self._expected_auth = (
            None if api_key is None else ("Bearer " + api_key).encode("utf-8")
        )
        self.latency = float(latency)
        self.latency_jitter = float(latency_jitter)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._rng = random.Random(0)
        self.clock = clock
        self.client_of = client_of
        self.started_at = clock()
        self.tls = bool(tls)
        self._tls_dir: str | None = None
        self._server_ssl: ssl.SSLContext | None = None

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._faults: list[_FaultSlot] = []
        # Indexes over _faults (same slots): by exact key, and those matching every key, so
        # a soak with a fault per prompt costs a dict look-up per request, not a scan.
        self._faults_by_key: dict[str, list[_FaultSlot]] = {}
        self._faults_any: list[_FaultSlot] = []
        self._callbacks: tuple[Callable[[int], None], ...] = ()

        self.total_requests = 0
        self.ok_responses = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.attempts_by_key: collections.Counter[str] = collections.Counter()
        self.ok_by_key: collections.Counter[str] = collections.Counter()
        self.client_request_ids: list[str] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.connections_opened = 0

        self.pause_started_at: float | None = None
        self.pause_ends_at: float | None = None
        self.requests_during_pause = 0
        self.pause_arrival_times: list[float] = []
        self._pause_form = "seconds"
        self._pause_http_date = ""
        self._pause_status = 429

        self._quota: _Quota | None = None
        self._rps_bucket: _Bucket | None = None
        self._tpm_bucket: _Bucket | None = None
        self.quota_refusals: collections.Counter[str] = collections.Counter()
        self.accepted_by_client: collections.Counter[str] = collections.Counter()
        self.refused_by_client: collections.Counter[str] = collections.Counter()
        # Arrivals per (client, tenth of a second since started_at), for timeline().
        self._accepted_ticks: collections.Counter[tuple[str, int]] = collections.Counter()
        self._refused_ticks: collections.Counter[tuple[str, int]] = collections.Counter()

        self._release_generation = 0
        self._release_event: asyncio.Event | None = None
        self._stopping = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the server thread and block until the server is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeArkServer already started")
        _raise_nofile_limit()
        if self.tls:
            self._make_certificates()
        self._stopping = False
        self._start_error = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="FakeArkServer", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            self._remove_certificates()
            raise RuntimeError("FakeArkServer failed to start") from self._start_error
        return self

    def _make_certificates(self) -> None:
        """Issue a server certificate from a new test CA; write the CA's PEM to a temp folder."""
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise RuntimeError(
                "FakeArkServer(tls=True) needs trustme: pip install trustme (the test extra)"
            ) from exc
        ca = trustme.CA(organization_name="arkbatch FakeArkServer test CA")
        names = ["127.0.0.1", "::1", "localhost"]
        if self._host not in ("", "0.0.0.0", "::", *names):
            names.append(self._host)
        cert = ca.issue_cert(*names)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self._tls_dir = tempfile.mkdtemp(prefix="fake-ark-ca-")
        ca.cert_pem.write_to_path(os.path.join(self._tls_dir, "ca.pem"))
        self._server_ssl = ctx

    def _remove_certificates(self) -> None:
        """Delete the CA's PEM (the server's certificate lives only in memory)."""
        folder, self._tls_dir, self._server_ssl = self._tls_dir, None, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server: cancel held requests, close connections, join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=30)
        except Exception:  # pragma: no cover - best effort shutdown
            logger.exception("FakeArkServer: error while stopping")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None
        self._loop = None
        self._runner = None
        self._remove_certificates()

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on (only valid once started)."""
        if self._port is None:
            raise RuntimeError("FakeArkServer is not started")
        return self._port

    @property
    def _url_host(self) -> str:
        """Host part usable in a URL for connecting to this server."""
        host = self._host
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    @property
    def scheme(self) -> str:
        """``"https"`` for a server made with ``tls=True``, else ``"http"``."""
        return "https" if self.tls else "http"

    @property
    def base_url(self) -> str:
        """Ark base URL, e.g. ``http://127.0.0.1:PORT/api/v3`` (``https://`` with ``tls=True``)."""
        return f"{self.scheme}://{self._url_host}:{self.port}/api/v3"

    @property
    def openai_base_url(self) -> str:
        """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.scheme}://{self._url_host}:{self.port}/v1"

    @property
    def ca_pem_path(self) -> str:
        """The PEM file of the test CA that issued the server's certificate (``tls=True``).

        Pass it as ``--ca_bundle`` / ``Endpoint.ca_bundle``, or as ``SSL_CERT_FILE``; the
        file exists while the server runs.

        Example:
            >>> import http.client, json, ssl
            >>> with FakeArkServer(api_key=None, tls=True) as srv:
            ...     ctx = ssl.create_default_context(cafile=srv.ca_pem_path)
            ...     conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx)
            ...     for _ in range(2):  # one connection (one handshake), two requests
            ...         conn.request("POST", "/api/v3/chat/completions",
            ...                      b'{"messages": [{"role": "user", "content": "hi"}]}')
            ...         answer = json.loads(conn.getresponse().read())
            ...     conn.close()
            ...     print(srv.base_url[:8], answer["choices"][0]["message"]["content"],
            ...           srv.total_requests, srv.connections_opened)
            https:// echo: hi 2 1
        """
        if not self.tls:
            raise RuntimeError("FakeArkServer serves plain HTTP: make it with tls=True")
        if self._tls_dir is None:
            raise RuntimeError("FakeArkServer is not started")
        return os.path.join(self._tls_dir, "ca.pem")

    def _run(self, ready: threading.Event) -> None:
        """Server thread body: run the event loop until :meth:`stop`."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._loop = None
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True)
                )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _astart(self) -> None:
        """Create the aiohttp app and start listening."""
        self._release_event = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for route in _ROUTES:
            app.router.add_post(route, self._handle)
        app.router.add_get(_STATS_ROUTE, self._stats)
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self._SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = _CountingSite(
            runner,
            self._host,
            self._requested_port,
            backlog=4096,
            ssl_context=self._server_ssl,
            on_connection=self._count_connection,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    def _count_connection(self) -> None:
        """Count an accepted connection (server thread)."""
        with self._lock:
            self.connections_opened += 1

    async def _stats(self, request: web.Request) -> web.Response:
        """``GET /_fake/stats``: the scalar counters as JSON (for a server in another process)."""
        with self._lock:
            stats = {
                "total_requests": self.total_requests,
                "ok_responses": self.ok_responses,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "connections_opened": self.connections_opened,
                "requests_during_pause": self.requests_during_pause,
            }
        return web.Response(body=orjson.dumps(stats), content_type=_JSON_CT)

    async def _astop(self) -> None:
        """Wake held requests (they abort) and clean up the runner."""
        self._stopping = True
        if self._release_event is not None:
            self._release_event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ control

    def add_fault(self, fault: Fault) -> None:
        """Append a scripted fault (thread-safe); faults are tried in insertion order."""
        with self._lock:
            slot = _FaultSlot(fault, len(self._faults))
            self._faults.append(slot)
            if fault.match is None:
                self._faults_any.append(slot)
            else:
                self._faults_by_key.setdefault(fault.match, []).append(slot)

    def clear_faults(self) -> None:
        """Remove every scripted fault."""
        with self._lock:
            self._faults.clear()
            self._faults_by_key.clear()
            self._faults_any.clear()

    def pending_faults(self) -> list[tuple[Fault, int]]:
        """Return ``(fault, remaining)`` for every fault that is not spent yet."""
        with self._lock:
            return [
                (slot.fault, slot.remaining)
                for slot in self._faults
                if slot.remaining != 0
            ]

    def on_request(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(total_requests)`` in the server thread on every arrival.

        Exceptions raised by the callback are logged and ignored.
        """
        with self._lock:
            self._callbacks = (*self._callbacks, callback)

    def release_holds(self) -> None:
        """Make every request held by a ``hold`` fault answer now.

        Requests that have already arrived but not yet started holding are
        released as well; later requests hold normally.
        """
        with self._lock:
            self._release_generation += 1
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release_now)

    def _release_now(self) -> None:
        """Set the current release event and replace it (server thread)."""
        event = self._release_event
        self._release_event = asyncio.Event()
        if event is not None:
            event.set()

    def pause(
        self, seconds: float, *, retry_after_form: str = "seconds", status: int = 429
    ) -> None:
        """Refuse every request with ``ServerOverloaded`` (429 by default) for ``seconds`` from now.

        A pause the server announces to every client: each arrival inside it
        is refused at once (no latency, no quota spent) with ``status`` (429,
        or e.g. 503) and the remaining time. ``retry_after_form`` is
        ``"seconds"`` (``Retry-After: <ceil remaining>``), ``"float"``
        (``Retry-After: <remaining, 3 decimals>``), ``"http-date"``
        (``Retry-After: <HTTP-date of the end>``; the end is rounded up to a
        whole second and the pause lasts until then) or ``"ms"``
        (``retry-after-ms: <ceil remaining ms>``). Resets
        ``requests_during_pause`` and ``pause_arrival_times``. ``seconds <= 0``
        ends any current pause.
        """
        if retry_after_form not in _PAUSE_FORMS:
            raise ValueError(f"retry_after_form must be one of {sorted(_PAUSE_FORMS)}")
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (4xx/5xx), got {status}")
        now = self.clock()
        with self._lock:
            if seconds <= 0:
                if self.pause_ends_at is not None and self.pause_ends_at > now:
                    self.pause_ends_at = now
                return
            end = now + seconds
            if retry_after_form == "http-date":
                wall_end = math.ceil(time.time() + seconds)
                end = now + (wall_end - time.time())
                self._pause_http_date = email.utils.format_datetime(
                    datetime.datetime.fromtimestamp(wall_end, datetime.UTC), usegmt=True
                )
            self._pause_form = retry_after_form
            self._pause_status = status
            self.pause_started_at = now
            self.pause_ends_at = end
            self.requests_during_pause = 0
            self.pause_arrival_times = []

    def set_quota(
        self,
        requests_per_second: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        burst_seconds: float = 1.0,
        retry_after_step: float | None = 0.1,
    ) -> None:
        """Share one quota among every client of this server (thread-safe; call any time).

        Two token buckets, each holding at most ``burst_seconds`` of its rate
        (at least one request / one token): ``requests_per_second`` (each
        arrival costs 1) and ``tokens_per_minute`` (each costs the
        ``total_tokens`` its answer reports: prompt words plus completion
        words; a malformed body costs 0). ``None`` means no limit; both None
        turns the quota off (the default). An arrival that a bucket cannot
        admit is answered at once with 429
        ``RateLimitExceeded.EndpointRPMExceeded`` (or ``...TPMExceeded``),
        ``Retry-After`` and ``retry-after-ms`` saying when the buckets will
        admit it, rounded up to a multiple of ``retry_after_step`` seconds
        (``None``: no retry header at all); it spends nothing and is not
        served. A refused request is no reservation: whoever comes first
        after the refill gets in.

        Changing a limit keeps each bucket's level (capped at its new
        capacity), so halving the quota mid-run gives no extra burst; a bucket
        that had no limit before starts full.

        Example (a manual clock: time moves only when the example moves it):
            >>> import http.client
            >>> def ask(srv):
            ...     conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            ...     body = b'{"messages": [{"role": "user", "content": "hi"}]}'
            ...     conn.request("POST", "/api/v3/chat/completions", body)
            ...     resp = conn.getresponse()
            ...     _ = resp.read()
            ...     conn.close()
            ...     return resp.status, resp.getheader("Retry-After")
            >>> now = [0.0]
            >>> with FakeArkServer(api_key=None, clock=lambda: now[0]) as srv:
            ...     srv.set_quota(requests_per_second=2)
            ...     print([ask(srv) for _ in range(3)])
            ...     now[0] = 0.5  # the bucket earned one request
            ...     print(ask(srv), srv.quota_refusals, srv.timeline())
            [(200, None), (200, None), (429, '0.5')]
            (200, None) Counter({'RateLimitExceeded.EndpointRPMExceeded': 1}) [(0.0, 3, 1)]
        """
        for name, value in (
            ("requests_per_second", requests_per_second),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if not burst_seconds > 0:
            raise ValueError(f"burst_seconds must be > 0, got {burst_seconds}")
        if retry_after_step is not None and not retry_after_step >= 0.001:
            raise ValueError(f"retry_after_step must be >= 0.001 s or None, got {retry_after_step}")
        with self._lock:
            now = self.clock()
            self._rps_bucket = self._rebucket(
                self._rps_bucket, requests_per_second, burst_seconds, now
            )
            tokens_per_second = None if tokens_per_minute is None else tokens_per_minute / 60
            self._tpm_bucket = self._rebucket(
                self._tpm_bucket, tokens_per_second, burst_seconds, now
            )
            self._quota = (
                None
                if requests_per_second is None and tokens_per_minute is None
                else _Quota(
                    requests_per_second, tokens_per_minute, burst_seconds, retry_after_step
                )
            )

    @staticmethod
    def _rebucket(
        bucket: _Bucket | None, rate: float | None, burst_seconds: float, now: float
    ) -> _Bucket | None:
        """The bucket for a new ``rate``, keeping the level of the old one (if any)."""
        if rate is None:
            return None
        capacity = max(1.0, rate * burst_seconds)
        if bucket is None:
            return _Bucket(rate, capacity, now)
        bucket.refill(now)
        bucket.rate, bucket.capacity = rate, capacity
        bucket.level = min(bucket.level, capacity)
        return bucket

    @property
    def quota(self) -> dict[str, float | None] | None:
        """The quota :meth:`set_quota` set (``None`` when there is none).

        Example:
            >>> srv = FakeArkServer()
            >>> srv.set_quota(tokens_per_minute=6000)
            >>> srv.quota
            {'requests_per_second': None, 'tokens_per_minute': 6000, 'burst_seconds': 1.0, 'retry_after_step': 0.1}
        """
        quota = self._quota
        return None if quota is None else dataclasses.asdict(quota)

    def timeline(
        self, bin_seconds: float = 1.0, *, client: str | None = None
    ) -> list[tuple[float, int, int]]:
        """Arrivals per time bin: ``(start, accepted, refused)`` from the first to the last busy bin.

        ``start`` is in seconds since the server was created (``started_at``),
        floored to a multiple of ``bin_seconds`` (a multiple of 0.1 s: the
        resolution of the counts). *Accepted* arrivals passed the pause and the
        quota; *refused* ones were answered 429 (or the pause's status) by
        them. Bins with no arrival inside the span are listed with zeros.
        ``client`` counts only the arrivals of that client (see ``client_of``).

        Example (see :meth:`set_quota` for one with traffic):
            >>> FakeArkServer().timeline()  # nothing arrived yet
            []
        """
        ticks = max(1, round(bin_seconds / _TICK))
        with self._lock:
            accepted: collections.Counter[int] = collections.Counter()
            refused: collections.Counter[int] = collections.Counter()
            for (who, t), n in self._accepted_ticks.items():
                if client is None or who == client:
                    accepted[t // ticks] += n
            for (who, t), n in self._refused_ticks.items():
                if client is None or who == client:
                    refused[t // ticks] += n
        busy = set(accepted) | set(refused)
        if not busy:
            return []
        width = ticks * _TICK
        return [
            (round(b * width, 3), accepted[b], refused[b])
            for b in range(min(busy), max(busy) + 1)
        ]

    def reset_counters(self) -> None:
        """Zero every counter (faults, pause state, quota and callbacks are kept)."""
        with self._lock:
            self.total_requests = 0
            self.ok_responses = 0
            self.connections_opened = 0
            self.peak_in_flight = self.in_flight
            self.attempts_by_key.clear()
            self.ok_by_key.clear()
            self.client_request_ids.clear()
            self.statuses.clear()
            self.requests_during_pause = 0
            self.pause_arrival_times = []
            self.quota_refusals.clear()
            self.accepted_by_client.clear()
            self.refused_by_client.clear()
            self._accepted_ticks.clear()
            self._refused_ticks.clear()

    def wait_for_requests(self, n: int, timeout: float = 30) -> bool:
        """Block until ``total_requests >= n``; return False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.total_requests >= n, timeout)

    def snapshot(self) -> dict[str, Any]:
        """Return a consistent copy of every counter."""
        with self._lock:
            return {
                "total_requests": self.total_requests,
                "ok_responses": self.ok_responses,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
                "attempts_by_key": collections.Counter(self.attempts_by_key),
                "ok_by_key": collections.Counter(self.ok_by_key),
                "client_request_ids": list(self.client_request_ids),
                "statuses": collections.Counter(self.statuses),
                "requests_during_pause": self.requests_during_pause,
                "pause_arrival_times": list(self.pause_arrival_times),
                "quota_refusals": collections.Counter(self.quota_refusals),
                "accepted_by_client": collections.Counter(self.accepted_by_client),
                "refused_by_client": collections.Counter(self.refused_by_client),
                "connections_opened": self.connections_opened,
            }

    # ------------------------------------------------------------------ handling

    def _take_fault(self, key: str) -> Fault | None:
        """Return (and spend one use of) the first live fault matching ``key``."""
        if not self._faults:
            return None
        with self._lock:
            best: _FaultSlot | None = None
            keyed = self._faults_by_key.get(key)
            if keyed:
                while keyed and keyed[0].remaining == 0:
                    keyed.pop(0)  # spent (it stays listed in _faults)
                best = keyed[0] if keyed else None
            for slot in self._faults_any:
                if slot.remaining != 0:
                    if best is None or slot.seq < best.seq:
                        best = slot
                    break
            if best is None:
                return None
            if best.remaining > 0:
                best.remaining -= 1
            return best.fault

    def _refusal_locked(
        self, arrived: float, client: str, tokens: int
    ) -> tuple[int, str, str, dict[str, str]] | None:
        """Whether the pause or the quota refuses an arrival, counted (lock held).

        Returns ``(status, code, message, headers)`` of the refusal, or None.
        """
        pause_headers = self._pause_headers_locked(arrived)
        refusal: tuple[int, str, str, dict[str, str]] | None
        if pause_headers is not None:
            refusal = (
                self._pause_status,
                "ServerOverloaded",
                "The service is overloaded (fake pause).",
                pause_headers,
            )
        else:
            refusal = self._quota_refusal_locked(arrived, tokens)
        tick = math.floor((arrived - self.started_at) / _TICK)
        if refusal is None:
            self._accepted_ticks[client, tick] += 1
            self.accepted_by_client[client] += 1
        else:
            self._refused_ticks[client, tick] += 1
            self.refused_by_client[client] += 1
        return refusal

    def _quota_refusal_locked(
        self, now: float, tokens: int
    ) -> tuple[int, str, str, dict[str, str]] | None:
        """Spend the quota for an arrival costing ``tokens``, or say why not (lock held)."""
        quota, rps, tpm = self._quota, self._rps_bucket, self._tpm_bucket
        if quota is None:
            return None
        wait, code, message = 0.0, "", ""
        if rps is not None:
            rps.refill(now)
            wait = rps.wait(1)
            code = "RateLimitExceeded.EndpointRPMExceeded"
            message = "The request rate of the endpoint exceeded its quota (fake)."
        if tpm is not None:
            tpm.refill(now)
            tpm_wait = tpm.wait(tokens)
            if tpm_wait > wait:
                wait = tpm_wait
                code = "RateLimitExceeded.EndpointTPMExceeded"
                message = "The token rate of the endpoint exceeded its quota (fake)."
        if wait <= 0:
            if rps is not None:
                rps.level -= 1
            if tpm is not None:
                tpm.level -= tokens
            return None
        self.quota_refusals[code] += 1
        headers: dict[str, str] = {}
        step = quota.retry_after_step
        if step is not None:
            announced = max(1, math.ceil(wait / step - 1e-9)) * step
            headers["Retry-After"] = _format_seconds(announced)
            headers["retry-after-ms"] = str(round(announced * 1000))
        return 429, code, message, headers

    def _pause_headers_locked(self, arrived: float) -> dict[str, str] | None:
        """Return the retry header if ``arrived`` falls inside the pause (lock held)."""
        start, end = self.pause_started_at, self.pause_ends_at
        if start is None or end is None or not (start <= arrived < end):
            return None
        self.requests_during_pause += 1
        self.pause_arrival_times.append(arrived - start)
        remaining = end - arrived
        form = self._pause_form
        if form == "seconds":
            return {"Retry-After": str(max(1, math.ceil(remaining)))}
        if form == "float":
            return {"Retry-After": f"{remaining:.3f}"}
        if form == "http-date":
            return {"Retry-After": self._pause_http_date}
        return {"retry-after-ms": str(max(1, math.ceil(remaining * 1000)))}

    def _respond(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        ok_key: str | None = None,
    ) -> web.Response:
        """Count and build a response; ``ok_key`` marks a real completion."""
        with self._lock:
            self.statuses[status] += 1
            if ok_key is not None:
                self.ok_responses += 1
                self.ok_by_key[ok_key] += 1
        return web.Response(status=status, body=body, headers=headers)

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str],
        param: str = "",
    ) -> web.Response:
        """Build an Ark error response."""
        return self._respond(status, _error_body(status, code, message, param), headers)

    @staticmethod
    def _abort(request: web.Request) -> NoReturn:
        """Abort the connection so the client sees a reset, and end the handler."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError

    async def _hold(self, seconds: float, generation: int) -> None:
        """Sleep ``seconds`` unless released (see :meth:`release_holds`)."""
        if generation != self._release_generation or self._stopping:
            return
        event = self._release_event
        if event is None:  # pragma: no cover - only before start
            return
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Handle one chat-completions request."""
        arrived = self.clock()
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._handle_inner(request, arrived)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _handle_inner(
        self, request: web.Request, arrived: float
    ) -> web.StreamResponse:
        """Body of :meth:`_handle` (counts are kept by the caller)."""
        req_headers = request.headers
        client_id = req_headers.get("X-Client-Request-Id", "")
        headers = {"Content-Type": _JSON_CT}
        if client_id:
            headers["X-Request-Id"] = client_id
        raw = await request.read()
        body, key, prompt_words = _parse_request(raw)
        if self.client_of is not None:
            client = self.client_of(key or "")
        else:
            client = client_id.rpartition("-")[0]
        tokens = 0
        if key is not None and self._tpm_bucket is not None:
            tokens = prompt_words + _completion_words(key)

        with self._cond:
            self.total_requests += 1
            total = self.total_requests
            if key is not None:
                self.attempts_by_key[key] += 1
            self.client_request_ids.append(client_id)
            generation = self._release_generation
            refusal = self._refusal_locked(arrived, client, tokens)
            self._cond.notify_all()
        for callback in self._callbacks:
            try:
                callback(total)
            except Exception:
                logger.exception("FakeArkServer: on_request callback failed")

        if refusal is not None:
            status, code, message, extra = refusal
            headers.update(extra)
            return self._error(status, code, message, headers)

        delay = self.latency
        if self.latency_jitter > 0:
            delay += self._rng.uniform(0.0, self.latency_jitter)
        if delay > 0:
            await asyncio.sleep(delay)

        expected = self._expected_auth
        if expected is not None:
            got = req_headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(got, expected):
                return self._error(
                    401,
                    "AuthenticationError",
                    "The API key in the request is missing or invalid.",
                    headers,
                )

        if body is None or key is None:
            return self._error(
                400,
                "InvalidParameter",
                "The request body must be a JSON object with a non-empty `messages` list.",
                headers,
                param="messages",
            )
        if body.get("stream") is True and "/batch/" in request.path:
            return self._error(
                400,
                "InvalidParameter",
                "Streaming is not supported by batch inference.",
                headers,
                param="stream",
            )

        model = body.get("model")
        model = model if isinstance(model, str) else ""
        fault = self._take_fault(key)
        if fault is not None:
            kind = fault.kind
            if kind == "status":
                headers.update(fault.headers)
                return self._error(fault.status, fault.code, fault.message, headers)
            if kind == "reset":
                self._abort(request)
            if kind == "truncate":
                full = _completion(model, key, prompt_words)
                return self._respond(200, full[: len(full) // 2], headers)
            if kind == "invalid_json":
                return self._respond(200, b"not json", headers)
            if kind == "empty":
                return self._respond(200, b"", headers)
            if kind == "hold":
                await self._hold(fault.hold, generation)
                if self._stopping:
                    self._abort(request)
        return self._respond(
            200, _completion(model, key, prompt_words), headers, ok_key=key
        )


def _raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (best effort)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake server from the command line until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        description="Fake Volcengine Ark batch-inference server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every answer"
    )
    parser.add_argument(
        "--latency-jitter", type=float, default=0.0, help="extra uniform 0..J seconds"
    )
    parser.add_argument(
        "--api-key", default="test-key", help="expected Bearer key (default: test-key)"
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="accept requests without a valid key"
    )
    parser.add_argument(
        "--rps", type=float, default=None, help="shared quota: requests per second"
    )
    parser.add_argument(
        "--tpm", type=float, default=None, help="shared quota: tokens per minute"
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=1.0,
        help="each quota bucket holds this many seconds of its rate (default 1)",
    )
    parser.add_argument(
        "--retry-after-step",
        type=float,
        default=0.1,
        help="quota refusals announce a Retry-After rounded up to this (default 0.1 s; 0: none)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a certificate from a test CA (needs trustme); "
        "prints the CA's PEM file on a second line, 'ca_bundle PATH'",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        """Ask the main loop below to stop the server."""
        stop.set()

    previous = {
        sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    server = FakeArkServer(
        api_key=None if args.no_auth else args.api_key,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        host=args.host,
        port=args.port,
        tls=args.tls,
    )
    if args.rps is not None or args.tpm is not None:
        server.set_quota(
            args.rps,
            args.tpm,
            burst_seconds=args.burst_seconds,
            retry_after_step=args.retry_after_step or None,
        )
    try:
        with server:
            host = server._url_host
            print(f"listening on {server.scheme}://{host}:{server.port}", flush=True)
            if server.tls:
                print(f"ca_bundle {server.ca_pem_path}", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
