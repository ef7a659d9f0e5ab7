"""One HTTP attempt: the session (credentials from the environment, TCP keepalive), one POST
with a size cap, and the typed outcome of what came back.

The transport is the client's seam: :class:`HttpTransport` is the real one; tests may give the
client any ``async (payload, request_id) -> (status, headers, body)`` callable instead (see
``tests/test_engine.py``), so retry timing is tested on a fake clock without a network.

Credentials are read from the environment here, when the session opens in the worker: the key
(``Endpoint.api_key_env``) and any ``Endpoint.secret_headers``. They live only in the session's
default headers and in the :class:`~arkbatch_beam._result.Redactor` that scrubs them from every
row and log line; never in the config, a repr, or the pipeline graph.

Example:
    >>> import asyncio
    >>> from arkbatch_beam import ClientConfig, Endpoint
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> async def main(url):
    ...     t = HttpTransport(ClientConfig(Endpoint("ep", base_url=url, api_key_env="")))
    ...     await t.start()
    ...     try:
    ...         status, _, body = await t(b'{"model":"m","messages":[{"role":"user","content":"x"}]}', "r-1")
    ...     finally:
    ...         await t.close()
    ...     return status, classify(status, {}, body, 0.0).error
    >>> with FakeArkServer(api_key=None) as server:
    ...     asyncio.run(main(server.base_url))
    (200, None)
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import aiohttp
import orjson

from ._config import ClientConfig, Keepalive
from ._errors import (
    ArkError,
    AttemptTimeout,
    CertificateError,
    InvalidResponse,
    MissingApiKey,
    OptionError,
    RateLimited,
    TransportError,
    error_for_status,
)
from ._pacing import NEUTRAL, OK, OVERLOADED, REFUSED
from ._result import Redactor
from ._retry import parse_retry_after

log = logging.getLogger("arkbatch_beam")

# File descriptors a worker process needs besides one socket per request in flight.
FILES_BESIDES_SOCKETS = 256
# New connections being opened (TCP connect + TLS handshake) at once, per process. Requests past
# it wait for a turn before their connect timeout starts: 10,000 requests sent at once would
# otherwise start 10,000 handshakes, time out behind each other on a busy server, and retry:
# a handshake storm (measured: 27,503 connections for 10,000 requests, 0.15 x the throughput).
MAX_OPENING = 256


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, opening at most ``MAX_OPENING`` new connections at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opening = asyncio.Semaphore(MAX_OPENING)

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        async with self._opening:
            return await super()._create_connection(req, traces, timeout)
# A chat completion is kilobytes; a body beyond this is a broken or hostile server.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class Transport(Protocol):
    """``await transport(payload, request_id) -> (status, headers, body)``; raises ArkError."""

    async def __call__(self, payload: bytes, request_id: str) -> tuple[int, Mapping[str, str], bytes]: ...


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one attempt came to.

    Attributes:
        error: ``None`` for a 200 (the body is in ``body``), else the mapped error.
        signal: ``OK``, ``REFUSED`` (the server pushed back and named a time) or ``NEUTRAL``.
        body: the 200 body.
    """

    error: ArkError | None
    signal: str = NEUTRAL
    body: bytes = b""


def classify(status: int, headers: Mapping[str, str], body: bytes, wall_now: float) -> Outcome:
    """Turn an HTTP answer into an :class:`Outcome` (the only place statuses are read).

    Example:
        >>> o = classify(429, {"Retry-After": "2"}, b'{"error":{"message":"slow"}}', 0.0)
        >>> type(o.error).__name__, o.error.retry_after, o.signal
        ('RateLimited', 2.0, 'refused')
    """
    if status == 200:
        return Outcome(None, OK, body)
    parsed: Any = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        pass
    retry_after = parse_retry_after(headers, wall_now)
    err = error_for_status(
        status, parsed, retry_after=retry_after, text=body[:500].decode("utf-8", "replace")
    )
    if status == 503:
        return Outcome(err, OVERLOADED)  # the server says it is overloaded: cut (and pause, if it says how long)
    refused = isinstance(err, RateLimited) or (err.retryable and retry_after is not None)
    return Outcome(err, REFUSED if refused else NEUTRAL)


