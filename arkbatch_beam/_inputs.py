r"""Input lines (or dicts) -> :class:`ChatRequest`, or a failure row that says what is wrong.

Formats, detected per line with ``input_format="auto"``:

* **batch**: the OpenAI / Ark batch JSONL form ``{"custom_id", "method"?, "url"?, "body": {...}}``;
* **chat**: ``{"messages": [...], "id"?|"custom_id"?, other body fields}``;
* **text**: any line that is not JSON: one user prompt (``system`` adds a system message). In
  ``auto``, a line that is JSON but not an object (``[1, 2]``, ``null``, ``42``, ``"s"``, ``true``)
  is not a prompt but an ``invalid_input`` row; ``input_format="text"`` sends every line as-is.

``custom_id`` comes from the input when present; otherwise it is derived from the request
content (sha256 of the canonical JSON body), so the same input yields the same ids on every
run and every runner. An integer id is taken as its decimal string (``12`` and ``"12"`` are one id).

Bad input never raises: it becomes a failed :class:`ChatResult` whose ``error_type`` names the
problem (one of :data:`INPUT_ERROR_TYPES`; each is decided by the line and the options alone, so
the same line and options always give the same row) and whose ``request_json`` keeps the line:

* as read (decoded) for every error but ``invalid_encoding``; for that one, the raw bytes with
  ``\\`` for each backslash and ``\xNN`` for each byte that is not UTF-8 text and each control
  character (so ``codecs.escape_decode(request_json.encode())[0]`` gives the bytes back);
* at most 64 KiB of it (:data:`MAX_KEPT_LINE_BYTES`: the first 65536 bytes of its UTF-8 text, cut
  at a character boundary; for ``invalid_encoding``, of its raw bytes, before escaping): a longer
  line is cut and ``error_message`` then ends with
  ``"; line of N bytes, sha256 HEX; request_json keeps its first 65536 bytes"`` (N and HEX of the
  whole line as read, without its line break), so the line can still be found.

Byte lines are decoded strictly: UTF-8 (a leading byte-order mark is dropped) unless
``input_encoding`` names another codec. A line is *binary* (``invalid_encoding``, never sent) when
it holds a NUL, or when its control characters -- U+0000..U+001F other than tab, LF, CR, FF and
VT, plus DEL and the C1 controls U+0080..U+009F -- are more than 10% of its characters. A few
stray ones (a vertical tab from a spreadsheet cell, a terminal colour code) are fine; random bytes
hold about 11% C0 controls, or 23% with C1 once a single-byte codec such as latin-1 reads them.

Example:
    >>> opts = InputOptions()
    >>> parse_input('{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}',
    ...             opts).custom_id
    'a'
    >>> parse_input("what is 2+2?", opts).body["messages"]
    [{'role': 'user', 'content': 'what is 2+2?'}]
    >>> parse_input('{"body": 3}', opts).error_type
    'invalid_input'
    >>> parse_input(b"caf\xe9", opts).request_json
    'caf\\xe9'
    >>> parse_input(b"caf\xe9", InputOptions(input_encoding="latin-1")).body["messages"][0]["content"]
    'café'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson

from ._config import INPUT_FORMATS, InputOptions  # noqa: F401 - InputOptions is read here
from ._errors import (
    INPUT_ERROR_TYPES,  # noqa: F401 - re-exported: the error_type values of bad input
    EmptyPrompt,
    InputError,
    InvalidEncoding,
    InvalidId,
    InvalidInput,
    InvalidJson,
    MissingColumn,
    ModelMismatch,
    NoMessages,
    RequestTooLarge,
    StreamNotAllowed,
)
from ._types import ChatRequest, ChatResult, request_hash

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
_NOT_BODY_KEYS = ("id", "custom_id")
MAX_KEPT_LINE_BYTES = 64 * 1024  # a failure row's request_json keeps at most this much of its line
MAX_ID_CHARS = 512
_INT64 = (-(2**63), 2**63 - 1)
# Control characters that make a line binary: C0 but tab, LF, VT, FF, CR; DEL; and C1.
_CONTROL = "".join(chr(c) for c in [*range(32), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\v\f\r")
_CONTROL_RE = re.compile(f"[{re.escape(_CONTROL)}]")
_DROP_CONTROL = {ord(c): None for c in _CONTROL}
# Escapes for request_json of an undecodable line: control characters (all of C0 but tab) and DEL.
_ESCAPE_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 0x7F] if c != 0x09}


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


def _line_id(data: bytes) -> str:
    """The id of a line that yields none: from its bytes as read (same bytes -> same id)."""
    return "line-" + hashlib.sha256(data).hexdigest()[:32]


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise NoMessages("request has no 'messages'")
    if not isinstance(messages, list):
        raise InvalidInput(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise NoMessages("'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInput(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue
        if isinstance(content, str):
            if not content.strip() and role == "user":
                raise EmptyPrompt(f"messages[{i}] (user) has empty content")
        elif isinstance(content, list):
            if not content:
                raise EmptyPrompt(f"messages[{i}].content is an empty list")
        else:
            raise InvalidInput(
                f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}",
            )


def _check_id(value: Any) -> str:
    """A ``custom_id``/``id`` value -> the id string; raises InputError for a value that is not one."""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidId("custom_id is empty")
        if len(value) > MAX_ID_CHARS:
            raise InvalidId(f"custom_id is {len(value)} characters long, over {MAX_ID_CHARS}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidId(f"custom_id {value} is outside the int64 range: write it as a string")
        return str(value)
    if isinstance(value, float):  # also what JSON integers beyond 64 bits parse to
        raise InvalidId(
            f"custom_id must be a string or a whole number in int64 range, got the number {value!r}: "
            "write it as a string to keep it exact",
        )
    raise InvalidInput(f"custom_id must be a string or an integer, got {type(value).__name__}")


def _is_batch_form(obj: dict[str, Any], fmt: str) -> bool:
    return fmt == "batch" or (fmt == "auto" and "body" in obj)


def _id_value(obj: dict[str, Any], fmt: str) -> Any:
    """The raw id of a parsed object: ``custom_id`` in batch form; ``custom_id`` else ``id`` in chat form."""
    if _is_batch_form(obj, fmt):
        return obj.get("custom_id")
    return obj.get("custom_id", obj.get("id"))


def _normalise(obj: Any, opts: InputOptions) -> tuple[str | None, dict[str, Any]]:
    """(custom_id or None, body) from a parsed JSON object; raises InputError."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"a line must be a JSON object, got {type(obj).__name__}")
    fmt = opts.input_format
    if fmt == "text":
        raise InvalidInput(f"input_format {fmt!r} cannot read a JSON object")
    if _is_batch_form(obj, fmt):
        body = obj.get("body")
        if not isinstance(body, dict):
            raise InvalidInput(f"'body' must be an object, got {type(body).__name__}")
        method = obj.get("method")
        if method is not None and str(method).upper() != "POST":
            raise InvalidInput(f"'method' must be POST, got {method!r}")
    else:
        drop = set(_NOT_BODY_KEYS) | (set(opts.kept_columns) - _REQUEST_FIELDS)
        body = {k: v for k, v in obj.items() if k not in drop}
    try:
        raw_id = _id_value(obj, fmt)
        cid = None if raw_id is None else _check_id(raw_id)
        _check_messages(body.get("messages"))
        if opts.batch_path and body.get("stream"):
            raise StreamNotAllowed("'stream': true is not allowed on the batch path")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"'model' must be a string, got {type(model).__name__}")
        if opts.strict_model and model is not None and model != opts.model:
            raise ModelMismatch(f"body model {model!r} differs from --model {opts.model!r}")
    except InputError as bad:
        bad.body = body  # the row can name the request it refuses (request_sha256)
        raise
    return cid, body


