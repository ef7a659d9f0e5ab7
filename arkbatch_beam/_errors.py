"""The one error vocabulary: every failure this library records in a row or raises.

::

    ArkError
     ├── RetryableError                  retried while the deadline allows
     │    ├── TransportError             connection refused / reset / closed mid-answer
     │    │    └── AttemptTimeout        one attempt ran past attempt_timeout
     │    ├── RetryableStatus            408, 409, 5xx
     │    │    └── RateLimited           429 (and 503 with Retry-After): feeds the pushback gate
     │    ├── InvalidResponse            a 200 whose body is not a completion (bounded retries)
     │    └── Cancelled                  the job stopped before the request ended
     ├── RequestRejected                 any other 4xx: not retried; carries the server's words
     │    └── EndpointError              401/403/404: the endpoint or key is wrong for everyone
     ├── RetryLimit                      a retry limit ended the request
     │    ├── DeadlineExceeded           the next wait would pass the request's deadline
     │    └── AttemptsExhausted          max_attempts attempts failed
     ├── InputError                      the input line is not a request (never sent)
     │    ├── InvalidJson, InvalidEncoding, InvalidInput, InvalidId, NoMessages,
     │    └── EmptyPrompt, RequestTooLarge, StreamNotAllowed, ModelMismatch, MissingColumn
     ├── InvalidOutput                   an answer that does not match --response_format's schema
     ├── InvalidRequest                  the options cannot make it a request (no model)
     ├── DuplicateCustomId               another request has the same custom_id
     ├── InternalError                   a fault in this library while handling a request
     ├── JobError                        stops the job (never a row)
     │    ├── EndpointUnusable           every answer says the endpoint or key is wrong
     │    ├── MissingApiKey              the key's environment variable is unset in a worker
     │    └── RuntimeDied                a worker process's client loop died
     └── OptionError (also a ValueError) an option out of its accepted range

Every class that can end a row has an ``error_type`` (the output's ``error_type`` column), a
``retryable`` flag (the ``retryable`` column), whether ``--resume`` treats it as final, who
decides it and what it means: :data:`ERROR_TYPES` lists them in tree order, and the README's
table is rendered from it (:func:`render_error_types_table`). Messages never contain the API
key: they are built from status, server JSON and exception class names only.

Example:
    >>> e = error_for_status(429, {"error": {"code": "RateLimit", "message": "slow down"}})
    >>> type(e).__name__, e.retryable, e.error_code
    ('RateLimited', True, 'RateLimit')
    >>> ERROR_TYPE_BY_NAME["no_messages"].__name__, final_on_resume("failed", "rejected", False)
    ('NoMessages', True)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar


class ArkError(Exception):
    """Base of every error this library raises or records.

    Class attributes (the vocabulary; a class with a ``meaning`` is a row of the table):
        error_type: the ``error_type`` column's value.
        retryable: the ``retryable`` column's value.
        final_on_resume: ``--resume`` leaves an id that ended so alone.
        decided_by: ``server``, ``limit``, ``options``, ``input``, ``dedupe`` or ``runtime``.
        meaning: one line of Markdown for the README's table (``""``: an abstract class).
    """

    error_type: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    final_on_resume: ClassVar[bool] = False
    decided_by: ClassVar[str] = "runtime"
    meaning: ClassVar[str] = ""

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
    decided_by = "limit"


class TransportError(RetryableError):
    """The connection failed: refused, reset, or closed before a full answer."""

    error_type = "connection_error"
    meaning = "connection refused, reset or cut short (retried; named in `error_message` as above)"


class AttemptTimeout(TransportError):
    """One attempt ran past ``attempt_timeout`` (the request may still have time left)."""

    error_type = "attempt_timeout"
    meaning = "one attempt ran past `--attempt_timeout` (retried; named in `error_message` as above)"


class RetryableStatus(RetryableError):
    """HTTP 408, 409 or 5xx."""

    error_type = "server_error"
    meaning = "408, 409 or 5xx (retried; named in `error_message` as above)"


class RateLimited(RetryableStatus):
    """HTTP 429, or a 503 that names a ``Retry-After``: the server is pushing back."""

    error_type = "rate_limited"
    meaning = ("429, or 503 with `Retry-After` (retried; a row that ends on it says `deadline_exceeded` or "
               "`attempts_exhausted` and names it in `error_message`)")


class InvalidResponse(RetryableError):
    """A 200 whose body is empty, truncated or not JSON, or lacks ``choices``."""

    error_type = "invalid_response"
    meaning = ("200 answers that were not a completion (empty, cut short, no `choices`), "
               "`max_invalid_responses` times")


class Cancelled(RetryableError):
    """The job (or the client) stopped before the request ended."""

    error_type = "cancelled"
    decided_by = "runtime"
    meaning = "the job stopped before the request ended"


class RequestRejected(ArkError):
    """A 4xx other than 408/409/429: the request itself is wrong; not retried."""

    error_type = "rejected"
    final_on_resume = True
    decided_by = "server"
    meaning = ("the server refused this request: a 4xx other than 401/403/404/408/409/429 "
               "(e.g. 400 for a prompt over the context window)")


class EndpointError(RequestRejected):
    """401, 403 or 404: the key or the endpoint is wrong, for every request alike."""

    error_type = "endpoint_error"
    final_on_resume = False
    meaning = "401/403/404: a wrong key, endpoint id or path (wrong for every request; fixed on your side)"


class CertificateError(EndpointError):
    """The endpoint's TLS certificate could not be verified: wrong for every request alike."""

    error_type = "certificate_error"
    meaning = ("the endpoint's TLS certificate could not be verified: trust its CA with `--ca_bundle` or "
               "`SSL_CERT_FILE` (wrong for every request: the job stops after the first ten)")