def keepalive_socket_factory(keepalive: Keepalive | None):
    """A socket factory for aiohttp that turns TCP keepalive on for every client socket.

    A connection a NAT gateway or load balancer drops silently (Cloud NAT: after 1,200 s idle)
    is then noticed after ``idle + interval x count`` seconds and the attempt retried, instead
    of waiting for the request's whole deadline.
    """

    def factory(addr_info: tuple) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        if keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS names the idle time differently
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(keepalive.idle))
            elif hasattr(socket, "TCP_KEEPALIVE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, int(keepalive.idle))
            if hasattr(socket, "TCP_KEEPINTVL"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, int(keepalive.interval))
            if hasattr(socket, "TCP_KEEPCNT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(keepalive.count))
        return sock

    return factory


class _RedactingFilter(logging.Filter):
    """Scrubs every secret this process has read from the library's log records (a safety net:
    no message is built from a secret, but a server's words may echo one)."""

    def __init__(self) -> None:
        super().__init__("")
        self.redactor = Redactor()

    def add(self, redactor: Redactor) -> None:
        self.redactor = Redactor([*self.redactor.secrets, *redactor.secrets])

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor:
            msg = record.getMessage()
            clean = self.redactor.text(msg)
            if clean != msg:
                record.msg, record.args = clean, None
        return True


_log_filter = _RedactingFilter()
log.addFilter(_log_filter)


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost``, 127.0.0.0/8, ::1).

    Example:
        >>> is_loopback("https://127.0.0.1:8443/v1"), is_loopback("https://ark.example.com")
        (True, False)
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(config: ClientConfig) -> ssl.SSLContext:
    """The TLS context for ``https://``: the system's trust store (honouring ``SSL_CERT_FILE``
    and ``SSL_CERT_DIR``), or ``Endpoint.ca_bundle``'s certificates. Always verifying.

    Example:
        >>> from arkbatch_beam import ClientConfig, Endpoint
        >>> ctx = tls_context(ClientConfig(Endpoint("m")))
        >>> ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        True
    """
    cafile = config.endpoint.ca_bundle
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot read the CA bundle {cafile!r} (ca_bundle): {exc}") from None
    return ctx


def raise_open_file_limit(max_concurrency: int) -> int:
    """Raise this process's open-file limit (soft, up to the hard one) to what ``max_concurrency``
    needs; returns the limit now.

    Each request in flight holds a socket (HTTP/1.1), so ``max_concurrency`` needs as many file
    descriptors plus ``FILES_BESIDES_SOCKETS`` for the process itself. When the hard limit is
    lower, an :class:`OptionError` says which limit to raise, or how far to lower the cap
    (at start-up, rather than sockets running out mid-job).

    Example:
        >>> raise_open_file_limit(10) >= 10 + FILES_BESIDES_SOCKETS
        True
    """
    needed = max_concurrency + FILES_BESIDES_SOCKETS
    try:
        import resource
    except ImportError:  # not on this platform
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        raise OptionError(
            "max_concurrency",
            f"must be at most {max(1, target - FILES_BESIDES_SOCKETS)} here: {max_concurrency} requests in flight "
            f"need about {needed} open files (a socket each, plus {FILES_BESIDES_SOCKETS}) and this process may "
            f"open {target} (hard limit {hard}); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, "
            "docker --ulimit nofile=) or lower --max_concurrency",
        )
    return target


def read_secret(version: str) -> str:
    """The API key held by Secret Manager version ``version``, read now through Beam's ``GcpSecret``.

    A failure is a :class:`MissingApiKey` naming the version and the reason (never a retry
    loop: a worker that cannot read the key fails its bundle with this message, and the job
    stops instead of hanging).
    """
    from apache_beam.utils.secret import GcpSecret

    try:
        value = GcpSecret(version).get_str()
    except Exception as exc:  # noqa: BLE001 - permission, network, a missing version, no library
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise MissingApiKey(
            f"could not read the API key from Secret Manager version {version}: {reason} (the workers' "
            "service account needs roles/secretmanager.secretAccessor on it, and workers without public "
            "IPs need Private Google Access)"
        ) from None
    if not value:
        raise MissingApiKey(f"Secret Manager version {version} holds an empty API key")
    return value.strip()


def read_credentials(config: ClientConfig) -> tuple[dict[str, str], Redactor]:
    """Headers holding the key and secret headers, read now (environment or Secret Manager), and a
    redactor that scrubs them."""
    ep = config.endpoint
    headers: dict[str, str] = {}
    secrets: list[str] = []
    if ep.api_key_secret:
        key = read_secret(ep.api_key_secret)
        headers["Authorization"] = f"Bearer {key}"
        secrets.append(key)
    wanted = list(ep.secret_headers)
    if ep.api_key_env and not ep.api_key_secret:
        wanted.append(("Authorization", ep.api_key_env))
    for name, env in wanted:
        value = os.environ.get(env, "")
        if not value:
            what = "the API key" if name == "Authorization" else f"the value of header {name}"
            raise MissingApiKey(
                f"environment variable {env} is not set: put {what} there (in the worker's "
                "environment)" + (", or pass api_key_env='' for a server without authentication"
                                  if name == "Authorization" else "")
            )
        headers[name] = f"Bearer {value}" if name == "Authorization" else value
        secrets.append(value)
    redactor = Redactor(secrets)
    _log_filter.add(redactor)
    if secrets and ep.url.startswith("http://") and not is_loopback(ep.url):
        log.warning(
            "arkbatch: sending credentials over plain http:// to %s; anyone on the path can read "
            "them: use https://", urllib.parse.urlsplit(ep.url).hostname,
        )
    return headers, redactor


class HttpTransport:
    """One aiohttp session; ``await transport(payload, rid)`` is one POST.

    The connector has no connection limit of its own: the client's scheduler is the one owner
    of concurrency (at most ``max_concurrency`` attempts run at once), so no attempt ever waits
    inside aiohttp's pool, whatever the mix of models.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self.redactor = Redactor()

    def __repr__(self) -> str:
        return f"HttpTransport(url={self.config.endpoint.url!r})"

    async def start(self) -> None:
        """Read the credentials from the environment and open the session (idempotent)."""
        if self._session is not None:
            return
        # One socket per request in flight (HTTP/1.1), plus the process's own files.
        raise_open_file_limit(self.config.max_concurrency)
        ep = self.config.endpoint
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        headers.update(dict(ep.headers))
        if ep.api_key_secret:  # a network call: off the event loop
            loop = asyncio.get_running_loop()
            secret_headers, self.redactor = await loop.run_in_executor(None, read_credentials, self.config)
        else:
            secret_headers, self.redactor = read_credentials(self.config)
        headers.update(secret_headers)
        connector = _Connector(
            ssl=tls_context(self.config),
            limit=0,
            limit_per_host=0,
            # (aiohttp's default, 15 s, drops every connection during a longer pause: a TLS
            # handshake per request in flight when it ends)
            keepalive_timeout=self.config.idle_connection_seconds,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,  # CPython < 3.12.8 leaks aborted SSL transports
            socket_factory=keepalive_socket_factory(self.config.keepalive),
        )
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=self.config.connect_timeout, sock_read=None
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
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __call__(self, payload: bytes, request_id: str) -> tuple[int, Mapping[str, str], bytes]:
        session = self._session
        if session is None:
            raise RuntimeError("transport is not started")
        with mapped_transport_errors():
            async with session.post(
                self.config.endpoint.url, data=payload, headers={"X-Client-Request-Id": request_id}
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


def map_transport_error(exc: BaseException) -> ArkError:
    """Translate an aiohttp/asyncio exception into the tree (the only such mapping)."""
    if isinstance(exc, ArkError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TransportError("connect timed out")
        return AttemptTimeout("attempt timed out")
    if isinstance(exc, aiohttp.ClientPayloadError):  # the connection broke mid-body
        return TransportError(f"response body cut short ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ContentTypeError):
        return InvalidResponse("response is not JSON")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):  # (before its base class below)
        host = f"{exc.host}:{exc.port}"
        return CertificateError(
            f"cannot verify the TLS certificate of {host}: {exc.certificate_error}; trust its CA with "
            "--ca_bundle PATH (Endpoint.ca_bundle) or SSL_CERT_FILE"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        # str(exc) names host:port and the OS error, never headers.
        return TransportError(f"cannot connect: {exc.os_error.strerror or type(exc).__name__}")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return TransportError(f"connection lost ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientError):
        return TransportError(f"client error ({type(exc).__name__})")
    if isinstance(exc, (ConnectionError, OSError)):
        return TransportError(f"connection error ({type(exc).__name__})")
    raise exc


@contextmanager
def mapped_transport_errors() -> Iterator[None]:
    """Re-raise aiohttp/OS errors inside the block as :class:`ArkError` subclasses.

    Example:
        >>> import aiohttp
        >>> try:
        ...     with mapped_transport_errors():
        ...         raise aiohttp.ServerDisconnectedError()
        ... except TransportError as e:
        ...     print(e.error_type)
        connection_error
    """
    try:
        yield
    except ArkError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise map_transport_error(exc) from exc
