"""The two values that flow through the pipeline: a request in, a result out.

Kept apart from the client so the input parser and the schema can use them without
importing aiohttp. ``ChatResult``'s fields *are* the output schema's columns, in order.

Also here, for the same reason (the parser, the DoFns, the resume step and the README share
them): :func:`request_hash`, the ``request_sha256`` column's value, and :data:`ERROR_TYPES`,
the one table of ``error_type`` values and of what ``--resume`` does with each.

Example:
    >>> r = ChatRequest("id-1", {"messages": [{"role": "user", "content": "hi"}]})
    >>> r.custom_id
    'id-1'
    >>> ChatResult.failure("id-2", "bad_input", "no messages").to_row()["status"]
    'failed'
    >>> request_hash(r.body)[:12]
    '19e21ad5462e'
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import orjson

# The Beam metrics namespace of every counter and distribution this package reports.
NAMESPACE = "arkbatch"

STATUS_OK = "ok"
STATUS_FAILED = "failed"
DUPLICATE = "duplicate_custom_id"  # error_type of a repeated custom_id (never sent)


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat request: a stable id and an OpenAI-format body.

    Args:
        custom_id: the caller's id (or one derived from the content); unique per job.
        body: the ``/chat/completions`` JSON body (``model`` may be left to the endpoint).
        raw: the original input line, kept so a failure row can be fixed and re-run.
    """

    custom_id: str
    body: dict[str, Any]
    raw: str | None = None


@dataclasses.dataclass(slots=True)
class ChatResult:
    """One output row: an answer, or a failure with its reason. Field order = schema order."""

    custom_id: str
    status: str
    model: str | None = None
    response_id: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    http_status: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool | None = None
    attempts: int = 0
    latency_ms: float | None = None
    request_id: str | None = None
    request_sha256: str | None = None
    request_json: str | None = None
    response_json: str | None = None

    @property
    def ok(self) -> bool:
        """True for an answered request."""
        return self.status == STATUS_OK

    def to_row(self) -> dict[str, Any]:
        """The row as a plain dict, keys in schema order."""
        return {f: getattr(self, f) for f in RESULT_FIELDS}

    @classmethod
    def failure(
        cls,
        custom_id: str,
        error_type: str,
        message: str,
        *,
        request_json: str | None = None,
        retryable: bool = False,
        **kw: Any,
    ) -> ChatResult:
        """A failure row that never reached (or never got through to) the server."""
        return cls(
            custom_id=custom_id,
            status=STATUS_FAILED,
            error_type=error_type,
            error_message=message,
            retryable=retryable,
            request_json=request_json,
            **kw,
        )


RESULT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ChatResult))


def request_hash(body: Any) -> str | None:
    """The ``request_sha256`` column: sha256 (hex) of the canonical JSON of a request body.

    Canonical = ``orjson`` with sorted keys, of the body as the input gave it (before the
    endpoint's model is filled in), so the same request hashes the same on every run, runner
    and worker; ``custom_id`` is not part of the body. ``None`` for a body that cannot be
    serialised (it is reported by the failure row's ``error_type``, never raised).

    Example:
        >>> a = request_hash({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        >>> a == request_hash({"messages": [{"content": "hi", "role": "user"}], "model": "m"})
        True
        >>> len(a), request_hash({"x": object()})
        (64, None)
    """
    try:
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorType:
    """One value of the ``error_type`` column.

    Args:
        name: the value.
        meaning: what it says (Markdown, one line).
        retryable: what the row's ``retryable`` column holds.
        final_on_resume: ``--resume`` leaves the id alone (without it, the id is read, checked
            and sent again on every run; ``--retry_failed`` re-sends final failures too).
        decided_by: ``server`` (its verdict on a valid request), ``limit`` (a retry limit
            ended it), ``options``, ``input``, ``dedupe`` or ``runtime``.
    """

    name: str
    meaning: str
    retryable: bool
    final_on_resume: bool
    decided_by: str