# --- prompt templates, request options and kept columns -----------------------------------------


class _Fields(Mapping[str, Any]):
    """An input object's fields for ``str.format_map``: an absent or null one raises MissingColumn."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        value = self._fields.get(key)
        if value is None:
            have = ", ".join(sorted(k for k in self._fields if isinstance(k, str))) or "none"
            why = "is null" if key in self._fields else "is not a field/column of the input"
            raise MissingColumn(f"template field {key!r} {why} (it has: {have})")
        return value

    def __iter__(self) -> Any:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def render(template: str, fields: Mapping[str, Any]) -> str:
    """``template`` with its ``{field}``s filled from ``fields``; raises MissingColumn.

    Example:
        >>> render("Summarise: {text} ({lang})", {"text": "hi", "lang": "en"})
        'Summarise: hi (en)'
        >>> render("{text}", {"txt": "hi"})
        Traceback (most recent call last):
        ...
        arkbatch_beam._errors.MissingColumn: template field 'text' is not a field/column of the input (it has: txt)
    """
    try:
        return template.format_map(_Fields(fields))
    except (IndexError, KeyError, AttributeError, ValueError, TypeError) as exc:  # {a[9]}, {a.b}, {a:.2f} of a list
        raise MissingColumn(f"template {template!r} cannot be filled from the input: {exc!r}") from None


def _render_deep(value: Any, fields: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return render(value, fields)
    if isinstance(value, list):
        return [_render_deep(v, fields) for v in value]
    if isinstance(value, dict):
        return {k: _render_deep(v, fields) for k, v in value.items()}
    return value


def _templated(fields: Mapping[str, Any], opts: InputOptions) -> dict[str, Any]:
    """The body built from the templates over ``fields``; raises MissingColumn."""
    if opts.messages_template is not None:
        messages = _render_deep(orjson.loads(opts.messages_template), fields)
    else:
        messages = []
        if opts.system_template is not None:
            messages.append({"role": "system", "content": render(opts.system_template, fields)})
        elif opts.system:
            messages.append({"role": "system", "content": opts.system})
        messages.append({"role": "user", "content": render(opts.template or "", fields)})
    try:
        _check_messages(messages)
    except InputError as bad:
        bad.body = {"messages": messages}
        raise
    return {"messages": messages}


def _with_request_options(body: dict[str, Any], opts: InputOptions) -> dict[str, Any]:
    """``body`` with ``extra_body``, ``thinking`` and ``response_format`` added (the body's own fields win)."""
    if opts.extra_body is None and opts.thinking is None and opts.response_format_json is None:
        return body
    out = dict(body)  # never change the input's own dict
    if opts.extra_body is not None:
        for key, value in orjson.loads(opts.extra_body).items():
            out.setdefault(key, value)
    if opts.thinking is not None:
        out.setdefault("thinking", {"type": opts.thinking})
    if opts.response_format_json is not None:
        out.setdefault("response_format", orjson.loads(opts.response_format_json))
    return out


# Fields of a chat-form object that are the request's own: kept in the body even when kept as columns.
_REQUEST_FIELDS = frozenset({"messages", "model", "id", "custom_id"})


def _kept(obj: Any, opts: InputOptions) -> str | None:
    """The ``columns_json`` of an input object: its ``keep_columns`` fields (absent ones as null)."""
    names = opts.kept_columns
    if not names or not isinstance(obj, dict):
        return None
    return orjson.dumps({n: obj.get(n) for n in names}, default=str).decode()


# --- salvaging the id of a line that is not valid JSON -------------------------------------------

_SPACE_RE = re.compile(r"[ \t\n\r]*")


def _space_end(text: str, pos: int) -> int:
    """Where the run of JSON whitespace at ``pos`` ends (the pattern matches the empty string too)."""
    m = _SPACE_RE.match(text, pos)
    return m.end() if m is not None else pos

_STRING_RE = re.compile(r'"[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*"', re.S)
_SCALAR_RE = re.compile(r'[^ \t\n\r,:{}\[\]"]+')
_STRUCT_RE = re.compile(r'[{}\[\]"]')
_CLOSE = {"{": "}", "[": "]"}


def _skip_value(text: str, pos: int) -> int | None:
    """End of the object or array that starts at ``pos``, or None where it stops being well nested."""
    stack: list[str] = []
    while True:
        m = _STRUCT_RE.search(text, pos)
        if m is None:
            return None
        c, pos = m.group(), m.start()
        if c == '"':
            s = _STRING_RE.match(text, pos)
            if s is None:
                return None
            pos = s.end()
            continue
        if c in _CLOSE:
            stack.append(_CLOSE[c])
        elif not stack or stack.pop() != c:
            return None
        pos += 1
        if not stack:
            return pos


def _top_level_members(text: str) -> tuple[list[tuple[str, str | None]], bool]:
    """The top-level members of a (possibly broken) JSON object line, as far as it is well formed.

    Returns ``([(key, value token or None), ...], complete)``: a member's token is kept only when
    the value is whole and followed by ``,`` or ``}`` (None: a key whose value is cut or broken),
    strings are matched whole (so braces and keys inside them do not count), nested values are
    skipped bracket by bracket, and ``complete`` says the scan reached the object's closing brace.
    The scan stops at the first thing that is not JSON.
    """
    members: list[tuple[str, str | None]] = []
    pos = _space_end(text, 0)
    if not text.startswith("{", pos):
        return members, False
    pos = _space_end(text, pos + 1)
    if text.startswith("}", pos):
        return members, True
    while True:
        m = _STRING_RE.match(text, pos)
        if m is None:
            return members, False
        try:
            key = orjson.loads(m.group())
        except orjson.JSONDecodeError:
            return members, False
        pos = _space_end(text, m.end())
        if not text.startswith(":", pos):
            return members, False
        pos = _space_end(text, pos + 1)
        token: str | None = None
        if text.startswith('"', pos):
            v = _STRING_RE.match(text, pos)
            end = v.end() if v else None
            token = v.group() if v else None
        elif text.startswith(("{", "["), pos):
            end = _skip_value(text, pos)
            token = text[pos] if end is not None else None  # "{" / "[": a container, never an id
        else:
            v = _SCALAR_RE.match(text, pos)
            end = v.end() if v else None
            token = v.group() if v else None
        if end is None:
            members.append((key, None))
            return members, False
        pos = _space_end(text, end)
        if not text.startswith((",", "}"), pos):
            members.append((key, None))
            return members, False
        members.append((key, token))
        if text[pos] == "}":
            return members, True
        pos = _space_end(text, pos + 1)


def _salvage_id(text: str, fmt: str, *, replaced: bool = False) -> str | None:
    """The id a broken line names at its top level, or None when that is not certain.

    ``custom_id`` counts in every form; ``id`` only in chat form (``input_format="chat"``, or
    ``auto`` when the scan reached the end of the object and found no top-level ``body``). A key
    that appears twice, a value that is cut, or one that is not a valid id gives None.
    ``replaced``: ``text`` was decoded with replacement characters, so an id holding one is not
    the real id.
    """
    if fmt == "text":
        return None
    members, complete = _top_level_members(text)
    keys = [k for k, _ in members]
    names: tuple[str, ...] = ("custom_id",)
    if fmt == "chat" or (fmt == "auto" and complete and "body" not in keys):
        names = ("custom_id", "id")
    for name in names:
        found = [tok for k, tok in members if k == name]
        if not found:
            continue
        if len(found) > 1 or found[0] is None or found[0] in ("{", "["):
            return None
        try:
            value = orjson.loads(found[0])
            cid = None if value is None else _check_id(value)
        except (orjson.JSONDecodeError, InputError):
            return None
        if cid is None or (replaced and "\ufffd" in cid):
            return None
        return cid
    return None


# --- bytes, encodings and what a failure row keeps -----------------------------------------------


def _escape_bytes(data: bytes) -> str:
    r"""Bytes -> readable text: ``\\`` for a backslash, ``\xNN`` for non-UTF-8 bytes and controls.

    Example:
        >>> print(_escape_bytes(b"caf\xe9 \\ \x00 \xe4\xb8\xad"))
        caf\xe9 \\ \x00 中
    """
    return data.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace").translate(_ESCAPE_CONTROL)


def _binary_reason(text: str) -> str | None:
    """Why a decoded line is binary rather than text, or None (see the module docstring)."""
    if _CONTROL_RE.search(text) is None:
        return None
    if "\x00" in text:
        return "it holds NUL characters"
    n = len(text) - len(text.translate(_DROP_CONTROL))
    if n * 10 > len(text):
        return f"{n} of its {len(text)} characters are control characters"
    return None


def _encoding_hint(data: bytes) -> str:
    if data.startswith(b"\x1f\x8b"):
        return "; it starts like gzip data: name a compressed file *.gz"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "; it starts with a UTF-16 byte-order mark: convert the file to UTF-8"
    return ""


def _decode(data: bytes, encoding: str | None) -> str:
    """A byte line -> text, strictly; raises InvalidEncoding.

    With ``encoding`` set, a line that is valid UTF-8 is still read as UTF-8 (ASCII reads the same
    either way, and text in GBK, Latin-1, ... is almost never valid UTF-8), so a file that mixes
    UTF-8 lines with lines in ``encoding`` (two sources concatenated) is read right line by line.
    """
    if encoding is not None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(encoding or "utf-8")
    except UnicodeDecodeError as exc:
        hint = _encoding_hint(data) or (
            "; if the file uses another encoding, set input_encoding (e.g. --input_encoding gbk)"
            if encoding is None else ""
        )
        raise InvalidEncoding(
            f"line is not valid {encoding or 'utf-8'} text ({exc.reason} at byte {exc.start}: "
            f"0x{data[exc.start]:02x}), so it was not sent{hint}",
        ) from None


def _kept_line(data: bytes, text: str | None, escape: bool) -> tuple[str, str]:
    """(request_json, error_message suffix) for a failure row of this line (see the module docstring)."""
    cut = len(data) > MAX_KEPT_LINE_BYTES
    if escape or text is None:
        kept = _escape_bytes(data[:MAX_KEPT_LINE_BYTES] if cut else data)
    else:
        # A character is at least one byte, so the first MAX bytes lie in the first MAX characters.
        cut = len(text) * 4 > MAX_KEPT_LINE_BYTES and len(text.encode("utf-8")) > MAX_KEPT_LINE_BYTES
        kept = text
        if cut:  # cut at a character boundary: "ignore" drops only a character split at the end
            kept = text[:MAX_KEPT_LINE_BYTES].encode("utf-8")[:MAX_KEPT_LINE_BYTES].decode("utf-8", "ignore")
    if not cut:
        return kept, ""
    return kept, (
        f"; line of {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}; "
        f"request_json keeps its first {MAX_KEPT_LINE_BYTES} bytes"
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


_NOT_JSON = object()


def _auto_text_json(line: str) -> Any:
    """In ``auto``: what a line that does not start with ``{`` holds as JSON, or _NOT_JSON (a prompt)."""
    if not line or line[0] not in '["-0123456789tfn':
        return _NOT_JSON
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if line[0] == "[" and "depth limit" in str(exc):
            return []  # nested too deep for the parser, but an array all the same
        return _NOT_JSON


def _text_body(line: str, opts: InputOptions) -> dict[str, Any]:
    if not line:
        raise EmptyPrompt("empty line")
    messages = []
    if opts.system:
        messages.append({"role": "system", "content": opts.system})
    messages.append({"role": "user", "content": line})
    return {"messages": messages}


def parse_input(item: str | bytes | dict[str, Any], opts: InputOptions) -> ChatRequest | ChatResult:
    """One input line or dict -> a request, or a failure row naming the problem.

    Byte lines are decoded with ``opts.input_encoding`` (UTF-8 by default), strictly; ``str``
    lines and dicts are already text.

    Example:
        >>> parse_input(b'{"custom_id": 12, "messages": [{"role": "user", "content": "hi"}]}',
        ...             InputOptions()).custom_id
        '12'
        >>> parse_input(b"[1, 2, 3]", InputOptions()).error_type
        'invalid_input'
        >>> parse_input(b"\\x1f\\x8b\\x08\\x00", InputOptions()).error_type
        'invalid_encoding'
    """
    obj: Any = None
    text: str | None = None  # the decoded line (None: not decoded yet, or not decodable)
    data: bytes  # the line's bytes as read (UTF-8 for str and dict items)
    fmt = opts.input_format
    if isinstance(item, dict):
        try:
            data = orjson.dumps(item)
        except TypeError as exc:
            rep = repr(item).encode("utf-8", "backslashreplace")
            return ChatResult.failure(_line_id(rep), InvalidInput.error_type, f"not JSON-serialisable: {exc}")
        text = data.decode("utf-8")
        obj = item
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    else:
        text = item
        data = b""
    try:
        if obj is None and text is not None:  # a str line: must be valid Unicode text
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = f"U+{ord(text[exc.start]):04X} at character {exc.start}"
                data, text = text.encode("utf-8", "surrogatepass"), None
                raise InvalidEncoding(
                    f"line holds a lone surrogate ({where}): not valid Unicode text, so it was not sent",
                ) from None
        if obj is not None:
            cid, body = _from_object(obj, opts)
        else:
            if text is None:
                text = _decode(data, opts.input_encoding)
            why = _binary_reason(text)
            if why is not None:
                raise InvalidEncoding(
                    f"line is binary, not text ({why}), so it was not sent{_encoding_hint(data)}",
                )
            line = text.strip().lstrip("\ufeff")  # a byte-order mark on a file's first line
            if fmt == "auto" and not line.startswith("{"):
                value = _auto_text_json(line)
                if value is not _NOT_JSON:
                    raise InvalidInput(
                        f"a line that is JSON must be an object (a request), got {_json_kind(value)}; "
                        "input_format='text' sends every line as a prompt",
                    )
            if fmt == "text" or (fmt == "auto" and not line.startswith("{")):
                if opts.has_template:
                    if not line:
                        raise EmptyPrompt("empty line")
                    cid, body = None, _templated({"text": line}, opts)
                else:
                    cid, body = None, _text_body(line, opts)
            else:
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise InvalidJson(f"invalid JSON: {exc}") from None
                cid, body = _from_object(obj, opts)
        if cid is None:
            cid = derive_id(body)  # from the prompt, before the request options: ids do not move with them
        body = _with_request_options(body, opts)
        size = len(orjson.dumps(body))
        if size > opts.max_request_bytes:
            raise RequestTooLarge(
                f"request body is {size} bytes, over max_request_bytes={opts.max_request_bytes}",
                body,
            )
    except InputError as bad:
        row = _failure_row(bad, data, text, obj, opts)
        row.columns_json = _kept(obj, opts)
        return row
    return ChatRequest(cid, body, text, _kept(obj, opts))


def _from_object(obj: Any, opts: InputOptions) -> tuple[str | None, dict[str, Any]]:
    """(custom_id or None, body) of a JSON object or dict: a request, or (templates) a row of fields."""
    if not opts.has_template:
        return _normalise(obj, opts)
    if not isinstance(obj, dict):
        raise InvalidInput(f"a line must be a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("custom_id", obj.get("id"))
    cid = None if raw_id is None else _check_id(raw_id)
    return cid, _templated(obj, opts)


def _failure_row(bad: InputError, data: bytes, text: str | None, obj: Any, opts: InputOptions) -> ChatResult:
    """The failure row of a line: its id if one is certain (else one from its bytes), a bounded copy.

    ``request_sha256`` names the body (:func:`request_hash`) when the line got as far as having one.
    """
    cid: str | None = None
    if isinstance(obj, dict):
        try:
            raw_id = _id_value(obj, opts.input_format)
            cid = None if raw_id is None else _check_id(raw_id)
        except InputError:
            cid = None
    elif isinstance(bad, (InvalidJson, InvalidEncoding)):  # salvage the caller's id
        if text is not None:
            cid = _salvage_id(text.strip().lstrip("\ufeff"), opts.input_format)
        elif data.lstrip(b" \t\r\xef\xbb\xbf")[:1] == b"{":  # (the gate may skip a byte-order mark)
            guess = data.decode(opts.input_encoding or "utf-8", "replace").strip().lstrip("\ufeff")
            cid = _salvage_id(guess, opts.input_format, replaced=True)
    kept, note = _kept_line(data, text, escape=isinstance(bad, InvalidEncoding))
    return ChatResult.failure(
        cid or _line_id(data),
        bad.error_type,
        bad.message + note,
        request_json=kept,
        request_sha256=None if bad.body is None else request_hash(bad.body),
    )


def _drop_none(value: Any) -> Any:
    """Drop None-valued fields of dicts, at any depth (a Parquet struct's absent fields are None)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def row_to_item(
    row: dict[str, Any],
    prompt_column: str,
    id_column: str | None = None,
    system: str | None = None,
    *,
    templated: bool = False,
    keep: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A table row (e.g. from Parquet) -> a chat-form input dict for :func:`parse_input`.

    The prompt column may hold a string (one user prompt) or a list of message objects.
    A missing or null prompt passes through as-is, so the row becomes a failure row
    naming the problem rather than disappearing. In a list of messages, None-valued fields are
    dropped at every depth (a ``list<struct>`` column gives every message every field of the
    struct, e.g. ``"name": None``), so the body and its derived id are what the user wrote.

    ``templated``: the prompt comes from templates over the columns (``InputOptions.template``),
    so the whole row is the item (its ``custom_id`` from ``id_column``). ``keep``: columns copied
    into the item for ``InputOptions.keep_columns``.

    Example:
        >>> row_to_item({"q": "hi", "k": 7}, "q", "k", system="Be brief.")["messages"][-1]
        {'role': 'user', 'content': 'hi'}
        >>> row_to_item({"q": [{"role": "user", "content": "hi", "name": None}]}, "q")["messages"]
        [{'role': 'user', 'content': 'hi'}]
        >>> row_to_item({"text": "hi", "k": 7}, "q", "k", templated=True)
        {'text': 'hi', 'k': 7, 'custom_id': 7}
    """
    if templated:
        item = dict(row)
        if id_column is not None and row.get(id_column) is not None:
            item["custom_id"] = row[id_column]
        return item
    prompt = row.get(prompt_column)
    item = {c: row.get(c) for c in keep if c not in _REQUEST_FIELDS}
    if id_column is not None and row.get(id_column) is not None:
        item["custom_id"] = row[id_column]  # checked by parse_input like a JSON id (ints -> decimal strings)
    if isinstance(prompt, str):
        messages: Any = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, (list, tuple)):
        messages = [_drop_none(m) if isinstance(m, dict) else m for m in prompt]
    else:
        messages = prompt
    item["messages"] = messages
    return item