class RetryLimit(ArkError):
    """A retry limit ended the request (retryable: a later run may succeed)."""

    error_type = "retry_limit"
    retryable = True
    decided_by = "limit"


class DeadlineExceeded(RetryLimit):
    """The request's deadline (first send + timeout) came, or the next wait would pass it."""

    error_type = "deadline_exceeded"
    meaning = ("`--timeout` ran out (or less than `--min_attempt_seconds` of it was left for another "
               "attempt)")


class AttemptsExhausted(RetryLimit):
    """``max_attempts`` attempts failed without the server asking us to wait."""

    error_type = "attempts_exhausted"
    meaning = "`--max_attempts` attempts failed without the server asking us to wait"


class InputError(ArkError):
    """The input line is not a request; it is never sent.

    Args:
        message: what is wrong, for the ``error_message`` column.
        body: the request body, when the line got as far as having one (kept in the row).
    """

    error_type = "input_error"
    decided_by = "input"

    def __init__(self, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.body = body


class InvalidJson(InputError):
    """The line is not valid JSON."""

    error_type = "invalid_json"
    meaning = "the line is not valid JSON (its `custom_id` is salvaged when it can be)"


class InvalidEncoding(InputError):
    """The line does not decode, or is binary."""

    error_type = "invalid_encoding"
    meaning = ("the line does not decode in `--input_encoding` (UTF-8 by default), or is binary; "
               "`request_json` keeps its bytes with `\\xNN` escapes; never sent")


class InvalidInput(InputError):
    """JSON of the wrong shape or types."""

    error_type = "invalid_input"
    meaning = "JSON that is not a request: not an object, wrong types, `method` other than POST, ..."


class InvalidId(InputError):
    """An id that cannot be exact."""

    error_type = "invalid_id"
    meaning = ("the `custom_id` (or `id`) is not an exact id: a fraction or exponent, outside int64, blank, "
               "or over 512 characters")


class NoMessages(InputError):
    """No ``messages``, or an empty list."""

    error_type = "no_messages"
    meaning = "no `messages`, or an empty list"


class EmptyPrompt(InputError):
    """A user message with empty content."""

    error_type = "empty_prompt"
    meaning = "a user message with empty content"


class RequestTooLarge(InputError):
    """The body is over ``max_request_bytes``."""

    error_type = "request_too_large"
    meaning = "the body is over `--max_request_bytes`"


class StreamNotAllowed(InputError):
    """``stream: true`` on Ark's batch path."""

    error_type = "stream_not_allowed"
    meaning = "`stream: true` on Ark's batch path"


class ModelMismatch(InputError):
    """The body's model differs from the endpoint's under ``strict_model``."""

    error_type = "model_mismatch"
    meaning = "the body's `model` differs from `--model` under `--strict_model`"


class MissingColumn(InputError):
    """A prompt template names a field or column the input row does not have (or holds null)."""

    error_type = "missing_column"
    meaning = ("a prompt template (`--template`, `--system_template`, `--template_file`) names a field or "
               "column that the input row lacks or holds null; `error_message` names it; never sent")


class InvalidOutput(ArkError):
    """The answer is not JSON matching the ``response_format`` schema (the raw answer is kept)."""

    error_type = "invalid_output"
    retryable = True
    decided_by = "server"
    meaning = ("the answer is not JSON that matches `--response_format`'s schema; `content` and "
               "`response_json` keep the raw answer (retryable: `--resume` asks again)")


class InvalidRequest(ArkError):
    """The options cannot make the line a request (no model anywhere, a body that cannot be serialised)."""

    error_type = "invalid_request"
    decided_by = "options"
    meaning = ("the request could not be sent: no `model` in the body and no `--model`, or a body that "
               "cannot be serialised")


class DuplicateCustomId(ArkError):
    """Another request has the same ``custom_id``."""

    error_type = "duplicate_custom_id"
    decided_by = "dedupe"
    meaning = ("another request has the same `custom_id`: only one copy is sent (with `--no_dedupe` both are, "
               "and compaction keeps the second answer in this row)")


class InternalError(ArkError):
    """A fault in this library while handling a request."""

    error_type = "internal_error"
    meaning = "a fault in this library while handling the request (`request_json` keeps it)"


class JobError(ArkError, RuntimeError):
    """Stops the job instead of ending one row: the cause is the same for every request."""

    error_type = "job_error"


class EndpointUnusable(JobError):
    """Every answer so far says the endpoint or key is wrong: stop instead of failing every row."""

    error_type = "endpoint_unusable"


class MissingApiKey(JobError):
    """The environment variable that should hold the API key (or a secret header) is unset."""

    error_type = "missing_api_key"


class RuntimeDied(JobError):
    """A worker process's client loop died; its requests cannot finish."""

    error_type = "runtime_died"


class OptionError(ArkError, ValueError):
    """An option outside its accepted range, naming the option (``name``) and the range.

    ``str(e)`` is ``"<name> <problem>"``; :attr:`problem` is the part after the name, so a CLI
    can name its own flag for the same option.

    Example:
        >>> e = OptionError("max_concurrency", "must be in 1..10000, got 0")
        >>> str(e), e.name
        ('max_concurrency must be in 1..10000, got 0', 'max_concurrency')
    """

    error_type = "option_error"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


def _tree(cls: type[ArkError]) -> Iterator[type[ArkError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


# The one table of error_type values, in tree order (the README's table is rendered from it).
# Rule: only the server's own verdict on a valid request is final on --resume; whatever the
# input or the options decided, and every retryable outcome, is decided afresh on every run.
ERROR_TYPES: tuple[type[ArkError], ...] = tuple(c for c in _tree(ArkError) if c.meaning)
ERROR_TYPE_BY_NAME: dict[str, type[ArkError]] = {c.error_type: c for c in ERROR_TYPES}
FINAL_ON_RESUME: frozenset[str] = frozenset(c.error_type for c in ERROR_TYPES if c.final_on_resume)
INPUT_ERROR_TYPES: frozenset[str] = frozenset(c.error_type for c in ERROR_TYPES if issubclass(c, InputError))
DUPLICATE = DuplicateCustomId.error_type


def final_on_resume(status: str | None, error_type: str | None, retryable: bool | None) -> bool:
    """Whether an existing row settles its id for ``--resume`` (the id is then not sent again).

    An ``ok`` row does; so does a failure whose type is final in :data:`ERROR_TYPES` (the
    server's verdict on a valid request) and that is not retryable. Anything else, including
    an ``error_type`` this version does not know, is decided afresh on the next run.

    Example:
        >>> final_on_resume("ok", None, None), final_on_resume("failed", "rejected", False)
        (True, True)
        >>> final_on_resume("failed", "invalid_request", False), final_on_resume("failed", "no_messages", False)
        (False, False)
    """
    if status == "ok":
        return True
    return not retryable and error_type in FINAL_ON_RESUME


def render_error_types_table() -> str:
    """:data:`ERROR_TYPES` as the Markdown table the README holds (between its markers).

    Example:
        >>> print(render_error_types_table().splitlines()[0])
        | error_type | meaning | retryable | final on --resume |
        >>> [line.split(" | ")[0] for line in render_error_types_table().splitlines() if "**yes**" in line]
        ['| `rejected`']
    """
    lines = ["| error_type | meaning | retryable | final on --resume |", "|---|---|---|---|"]
    for e in ERROR_TYPES:
        lines.append(
            f"| `{e.error_type}` | {e.meaning} | {'yes' if e.retryable else 'no'} | "
            f"{'**yes**' if e.final_on_resume else 'no'} |"
        )
    return "\n".join(lines) + "\n"


_JOB_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$")
_RUNNER_NOTE = re.compile(r" \[while running '[^']*'\]$")  # what Beam appends to a worker's message


def job_error_in(exc: BaseException) -> JobError | None:
    """The :class:`JobError` that stopped a job, however the runner wrapped it, else ``None``.

    Follows ``__cause__``/``__context__``; a runner that ran the worker in another process
    only has the worker's traceback text, whose last ``Name: message`` line for a
    :class:`JobError` class is rebuilt into that class (with the message, not the source line).

    Example:
        >>> job_error_in(RuntimeError("Traceback ...\\narkbatch_beam._errors.MissingApiKey: set ARK_API_KEY"))
        MissingApiKey('set ARK_API_KEY')
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, JobError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    kinds: dict[str, type[ArkError]] = {c.__name__: c for c in _tree(JobError) if c is not JobError}
    found: JobError | None = None
    for line in str(exc).splitlines():
        m = _JOB_ERROR_LINE.match(line.strip())
        if m and m.group(1) in kinds:
            found = kinds[m.group(1)](_RUNNER_NOTE.sub("", m.group(2)))  # type: ignore[assignment]
    return found


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
    kw: dict[str, Any] = {"http_status": status, "error_code": code, "retry_after": retry_after}
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
