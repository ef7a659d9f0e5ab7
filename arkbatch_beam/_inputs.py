"""Input lines (or dicts) -> :class:`ChatRequest`, or a failure row that says what is wrong.

Formats, detected per line with ``input_format="auto"``:

* **batch**: the OpenAI / Ark batch JSONL form ``{"custom_id", "method"?, "url"?, "body": {...}}``;
* **chat**: ``{"messages": [...], "id"?|"custom_id"?, other body fields}``;
* **text**: any line that is not a JSON object: one user prompt (``system`` adds a system
  message).

``custom_id`` comes from the input when present; otherwise it is derived from the request
content (sha256 of the canonical JSON body), so the same input yields the same ids on every
run and every runner. Bad input never raises: it becomes a failed :class:`ChatResult` whose
``error_type`` names the problem and whose ``request_json`` keeps the original line.

Example:
    >>> opts = InputOptions()
    >>> parse_input('{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}',
    ...             opts).custom_id
    'a'
    >>> parse_input("what is 2+2?", opts).body["messages"]
    [{'role': 'user', 'content': 'what is 2+2?'}]
    >>> parse_input('{"body": 3}', opts).error_type
    'invalid_input'
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import orjson

from ._types import ChatRequest, ChatResult

INPUT_FORMATS = ("auto", "batch", "chat", "text")
MAX_REQUEST_BYTES_RANGE = (1024, 64 * 1024 * 1024)
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
_NOT_BODY_KEYS = ("id", "custom_id")
_CID_RE = re.compile(r'"custom_id"\s*:\s*"([^"\\]{1,256})"')


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How input lines become requests.

    Args:
        input_format: ``auto`` (per line), ``batch``, ``chat`` or ``text``.
        system: system prompt added to ``text`` prompts.
        model: model for bodies that have none (only used to check ``strict_model``).
        strict_model: reject a body whose ``model`` differs from ``model``.
        max_request_bytes: larger bodies become ``request_too_large`` failures.
        batch_path: True on Ark's batch path, where ``stream: true`` is rejected.

    Example:
        >>> InputOptions(input_format="text", system="Be brief.").system
        'Be brief.'
    """

    input_format: str = "auto"
    system: str | None = None
    model: str | None = None
    strict_model: bool = False
    max_request_bytes: int = 4 * 1024 * 1024
    batch_path: bool = True

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}"
            )
        lo, hi = MAX_REQUEST_BYTES_RANGE
        if not isinstance(self.max_request_bytes, int) or not lo <= self.max_request_bytes <= hi:
            raise ValueError(f"max_request_bytes must be in {lo}..{hi}, got {self.max_request_bytes!r}")
        if self.strict_model and not self.model:
            raise ValueError("strict_model needs model to be set")


