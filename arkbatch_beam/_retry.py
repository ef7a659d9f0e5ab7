"""Pure retry decisions: ``Retry-After`` parsing and the next delay (or giving up).

Nothing here sleeps or reads a clock: the caller passes ``now`` and ``deadline`` (the
loop's monotonic clock) and, for HTTP-dates, the wall-clock time. Tests are exact.

Example:
    >>> from arkbatch_beam._config import Backoff
    >>> from arkbatch_beam._errors import RetryableStatus
    >>> d = next_delay(1, RetryableStatus("busy", http_status=503), now=0.0, deadline=60.0,
    ...                backoff=Backoff(jitter=0.0))
    >>> d.delay, d.give_up
    (0.5, False)
    >>> next_delay(1, RetryableStatus("busy", retry_after=90), now=0.0, deadline=60.0,
    ...            backoff=Backoff()).give_up
    True
    >>> next_delay(20, RetryableStatus("down", http_status=500), now=0.0, deadline=60.0,
    ...            backoff=Backoff(), max_attempts=20).reason
    'attempts_exhausted'
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import math
from collections.abc import Mapping

from ._config import MAX_TIMEOUT, Backoff
from ._errors import ArkError, AttemptsExhausted, DeadlineExceeded, InvalidResponse

# The shortest wait a server's Retry-After is taken for (a 1 ms Retry-After is not a loop).
MIN_ANNOUNCED_WAIT = 0.05
# A Retry-After longer than this is treated as "this long" (72 h: the longest deadline).
MAX_RETRY_AFTER = MAX_TIMEOUT


def _parse_seconds(value: str) -> float | None:
    """A non-negative finite number (uncapped: the caller caps it after any unit change)."""
    try:
        secs = float(value.strip())
    except ValueError:
        return None
    if math.isnan(secs) or math.isinf(secs) or secs < 0:
        return None
    return secs


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header look-up for both multidicts and plain dicts."""
    value = headers.get(name)
    if value is None and not hasattr(headers, "getone"):
        for key, val in headers.items():
            if key.lower() == name:
                return val
    return value


def parse_retry_after(headers: Mapping[str, str], wall_now: float) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date).

    Args:
        headers: response headers (case-insensitive mapping, or plain dict).
        wall_now: current Unix time, to turn an HTTP-date into a delay.

    Returns:
        The delay in seconds (>= 0), or ``None`` when the server named none (or it was
        unreadable). ``retry-after-ms`` wins when both are present (it is more precise).

    Example:
        >>> parse_retry_after({"Retry-After": "1.5"}, 0.0)
        1.5
        >>> parse_retry_after({"retry-after-ms": "250"}, 0.0)
        0.25
        >>> parse_retry_after({"Retry-After": "Thu, 01 Jan 1970 00:00:10 GMT"}, 4.0)
        6.0
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        secs = _parse_seconds(ms)
        if secs is not None:
            return min(secs / 1000.0, MAX_RETRY_AFTER)
    value = _header(headers, "retry-after")
    if value is None:
        return None
    secs = _parse_seconds(value)
    if secs is not None:
        return min(secs, MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    return min(max(0.0, when.timestamp() - wall_now), MAX_RETRY_AFTER)


def backoff_delay(attempt: int, backoff: Backoff, rand: float) -> float:
    """Delay before retry number ``attempt`` (1 = first retry), with jitter ``rand`` in [0, 1).

    Example:
        >>> [backoff_delay(n, Backoff(jitter=0.0), 0.0) for n in (1, 2, 3, 4, 5, 6)]
        [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    """
    exp = min(attempt - 1, 64)
    base = min(backoff.max_delay, backoff.initial * (backoff.factor**exp))
    return base * (1.0 - backoff.jitter * rand)


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt: wait ``delay`` seconds, or give up.

    ``reason`` (when giving up) is the ``error_type`` of the failure row: the error's own
    type for one that is not retried, or the limit that ended the request
    (``deadline_exceeded``, ``attempts_exhausted``, ``invalid_response``).
    """

    delay: float
    give_up: bool
    reason: str = ""
    # True when the server named the wait (Retry-After): the attempt does not count
    # against max_attempts, and the request must not go before it.
    server_said: bool = False


DEADLINE = DeadlineExceeded.error_type
EXHAUSTED = AttemptsExhausted.error_type


def next_delay(
    attempt: int,
    error: ArkError,
    *,
    now: float,
    deadline: float,
    backoff: Backoff,
    rand: float = 0.5,
    invalid_responses: int = 0,
    max_invalid_responses: int = 3,
    counted_attempts: int | None = None,
    max_attempts: int = 0,
    min_attempt_seconds: float = 0.0,
) -> Decision:
    """Decide what follows attempt number ``attempt`` that ended in ``error``.

    Args:
        attempt: attempts made so far (>= 1).
        error: the mapped error of the last attempt.
        now: current time on the same clock as ``deadline``.
        deadline: the request's deadline (first send + timeout).
        backoff: exponential backoff settings (0.5 s doubling, capped, with jitter).
        rand: a number in [0, 1) for jitter (pass ``random.random()``).
        invalid_responses: how many invalid 200 answers this request has had so far.
        max_invalid_responses: give up after this many.
        counted_attempts: attempts so far that failed without the server announcing a wait
            (this one included); default ``attempt``.
        max_attempts: give up once ``counted_attempts`` reaches this (0: no limit).
        min_attempt_seconds: the next attempt must start with at least this much time left.

    Returns:
        A :class:`Decision`. The wait is the server's ``Retry-After`` when it names one (at
        least :data:`MIN_ANNOUNCED_WAIT`), else the backoff schedule's next delay
        (``Retry-After: 0`` or a date in the past is not "retry now": it is no wait named, and
        counts toward ``max_attempts``). Gives up with
        ``deadline_exceeded`` when the next attempt would start after
        ``deadline - min_attempt_seconds``: nothing ever sleeps past a deadline.

    Example:
        >>> from arkbatch_beam._errors import RateLimited
        >>> next_delay(1, RateLimited("busy", retry_after=0.0), now=0.0, deadline=60.0,
        ...            backoff=Backoff(jitter=0.0)).delay
        0.5
    """
    if not error.retryable:
        return Decision(0.0, True, error.error_type)
    if isinstance(error, InvalidResponse) and invalid_responses >= max_invalid_responses:
        return Decision(0.0, True, "invalid_response")
    server_said = bool(error.retry_after)  # a wait of 0 (or a date past) is no wait: it counts
    counted = attempt if counted_attempts is None else counted_attempts
    if max_attempts and not server_said and counted >= max_attempts:
        return Decision(0.0, True, EXHAUSTED)
    if server_said:
        # The server named the wait (a quota's refill time, a pause): that is the wait, however
        # many times it was refused before; only a floor keeps a tiny announced wait from
        # turning into a storm.
        delay = max(error.retry_after or 0.0, MIN_ANNOUNCED_WAIT)
    else:
        delay = backoff_delay(attempt, backoff, rand)
    if now + delay > deadline - min_attempt_seconds or now + delay >= deadline:
        return Decision(delay, True, DEADLINE, server_said)
    return Decision(delay, False, "", server_said)
