"""An answer or an error -> one typed result row: parsing, failure rows, redaction.

Everything that turns what the server said into a :class:`ChatResult` lives here, so there is
one place where secrets are scrubbed: :meth:`Redactor.result` runs on every row the client
hands out, ok or failed, whatever path produced it.

Example:
    >>> r = ChatResult("x", "ok")
    >>> parse_completion(b'{"id":"c1","choices":[{"message":{"content":"hi"},'
    ...                  b'"finish_reason":"stop"}],"usage":{"prompt_tokens":2}}', r)
    >>> r.content, r.finish_reason, r.prompt_tokens
    ('hi', 'stop', 2)
    >>> Redactor(["sk-secret"]).text("echo: Bearer sk-secret")
    'echo: Bearer [redacted]'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import orjson

from ._errors import ArkError, InvalidOutput, InvalidResponse
from ._types import STATUS_FAILED, STATUS_OK, ChatResult

REDACTED = "[redacted]"
_INT64 = range(-(2**63), 2**63)
# Secrets shorter than this are not scrubbed from text (a 1-char "key" would shred every row);
# the config refuses to send such a key over the network anyway.
MIN_SECRET_LEN = 4


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
        >>> parse_completion(b'{"choices":[{"message":{"content":"hi"}}]}', r)
        >>> r.content
        'hi'
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


_STR_FIELDS = tuple(
    f.name for f in dataclasses.fields(ChatResult) if "str" in str(f.type) and f.name != "status"
)


class Redactor:
    """Scrubs the process's secrets (the API key, secret header values) from text and rows.

    Its repr names how many secrets it holds, never them.

    Example:
        >>> red = Redactor(["k-123456"])
        >>> row = ChatResult("a", "failed", error_message="bad key k-123456")
        >>> red.result(row).error_message
        'bad key [redacted]'
        >>> red
        Redactor(1 secret(s))
    """

    __slots__ = ("_secrets", "_forms", "_cores")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = tuple(
            sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)
        )
        # The forms a server's JSON may spell a secret in (raw ``response_json``, error bodies):
        # standard escaping, ``\/`` for ``/``, and ``\uXXXX`` for every non-alphanumeric.
        forms = set(self._secrets)
        for secret in self._secrets:
            forms.add(orjson.dumps(secret).decode()[1:-1])
            forms.add(secret.replace("/", "\\/"))
            forms.add("".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in secret))
        self._forms: tuple[str, ...] = tuple(sorted(forms, key=len, reverse=True))
        # The longest alphanumeric run of each secret: escapes spell only the other characters,
        # so a JSON text that lacks every core cannot hold a secret in any spelling.
        self._cores = tuple(max(re.findall(r"[0-9A-Za-z]+", s) or [s], key=len) for s in self._secrets)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secret(s))"

    def __bool__(self) -> bool:
        return bool(self._secrets)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets themselves (for merging redactors; never log this)."""
        return self._secrets

    def text(self, text: str | None) -> str | None:
        """``text`` with every secret replaced by ``[redacted]``."""
        if not text or not self._secrets:
            return text
        for secret in self._forms:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def json_text(self, text: str | None) -> str | None:
        """Like :meth:`text` for a JSON document, whatever escapes spell the secret in it: when its
        decoded strings still hold a secret, it is re-serialised (plainly escaped) and scrubbed."""
        text = self.text(text)
        if not text or not self._secrets or "\\" not in text or not any(c in text for c in self._cores):
            return text  # no escapes, or no trace of a secret: the literal scrub above saw everything
        try:
            canon = orjson.dumps(orjson.loads(text)).decode()
        except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError):
            return text
        return self.text(canon) if any(s in canon for s in self._secrets) else text

    def result(self, result: ChatResult) -> ChatResult:
        """Scrub every text column of ``result`` in place (and return it)."""
        if self._secrets:
            for name in _STR_FIELDS:
                value = getattr(result, name)
                if value:
                    setattr(result, name, self.json_text(value) if name == "response_json" else self.text(value))
        return result