class _Bad(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def derive_id(body: dict[str, Any]) -> str:
    """A stable id from the request content (same body -> same id, on every run).

    Example:
        >>> a = derive_id({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        >>> a == derive_id({"messages": [{"content": "hi", "role": "user"}], "model": "m"})
        True
        >>> a[:2], len(a)
        ('h-', 34)
    """
    canon = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return "h-" + hashlib.sha256(canon).hexdigest()[:32]


def _line_id(raw: str) -> str:
    return "line-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:32]


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _Bad("no_messages", "request has no 'messages'")
    if not isinstance(messages, list):
        raise _Bad("invalid_input", f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise _Bad("no_messages", "'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad("invalid_input", f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _Bad("invalid_input", f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue
        if isinstance(content, str):
            if not content.strip() and role == "user":
                raise _Bad("empty_prompt", f"messages[{i}] (user) has empty content")
        elif isinstance(content, list):
            if not content:
                raise _Bad("empty_prompt", f"messages[{i}].content is an empty list")
        else:
            raise _Bad(
                "invalid_input",
                f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}",
            )


def _normalise(obj: Any, opts: InputOptions) -> tuple[str | None, dict[str, Any]]:
    """(custom_id or None, body) from a parsed JSON object; raises _Bad."""
    if not isinstance(obj, dict):
        raise _Bad("invalid_input", f"a line must be a JSON object, got {type(obj).__name__}")
    fmt = opts.input_format
    if fmt == "batch" or (fmt == "auto" and "body" in obj):
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _Bad("invalid_input", f"'body' must be an object, got {type(body).__name__}")
        cid = obj.get("custom_id")
        method = obj.get("method")
        if method is not None and str(method).upper() != "POST":
            raise _Bad("invalid_input", f"'method' must be POST, got {method!r}")
    elif fmt in ("chat", "auto"):
        cid = obj.get("custom_id", obj.get("id"))
        body = {k: v for k, v in obj.items() if k not in _NOT_BODY_KEYS}
    else:
        raise _Bad("invalid_input", f"input_format {fmt!r} cannot read a JSON object")
    if cid is not None:
        if isinstance(cid, bool) or not isinstance(cid, (str, int)):
            raise _Bad("invalid_input", f"custom_id must be a string, got {type(cid).__name__}")
        cid = str(cid)
        if not cid.strip():
            raise _Bad("invalid_input", "custom_id is empty")
    _check_messages(body.get("messages"))
    if opts.batch_path and body.get("stream"):
        raise _Bad("stream_not_allowed", "'stream': true is not allowed on the batch path")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Bad("invalid_input", f"'model' must be a string, got {type(model).__name__}")
    if opts.strict_model and model is not None and model != opts.model:
        raise _Bad("model_mismatch", f"body model {model!r} differs from --model {opts.model!r}")
    return cid, body


def parse_input(item: str | bytes | dict[str, Any], opts: InputOptions) -> ChatRequest | ChatResult:
    """One input line or dict -> a request, or a failure row naming the problem."""
    raw: str
    obj: Any
    if isinstance(item, dict):
        obj = item
        try:
            raw = orjson.dumps(item).decode()
        except TypeError as exc:
            return ChatResult.failure(_line_id(repr(item)), "invalid_input", f"not JSON-serialisable: {exc}")
        text_line = None
    else:
        raw = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
        text_line = raw.strip().lstrip("\ufeff")  # a byte-order mark on a file's first line
        obj = None
    try:
        if text_line is not None:
            if opts.input_format == "text" or (opts.input_format == "auto" and not text_line.startswith("{")):
                if not text_line:
                    raise _Bad("empty_prompt", "empty line")
                messages = []
                if opts.system:
                    messages.append({"role": "system", "content": opts.system})
                messages.append({"role": "user", "content": text_line})
                body: dict[str, Any] = {"messages": messages}
                cid = None
            else:
                try:
                    obj = orjson.loads(text_line)
                except orjson.JSONDecodeError as exc:
                    raise _Bad("invalid_json", f"invalid JSON: {exc}") from None
                cid, body = _normalise(obj, opts)
        else:
            cid, body = _normalise(obj, opts)
        size = len(orjson.dumps(body))
        if size > opts.max_request_bytes:
            raise _Bad(
                "request_too_large",
                f"request body is {size} bytes, over max_request_bytes={opts.max_request_bytes}",
            )
    except _Bad as bad:
        cid_guess = None
        if obj is None and bad.error_type == "invalid_json":
            m = _CID_RE.search(raw)  # salvage the caller's id from a broken line
            cid_guess = m.group(1) if m else None
        if isinstance(obj, dict):
            c = obj.get("custom_id", obj.get("id"))
            if isinstance(c, (str, int)) and not isinstance(c, bool) and str(c).strip():
                cid_guess = str(c)
        return ChatResult.failure(
            cid_guess or _line_id(raw), bad.error_type, bad.message, request_json=raw
        )
    return ChatRequest(cid if cid is not None else derive_id(body), body, raw)


def row_to_item(
    row: dict[str, Any], prompt_column: str, id_column: str | None = None, system: str | None = None
) -> dict[str, Any]:
    """A table row (e.g. from Parquet) -> a chat-form input dict for :func:`parse_input`.

    The prompt column may hold a string (one user prompt) or a list of message objects.
    A missing or null prompt passes through as-is, so the row becomes a failure row
    naming the problem rather than disappearing.

    Example:
        >>> row_to_item({"q": "hi", "k": 7}, "q", "k", system="Be brief.")["messages"][-1]
        {'role': 'user', 'content': 'hi'}
    """
    prompt = row.get(prompt_column)
    item: dict[str, Any] = {}
    if id_column is not None and row.get(id_column) is not None:
        item["custom_id"] = str(row[id_column])
    if isinstance(prompt, str):
        messages: Any = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, (list, tuple)):
        messages = [dict(m) if isinstance(m, dict) else m for m in prompt]
    else:
        messages = prompt
    item["messages"] = messages
    return item