# The one table (the README's error-type table is rendered from it: render_error_types_table).
# Rule: only the server's own verdict on a valid request is final on --resume; whatever the
# input or the options decided, and every retryable outcome, is decided afresh on every run.
ERROR_TYPES: tuple[ErrorType, ...] = (
    ErrorType("rejected", "the server refused this request: a 4xx other than 401/403/404/408/409/429 "
              "(e.g. 400 for a prompt over the context window)", False, True, "server"),
    ErrorType("endpoint_error", "401/403/404: a wrong key, endpoint id or path (wrong for every request; "
              "fixed on your side)", False, False, "server"),
    ErrorType("invalid_response", "200 answers that were not a completion (empty, cut short, no `choices`), "
              "`max_invalid_responses` times", True, False, "limit"),
    ErrorType("deadline_exceeded", "`--timeout` ran out (or less than `--min_attempt_seconds` of it was left "
              "for another attempt)", True, False, "limit"),
    ErrorType("attempts_exhausted", "`--max_attempts` attempts failed without the server asking us to wait",
              True, False, "limit"),
    ErrorType("rate_limited", "429, or 503 with `Retry-After` (retried; a row that ends on it says "
              "`deadline_exceeded` or `attempts_exhausted` and names it in `error_message`)", True, False, "limit"),
    ErrorType("server_error", "408, 409 or 5xx (retried; named in `error_message` as above)", True, False, "limit"),
    ErrorType("connection_error", "connection refused, reset or cut short (retried; named in `error_message` "
              "as above)", True, False, "limit"),
    ErrorType("attempt_timeout", "one attempt ran past `--attempt_timeout` (retried; named in `error_message` "
              "as above)", True, False, "limit"),
    ErrorType("invalid_request", "the request could not be sent: no `model` in the body and no `--model`, or "
              "a body that cannot be serialised", False, False, "options"),
    ErrorType("invalid_json", "the line is not valid JSON (its `custom_id` is salvaged when it can be)",
              False, False, "input"),
    ErrorType("invalid_encoding", "the line does not decode in `--input_encoding` (UTF-8 by default), or is binary; "
              "`request_json` keeps its bytes with `\\xNN` escapes; never sent", False, False, "input"),
    ErrorType("invalid_input", "JSON that is not a request: not an object, wrong types, `method` other than POST, ...",
              False, False, "input"),
    ErrorType("invalid_id", "the `custom_id` (or `id`) is not an exact id: a fraction or exponent, "
              "outside int64, blank, or over 512 characters",
              False, False, "input"),
    ErrorType("no_messages", "no `messages`, or an empty list", False, False, "input"),
    ErrorType("empty_prompt", "a user message with empty content", False, False, "input"),
    ErrorType("request_too_large", "the body is over `--max_request_bytes`", False, False, "input"),
    ErrorType("stream_not_allowed", "`stream: true` on Ark's batch path", False, False, "input"),
    ErrorType("model_mismatch", "the body's `model` differs from `--model` under `--strict_model`",
              False, False, "input"),
    ErrorType(DUPLICATE, "another request has the same `custom_id`: only one copy is sent (with `--no_dedupe` "
              "both are, and compaction keeps the second answer in this row)", False, False, "dedupe"),
    ErrorType("cancelled", "the job stopped before the request ended", True, False, "runtime"),
    ErrorType("internal_error", "a fault in this library while handling the request (`request_json` keeps it)",
              False, False, "runtime"),
)
ERROR_TYPE_BY_NAME: dict[str, ErrorType] = {e.name: e for e in ERROR_TYPES}
FINAL_ON_RESUME: frozenset[str] = frozenset(e.name for e in ERROR_TYPES if e.final_on_resume)


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
    if status == STATUS_OK:
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
            f"| `{e.name}` | {e.meaning} | {'yes' if e.retryable else 'no'} | "
            f"{'**yes**' if e.final_on_resume else 'no'} |"
        )
    return "\n".join(lines) + "\n"
