"""The two values that flow through the pipeline: a request in, a result out.

Kept apart from the client so the input parser and the schema can use them without
importing aiohttp. ``ChatResult``'s fields *are* the output schema's columns, in order.

Also here, for the same reason (the parser, the DoFns and the resume step share it):
:func:`request_hash`, the ``request_sha256`` column's value.

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

from ._errors import DUPLICATE  # noqa: F401 - the error_type of a repeated custom_id, used beside the statuses

# The Beam metrics namespace of every counter and distribution this package reports.
NAMESPACE = "arkbatch"

STATUS_OK = "ok"
STATUS_FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat request: a stable id and an OpenAI-format body.

    Args:
        custom_id: the caller's id (or one derived from the content); unique per job.
        body: the ``/chat/completions`` JSON body (``model`` may be left to the endpoint).
        raw: the original input line, kept so a failure row can be fixed and re-run.
        columns_json: the input fields kept for the output row (``keep_columns``), as a JSON
            object text, or ``None``.
    """

    custom_id: str
    body: dict[str, Any]
    raw: str | None = None
    columns_json: str | None = None


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
    # Added later, at the end, so outputs written before them still read (as nulls).
    parsed_json: str | None = None
    columns_json: str | None = None

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
