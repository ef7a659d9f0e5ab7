import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arkbatch_beam import (
    AttemptTimeout,
    Backoff,
    InvalidResponse,
    RateLimited,
    RequestRejected,
    RetryableStatus,
    TransportError,
    backoff_delay,
    next_delay,
    parse_retry_after,
)

NOJIT = Backoff(jitter=0.0)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"Retry-After": " 7 "}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "200", "Retry-After": "9"}, 0.2),
        ({"retry-after-ms": "300000"}, 300.0),  # the 72 h cap applies after ms -> s
        ({"retry-after-ms": "1e12"}, 72 * 3600.0),
        ({"Retry-After": "1e9"}, 72 * 3600.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers, expected):
    assert parse_retry_after(headers, wall_now=1000.0) == expected


def test_retry_after_http_date_is_relative_to_wall_clock():
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, wall_now=1_000_000.0) == 10.0
    # A date in the past means "now".
    assert parse_retry_after({"Retry-After": date}, wall_now=1_000_100.0) == 0.0


def test_backoff_doubles_to_cap():
    assert [backoff_delay(n, NOJIT, 0.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


@given(st.integers(1, 100), st.floats(0, 0.999))
def test_jitter_stays_within_band(attempt, rand):
    b = Backoff(jitter=0.5)
    full = backoff_delay(attempt, Backoff(jitter=0.0), 0.0)
    d = backoff_delay(attempt, b, rand)
    assert full * 0.5 <= d <= full


@pytest.mark.parametrize(
    "err", [TransportError("x"), AttemptTimeout("x"), RetryableStatus("x", http_status=503),
            RateLimited("x", http_status=429), InvalidResponse("x")]
)
def test_retryable_errors_back_off(err):
    d = next_delay(2, err, now=0.0, deadline=100.0, backoff=NOJIT)
    assert not d.give_up and d.delay == 1.0 and not d.server_said


def test_rejected_is_final():
    d = next_delay(1, RequestRejected("bad", http_status=400), now=0, deadline=100, backoff=NOJIT)
    assert d.give_up and d.reason == "rejected"


def test_server_retry_after_wins_over_backoff():
    d = next_delay(1, RateLimited("x", retry_after=12.5), now=0, deadline=100, backoff=NOJIT)
    assert (d.delay, d.give_up, d.server_said) == (12.5, False, True)


def test_wait_past_deadline_gives_up_at_once():
    d = next_delay(1, RateLimited("x", retry_after=30), now=80.0, deadline=100.0, backoff=NOJIT)
    assert d.give_up and d.reason == "deadline_exceeded"
    # Exactly at the deadline is also too late: nothing sleeps up to or past it.
    d = next_delay(1, RetryableStatus("x"), now=99.5, deadline=100.0, backoff=NOJIT)
    assert d.give_up and d.reason == "deadline_exceeded"
    d = next_delay(1, RetryableStatus("x"), now=99.4, deadline=100.0, backoff=NOJIT)
    assert not d.give_up


def test_invalid_json_retries_are_bounded():
    e = InvalidResponse("bad json")
    assert not next_delay(1, e, now=0, deadline=9, backoff=NOJIT, invalid_responses=2).give_up
    d = next_delay(3, e, now=0, deadline=9, backoff=NOJIT, invalid_responses=3)
    assert d.give_up and d.reason == "invalid_response"


@given(st.integers(1, 50), st.floats(0, 1000), st.floats(0, 1000), st.floats(0, 0.999))
def test_never_sleeps_past_deadline(attempt, now, span, rand):
    deadline = now + span
    d = next_delay(attempt, RetryableStatus("x"), now=now, deadline=deadline,
                   backoff=Backoff(), rand=rand)
    assert d.give_up or now + d.delay < deadline