def fill_error(result: ChatResult, err: ArkError | None) -> None:
    """Copy the server's status, code and message from ``err`` onto ``result``."""
    if err is not None:
        result.http_status = err.http_status
        result.error_code = err.error_code
        result.error_message = err.message


def failed(
    result: ChatResult,
    *,
    error_type: str,
    last: ArkError | None,
    attempts: int,
    latency_s: float,
    retryable: bool,
    message: str | None = None,
    request_id: str | None = None,
) -> ChatResult:
    """Turn ``result`` into a failure row.

    Args:
        result: the row being built (custom_id and model already set).
        error_type: the ``error_type`` column (the limit or error that ended the request).
        last: the error of the last attempt, if any (its status, code and message are kept).
        attempts: attempts made.
        latency_s: seconds from first send to now.
        retryable: whether ``--resume`` should send it again.
        message: overrides the error message (the last error's is appended).
        request_id: the last attempt's ``X-Client-Request-Id``.
    """
    result.status = STATUS_FAILED
    fill_error(result, last)
    result.error_type = error_type
    if message is not None:
        why = f"; last error: {last.error_type}: {last.message}" if last is not None else ""
        result.error_message = message + why
    result.retryable = retryable
    result.attempts = attempts
    result.latency_ms = max(0.0, latency_s) * 1000.0
    result.request_id = request_id
    return result


# --- structured output ---------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n(.*?)\n?\s*```\s*$", re.S)
_VALIDATORS: dict[str, Any] = {}


def _validator(response_format_json: str) -> Any:
    """The jsonschema validator of a ``response_format`` (None for ``json_object``), cached per process."""
    if response_format_json not in _VALIDATORS:
        spec = orjson.loads(response_format_json)
        schema = (spec.get("json_schema") or {}).get("schema") if spec.get("type") == "json_schema" else None
        validator = None
        if isinstance(schema, dict):
            import jsonschema

            validator = jsonschema.validators.validator_for(schema)(schema)
        _VALIDATORS[response_format_json] = validator
    return _VALIDATORS[response_format_json]


def check_output(result: ChatResult, response_format_json: str | None) -> ChatResult:
    """Check an answered row against the ``response_format`` it was asked for (in place).

    A valid answer (JSON, in a Markdown code fence or not, matching the schema) fills
    ``parsed_json`` with its compact JSON text; anything else turns the row into an
    ``invalid_output`` failure that keeps the raw answer in ``content``/``response_json``.
    Failed rows, and rows without a ``response_format``, pass untouched.

    Example:
        >>> fmt = '{"type":"json_schema","json_schema":{"name":"r","schema":{"type":"object","required":["n"]}}}'
        >>> check_output(ChatResult("a", "ok", content='{"n": 1}'), fmt).parsed_json
        '{"n":1}'
        >>> bad = check_output(ChatResult("b", "ok", content='{"m": 1}'), fmt)
        >>> bad.status, bad.error_type, bad.retryable, bad.content
        ('failed', 'invalid_output', True, '{"m": 1}')
    """
    if response_format_json is None or result.status != STATUS_OK:
        return result
    text = result.content or ""
    fenced = _FENCE.match(text)
    problem: str | None = None
    try:
        value = orjson.loads(fenced.group(1) if fenced else text)
    except orjson.JSONDecodeError as exc:
        problem = f"the answer is not JSON ({exc})" if text.strip() else "the answer is empty"
    else:
        validator = _validator(response_format_json)
        if validator is not None:
            error = next(iter(validator.iter_errors(value)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                problem = f"the answer does not match the schema at {where}: {error.message}"
    if problem is not None:
        result.status = STATUS_FAILED
        result.error_type = InvalidOutput.error_type
        result.retryable = InvalidOutput.retryable
        result.error_message = problem[:2000]
        result.parsed_json = None
    else:
        result.parsed_json = orjson.dumps(value).decode()
    return result
