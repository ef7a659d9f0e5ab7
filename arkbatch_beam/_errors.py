"""The one exception tree, and the single place where aiohttp errors are mapped into it.

::

    ArkError
     ├── RetryableError                  retried until the request's deadline
     │    ├── TransportError             connection refused / reset / closed mid-answer
     │    │    └── AttemptTimeout        one attempt ran past attempt_timeout
     │    ├── RetryableStatus            408, 409, 429, 5xx
     │    │    └── RateLimited           429 (and 503 with Retry-After): feeds the pushback gate
     │    └── InvalidResponse            a 200 whose body is not valid JSON (bounded retries)
     ├── RequestRejected                 any other 4xx: not retried; carries the server's words
     │    └── EndpointError              401/403/404: the endpoint or key is wrong for everyone
     └── DeadlineExceeded                the next wait would pass the request's deadline

Every class has an ``error_type`` string, the value written to the output's ``error_type``
column. Messages never contain the API key: they are built from status, server JSON and
exception class names only.

Example:
    >>> from arkbatch_beam._errors import error_for_status
    >>> e = error_for_status(429, {"error": {"code": "RateLimit", "message": "slow down"}})
    >>> type(e).__name__, e.retryable, e.error_code
    ('RateLimited', True, 'RateLimit')
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp


class ArkError(Exception):
    """Base of every error this library raises or records."""

    error_type = "error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.error_code = error_code
        # Seconds from "now" the server asked us to wait, when it said so.
        self.retry_after = retry_after


class RetryableError(ArkError):
    """A failure worth another attempt, while the deadline allows."""

    error_type = "retryable"
    retryable = True


class TransportError(RetryableError):
    """The connection failed: refused, reset, or closed before a full answer."""

    error_type = "connection_error"


class AttemptTimeout(TransportError):
    """One attempt ran past ``attempt_timeout`` (the request may still have time left)."""

    error_type = "attempt_timeout"


class RetryableStatus(RetryableError):
    """HTTP 408, 409 or 5xx."""

    error_type = "server_error"


class RateLimited(RetryableStatus):
    """HTTP 429, or a 503 that names a ``Retry-After``: the server is pushing back."""

    error_type = "rate_limited"


class InvalidResponse(RetryableError):
    """A 200 whose body is empty, truncated or not JSON, or lacks ``choices``."""

    error_type = "invalid_response"


class RequestRejected(ArkError):
    """A 4xx other than 408/409/429: the request itself is wrong; not retried."""

    error_type = "rejected"


class EndpointError(RequestRejected):
    """401, 403 or 404: the key or the endpoint is wrong, for every request alike."""

    error_type = "endpoint_error"


class DeadlineExceeded(ArkError):
    """The request's deadline (first send + timeout) came, or the next wait would pass it."""

    error_type = "deadline_exceeded"


RETRYABLE_STATUSES = frozenset({408, 409, 429})


def _server_error_fields(body: Any) -> tuple[str | None, str | None]:
    """(code, message) from an Ark/OpenAI error body, tolerating odd shapes."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            msg = err.get("message")
            return (str(code) if code is not None else None, str(msg) if msg is not None else None)
        if isinstance(err, str):
            return None, err
        msg = body.get("message")
        if isinstance(msg, str):
            return None, msg
    return None, None


def error_for_status(
    status: int, body: Any, *, retry_after: float | None = None, text: str = ""
) -> ArkError:
    """Map a non-200 HTTP answer to its error class (the only status -> class mapping).

    Args:
        status: the HTTP status.
        body: the parsed JSON body, or ``None`` when it was not JSON.
        retry_after: seconds the server asked us to wait, if it said so.
        text: raw body text, used (shortened) when there is no JSON message.
    """
    code, msg = _server_error_fields(body)
    code = code if code and code.strip() else None
    if msg is not None and not msg.strip():
        msg = None  # a blank message says nothing: fall back to the body or the status
    if msg is None:
        msg = text[:500] if text and text.strip() else f"HTTP {status}"
    kw = {"http_status": status, "error_code": code, "retry_after": retry_after}
    if status == 429 or (status == 503 and retry_after is not None):
        return RateLimited(msg, **kw)
    if status in RETRYABLE_STATUSES or 500 <= status <= 599:
        return RetryableStatus(msg, **kw)
    if status in (401, 403, 404):
        return EndpointError(msg, **kw)
    if 400 <= status <= 499:
        return RequestRejected(msg, **kw)
    # 1xx/3xx/other 2xx: the server answered something we do not understand.
    return InvalidResponse(f"unexpected HTTP {status}: {msg}", **kw)


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
