"""Fuzz what a hostile server can answer, through the real scheduler, on a fake clock.

Every example scripts a server per request (statuses, bodies, headers, dropped connections,
answers that never come), runs a few requests through :class:`ArkClient` with a scripted
transport and a :class:`FakeClock` (no network, no real time), moves the clock past every
deadline and checks the promises the client makes whatever the server does:

* nothing escapes the scheduler, and every request ends in exactly one row, ``ok`` or
  ``failed``; a failed row says why (``error_type``, ``error_message``);
* an ``ok`` row comes only from a 200 whose body is a completion, and carries what it said;
* int columns fit int64 and every row can be written with the output schema;
* retries: never before the backoff's next delay or the server's ``Retry-After``, never an
  attempt started past the deadline (less ``min_attempt_seconds``).

Self-contained (its own scripted transport), like ``tests/test_engine.py``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import email.utils
import json
import math
import os
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from arkbatch_beam import ArkClient, Backoff, ChatRequest, ChatResult, ClientConfig, Endpoint
from arkbatch_beam._errors import (
    InvalidResponse,
    RateLimited,
    RetryableStatus,
    TransportError,
    error_for_status,
)
from arkbatch_beam._retry import (
    DEADLINE,
    MAX_RETRY_AFTER,
    MIN_ANNOUNCED_WAIT,
    backoff_delay,
    next_delay,
    parse_retry_after,
)
from arkbatch_beam._schema import OUTPUT_SCHEMA
from arkbatch_beam.testing import FakeClock

WALL0 = 1_700_000_000.0  # the wall clock (for HTTP-dates) when the fake clock reads START
START = 1000.0
INT64 = range(-(2**63), 2**63)
INT_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
# What a failure row may say ended it: the server's own non-retried answer, a transport error
# the client does not know, or the limit that ended the request.
FAILURE_TYPES = {
    "rejected", "endpoint_error", "error", "invalid_response", "deadline_exceeded", "attempts_exhausted",
}
EPS = 1e-6

COMMON = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# -- strategies: JSON of every shape ------------------------------------------------------------

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**30)]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    EDGE_INTS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
# Token counts: right, or any wrong type (strings, bools, floats, 2**64, negatives).
token_counts = st.one_of(
    st.integers(0, 10**6), EDGE_INTS, st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6), st.none(), json_values,
)


def good_or_hostile(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, json_values)


@st.composite
def completions(draw: st.DrawFn) -> Any:
    """A chat completion with every level either right or of a wrong type (or missing)."""
    content = draw(st.one_of(st.text(max_size=40), json_values))
    message = draw(good_or_hostile(st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": st.just(content)},
        optional={"reasoning_content": good_or_hostile(st.text(max_size=20))},
    )))
    choice = draw(good_or_hostile(st.fixed_dictionaries(
        {"index": st.just(0), "message": st.just(message)},
        optional={"finish_reason": good_or_hostile(st.sampled_from(["stop", "length"]))},
    )))
    choices = draw(st.one_of(st.lists(st.just(choice), min_size=1, max_size=2), st.just([]), json_values))
    details = st.fixed_dictionaries({}, optional={"cached_tokens": token_counts, "reasoning_tokens": token_counts})
    usage = draw(good_or_hostile(st.fixed_dictionaries({}, optional={
        "prompt_tokens": token_counts,
        "completion_tokens": token_counts,
        "total_tokens": token_counts,
        "prompt_tokens_details": good_or_hostile(details),
        "completion_tokens_details": good_or_hostile(details),
    })))
    return draw(st.fixed_dictionaries({}, optional={
        "id": good_or_hostile(st.text(max_size=10)),
        "object": st.just("chat.completion"),
        "model": good_or_hostile(st.text(max_size=10)),
        "choices": st.just(choices),
        "usage": st.just(usage),
    }))


@st.composite
def error_objects(draw: st.DrawFn) -> Any:
    """Error bodies of odd shapes (Ark's, OpenAI's, neither)."""
    return draw(st.one_of(
        st.fixed_dictionaries({"error": st.fixed_dictionaries({}, optional={
            "code": json_values, "message": json_values, "type": json_values, "param": json_values})}),
        st.fixed_dictionaries({"error": json_values}),
        st.fixed_dictionaries({"message": json_values}),
        st.fixed_dictionaries({"error": st.fixed_dictionaries(
            {"message": st.sampled_from(["", " ", "\n"])}, optional={"code": st.sampled_from(["", "X", None])})}),
        st.fixed_dictionaries({"error": st.sampled_from(["", " "])}),
    ))


def _big_completion() -> bytes:  # 1 MB of content in a valid completion
    return orjson.dumps({"choices": [{"message": {"content": "x" * (1 << 20)}}], "usage": {"prompt_tokens": 1}})


SPECIAL_BODIES = [
    b"",
    b"null",
    b"[]",
    b"[{}]",
    b"123",
    b"-0.0",
    b'"choices"',
    b"{}",
    b"\xff\xfe\xfd\x00garbage",
    b'{"choices": [{"message": {"content": "caf\xe9"}}]}',  # latin-1, not UTF-8
    b'{"choices": [{"message": {"content": "\\ud800"}}]}',  # a lone surrogate escape
    b'{"choices": [{"message": {"content": NaN}}], "usage": {"prompt_tokens": Infinity}}',
    b'{"choices": [{"message": {"content": 1e400}}]}',
    b'{"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": 18446744073709551616}}',
    b'{"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": -9223372036854775809}}',
    b"[" * 5000 + b"]" * 5000,
    b'{"choices": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"choices": [{"message": {"content": "dup"}}], "choices": null}',
    b'{"error": {"code": "X", "message": "m"}, "choices": [{"message": {"content": "both"}}]}',
    b"<html><body>502 Bad Gateway</body></html>",
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00",  # a gzip header, not decompressed
]

good_completions = st.fixed_dictionaries(
    {
        "id": st.text(max_size=10),
        "choices": st.lists(st.fixed_dictionaries(
            {"index": st.just(0), "message": st.fixed_dictionaries(
                {"role": st.just("assistant"), "content": st.one_of(st.text(max_size=40), st.none())})},
            optional={"finish_reason": st.sampled_from(["stop", "length"])},
        ), min_size=1, max_size=2),
    },
    optional={"usage": st.fixed_dictionaries({}, optional={
        "prompt_tokens": token_counts, "completion_tokens": token_counts, "total_tokens": token_counts})},
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["good", "good", "completion", "completion", "error", "error", "value", "raw",
                                 "special", "big"]))
    if kind == "big":
        return _big_completion()
    if kind == "special":
        return draw(st.sampled_from(SPECIAL_BODIES))
    if kind == "raw":
        return draw(st.binary(max_size=40))
    strategy = {"good": good_completions, "completion": completions(), "error": error_objects()}.get(kind, json_values)
    text = json.dumps(draw(strategy), ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8")
    if draw(st.integers(0, 5)) == 0 and len(data) > 1:  # truncated mid-answer
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


# -- strategies: headers --------------------------------------------------------------------------

_DATE_SAMPLES = [
    "Wed, 21 Oct 2015 07:28:00 GMT",
    "Thu, 01 Jan 1970 00:00:00 GMT",
    "Mon, 01 Jan 0001 00:00:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Fri, 31 Dec 9999 23:59:59 -1200",
    "Sun, 06 Nov 1994 08:49:37 +2400",
    "Sun, 06 Nov 1994 08:49:37 -9999",
    "Tue, 32 Foo 2020 25:61:61 GMT",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "Tue, 14 Nov 2023 22:13:30 GMT",  # WALL0 + 10 s
    "Tue, 14 Nov 2023 22:13:20",  # no zone
    "Tue, 14 Nov 2023 22:13:20 XYZ",
    "99999999999999999999 GMT",
]
http_dates = st.datetimes(
    min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(9999, 12, 30),
    timezones=st.just(datetime.UTC),
).map(lambda d: email.utils.format_datetime(d, usegmt=True))
near_dates = st.floats(-10**6, 10**6).map(lambda s: email.utils.formatdate(WALL0 + s, usegmt=True))
retry_after_values = st.one_of(
    st.integers(-10, 10**7).map(str),
    st.floats().map(str),
    st.floats().map(repr),
    st.sampled_from([
        "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e12", "1e308", "1e309", "-1", "-0", "0", "0.0001",
        "1e-320", "0x10", "", " ", "1_000", "\u0663", "  5  ", "5s", "5,6", "+7", str(2**64), "9" * 400,
    ]),
    st.sampled_from(_DATE_SAMPLES),
    http_dates,
    near_dates,
    st.text(max_size=30),
)
retry_after_names = st.sampled_from(["Retry-After", "retry-after", "RETRY-AFTER"])
retry_after_ms_names = st.sampled_from(["retry-after-ms", "Retry-After-Ms"])
content_types = st.one_of(
    st.sampled_from(["application/json", "text/html", "text/plain; charset=latin-1", "", "application/x-ndjson"]),
    st.text(max_size=20),
)


@st.composite
def header_items(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    items = []
    if draw(st.booleans()):
        items.append((draw(retry_after_names), draw(retry_after_values)))
    if draw(st.integers(0, 3)) == 0:
        items.append((draw(retry_after_ms_names), draw(retry_after_values)))
    if draw(st.integers(0, 5)) == 0:  # a repeated Retry-After
        items.append((draw(retry_after_names), draw(retry_after_values)))
    if draw(st.booleans()):
        items.append(("Content-Type", draw(content_types)))
    return tuple(items)


def as_headers(items: tuple[tuple[str, str], ...], multi: bool) -> Any:
    """Headers as aiohttp gives them (a case-insensitive multidict) or as a plain dict."""
    if multi:
        return CIMultiDictProxy(CIMultiDict(items))
    return dict(items)


# -- strategies: answers --------------------------------------------------------------------------

STATUSES = st.one_of(
    st.just(200),
    st.sampled_from([200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502,
                     503, 504]),
    st.sampled_from([200, 400, 422, 429, 503]),
    st.integers(100, 999),
)

_EXCEPTIONS = {
    "payload": lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
    "disconnected": lambda: aiohttp.ServerDisconnectedError(),
    "reset": lambda: ConnectionResetError(104, "Connection reset by peer"),
    "timeout": lambda: TimeoutError(),  # asyncio.TimeoutError is this class
    "read-timeout": lambda: aiohttp.ServerTimeoutError("Timeout on reading data from socket"),
    "oserror": lambda: aiohttp.ClientOSError(32, "Broken pipe"),
    "runtime": lambda: RuntimeError("something odd"),
    "runtime-empty": lambda: RuntimeError(),
    "value": lambda: ValueError("bad header line"),
    "too-large": lambda: InvalidResponse("response body over 67108864 bytes"),
    "transport": lambda: TransportError("connection lost"),
}


@dataclasses.dataclass(frozen=True)
class Reply:
    """An HTTP answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    multi: bool = True

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 80 else self.body[:60] + b"...(%d bytes)" % len(self.body)
        return f"Reply({self.status}, {self.headers!r}, {body!r})"


@dataclasses.dataclass(frozen=True)
class Raise:
    """The transport raises (the connection broke, or something no one expected)."""

    kind: str


@dataclasses.dataclass(frozen=True)
class Hang:
    """The server never answers (the client must abort the attempt)."""


@dataclasses.dataclass(frozen=True)
class Late:
    """No answer until the client aborts the attempt, then ``reply`` after all (the transport
    swallows the cancellation, as an answer completing in the same tick would)."""

    reply: Reply


replies = st.builds(Reply, STATUSES, header_items(), bodies(), st.booleans())


@st.composite
def answers(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["reply"] * 12 + ["ok"] * 5 + ["raise", "raise", "hang", "late"]))
    if kind == "hang":
        return Hang()
    if kind == "late":
        return Late(draw(replies))
    if kind == "raise":
        return Raise(draw(st.sampled_from(sorted(_EXCEPTIONS))))
    if kind == "ok":  # a well-formed completion (its leaves may still be odd), any headers
        body = json.dumps(draw(good_completions), ensure_ascii=draw(st.booleans())).encode()
        return Reply(200, draw(header_items()), body, draw(st.booleans()))
    return draw(replies)


# -- the scripted transport -----------------------------------------------------------------------


class Script:
    """A hostile server: request ``key`` gets ``plans[key][n % len]`` on its n-th attempt.

    Records the fake-clock time of every call and the answer given.
    """

    def __init__(self, plans: dict[str, list[Any]], clock: FakeClock) -> None:
        self.plans = plans
        self.clock = clock
        self.log: dict[str, list[tuple[float, Any]]] = collections.defaultdict(list)
        self.in_flight = 0

    async def __call__(self, payload: bytes, rid: str) -> tuple[int, Any, bytes]:
        key = orjson.loads(payload)["messages"][-1]["content"]
        plan = self.plans[key]
        answer = plan[len(self.log[key]) % len(plan)]
        self.log[key].append((self.clock.time(), answer))
        self.in_flight += 1
        try:
            await asyncio.sleep(0)
            if isinstance(answer, Hang):
                await asyncio.Event().wait()  # never set: only the client's abort ends it
            if isinstance(answer, Late):
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    answer = answer.reply
            if isinstance(answer, Raise):
                raise _EXCEPTIONS[answer.kind]()
            return answer.status, as_headers(answer.headers, answer.multi), answer.body
        finally:
            self.in_flight -= 1


def completion_of(answer: Any) -> dict[str, Any] | None:
    """The completion a 200 answer carries, by the protocol: strict JSON (orjson: UTF-8, no NaN,
    no lone surrogates) holding an object whose ``choices`` is a non-empty list of objects."""
    if isinstance(answer, Late):
        answer = answer.reply
    if not isinstance(answer, Reply) or answer.status != 200:
        return None
    try:
        obj = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return obj


def _text(v: Any) -> str | None:
    return v if v is None or isinstance(v, str) else orjson.dumps(v).decode()


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v in INT64 else None


def _non_retried_4xx(answer: Any) -> bool:
    return isinstance(answer, Reply) and 400 <= answer.status <= 499 and answer.status not in (408, 409, 429)


@dataclasses.dataclass
class Run:
    config: ClientConfig
    rand: float
    results: list[ChatResult]
    log: dict[str, list[tuple[float, Any]]]
    stats: Any
    crashed: list[BaseException]  # exceptions that ended any task of the client (its workers)


def run_hostile(plans: dict[str, list[Any]], config: ClientConfig, rand: float, models: list[str | None]) -> Run:
    async def main() -> Run:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = []

        def record(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            tasks.append(task)
            return task

        loop.set_task_factory(record)  # every worker the client starts, to see how each ended
        clock = FakeClock(START)
        script = Script(plans, clock)
        client = ArkClient(
            config, transport=script, clock=clock.time, call_at=clock.call_at,
            wall_clock=lambda: WALL0 + clock.time() - START, rand=lambda: rand,
        )
        results: list[ChatResult] = []
        await client.start()
        try:
            for key, model in zip(plans, models, strict=True):
                body: dict[str, Any] = {"messages": [{"role": "user", "content": key}]}
                if model:
                    body["model"] = model
                client.submit(ChatRequest(f"id-{key}", body), results.append, owner=None)
            # Long enough for every request: each may wait out one capped Retry-After pause of
            # the gate (72 h) before its first send, then has at most `timeout` to end.
            bound = len(plans) * (MAX_RETRY_AFTER + config.timeout) + 3600.0
            step = 6 * 3600.0
            while len(results) < len(plans) and clock.time() - START < bound:
                await clock.advance(step)
            stats = client.stats()
            assert script.in_flight == 0
        finally:
            await client.close()
        crashed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        return Run(config, rand, results, dict(script.log), stats, crashed)

    return asyncio.run(main())


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, list[Any]], ClientConfig, float, list[str | None]]:
    n = draw(st.integers(1, 5))
    plans = {str(i): draw(st.lists(answers(), min_size=1, max_size=4)) for i in range(n)}
    models = [draw(st.sampled_from([None, None, "m2"])) for _ in range(n)]
    config = ClientConfig(
        Endpoint("m", base_url="http://127.0.0.1:9", api_key_env=""),
        max_concurrency=draw(st.integers(1, 4)),
        timeout=draw(st.sampled_from([5.0, 30.0, 120.0])),
        attempt_timeout=draw(st.sampled_from([None, None, 3.0, 20.0])),
        backoff=Backoff(initial=draw(st.sampled_from([0.01, 0.5, 2.0])), max_delay=8.0, jitter=0.5),
        max_attempts=draw(st.integers(0, 4)),
        max_invalid_responses=draw(st.integers(1, 3)),
        min_attempt_seconds=draw(st.sampled_from([0.0, 1.0, 2.5])),
        max_requests_per_second=draw(st.sampled_from([None, None, 2.0])),
        progress_seconds=0,
    )
    rand = draw(st.floats(0.0, 1.0, exclude_max=True))
    return plans, config, rand, models


# -- the fuzz test --------------------------------------------------------------------------------


@settings(COMMON, max_examples=int(os.environ.get("ARKBATCH_FUZZ_EXAMPLES", "300")))
@given(scenarios())
def test_a_hostile_server_never_breaks_the_one_row_promise(scenario: Any) -> None:
    plans, config, rand, models = scenario
    run = run_hostile(plans, config, rand, models)

    # Nothing escaped: no task of the client ended in an exception.
    assert run.crashed == [], run.crashed
    # Exactly one row per submitted id, whatever happened; nothing left behind.
    ids = collections.Counter(r.custom_id for r in run.results)
    assert ids == collections.Counter(f"id-{k}" for k in plans), ids
    assert (run.stats.in_flight, run.stats.queued, run.stats.parked) == (0, 0, 0)
    assert run.stats.ok + run.stats.failed == len(plans)

    # Every row fits the output schema (int64 columns, strings, the lot).
    table = pa.Table.from_pylist([r.to_row() for r in run.results], schema=OUTPUT_SCHEMA)
    assert table.num_rows == len(plans)

    window = config.min_attempt_window
    for row in run.results:
        key = row.custom_id[len("id-"):]
        calls = run.log.get(key, [])
        assert row.status in ("ok", "failed")
        assert row.attempts == len(calls) >= 1
        assert row.latency_ms is not None and math.isfinite(row.latency_ms) and row.latency_ms >= 0
        for name in INT_COLUMNS:
            value = getattr(row, name)
            assert value is None or (type(value) is int and value in INT64), (name, value)

        # A 200 with a completion ends the request at once: only the last answer may be one.
        served = [a for _, a in calls]
        event(f"row {row.status} {row.error_type}")
        assert all(completion_of(a) is None for a in served[:-1]), served
        last = served[-1].reply if isinstance(served[-1], Late) else served[-1]
        completion = completion_of(last)
        if row.status == "ok":
            assert completion is not None, (row, last)
            assert row.response_json == last.body.decode("utf-8")
            message = completion["choices"][0].get("message")
            message = message if isinstance(message, dict) else {}
            assert row.content == _text(message.get("content"))
            usage = completion.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            assert row.prompt_tokens == _count(usage.get("prompt_tokens"))
            assert row.total_tokens == _count(usage.get("total_tokens"))
            assert row.error_type is None and row.error_message is None
        else:
            assert completion is None, (row, last)
            assert row.error_type in FAILURE_TYPES, row.error_type
            assert isinstance(row.error_message, str), row
            assert row.error_message.strip(), row
            assert isinstance(row.retryable, bool)
            if _non_retried_4xx(last):  # the server's own refusal: its status is kept, never retried
                assert row.http_status == last.status
                assert row.error_type == ("endpoint_error" if last.status in (401, 403, 404) else "rejected")
                assert row.retryable is False

        # Timing: no attempt after the first starts past deadline - min_attempt_seconds, and no
        # retry comes sooner than the backoff's next delay or the server's Retry-After.
        first = calls[0][0]
        deadline = first + config.timeout
        for n, (t, _) in enumerate(calls[1:], start=2):
            assert t <= deadline - window + EPS, (n, t, deadline)
        for n in range(1, len(calls)):
            (t0, answer), (t1, _) = calls[n - 1], calls[n]
            if isinstance(answer, (Hang, Late)):
                continue  # the wait counts from when the attempt was aborted
            wait = backoff_delay(n, config.backoff, rand)
            if isinstance(answer, Reply) and answer.status != 200:
                wall = WALL0 + t0 - START
                announced = parse_retry_after(as_headers(answer.headers, answer.multi), wall)
                if announced:  # the server named the wait: that is the wait (floored)
                    wait = max(announced, MIN_ANNOUNCED_WAIT)
            assert t1 - t0 >= wait - EPS * max(1.0, wait), (n, t0, t1, wait, answer)


@pytest.mark.parametrize("body", [b'{"error": {"code": "InvalidParameter", "message": ""}}', b'{"error": ""}',
                                  b'{"message": "  "}', b'{"error": {"message": "\\n"}}'])
def test_a_blank_server_error_message_still_leaves_a_message(body: bytes) -> None:
    config = ClientConfig(Endpoint("m", base_url="http://127.0.0.1:9", api_key_env=""), timeout=30.0,
                          progress_seconds=0)
    run = run_hostile({"0": [Reply(400, (), body)]}, config, 0.0, [None])
    (row,) = run.results
    assert row.status == "failed" and row.error_type == "rejected" and row.http_status == 400
    assert row.error_message.strip(), repr(row.error_message)  # e.g. "HTTP 400"


# -- Retry-After: parsing and the decision ---------------------------------------------------------


@settings(COMMON, max_examples=400)
@given(
    items=header_items(),
    multi=st.booleans(),
    wall=st.one_of(st.just(WALL0), st.floats(0.0, 4e9)),
    attempt=st.integers(1, 40),
    now=st.floats(0.0, 1e7),
    timeout=st.floats(1.0, 72 * 3600.0),
    min_left=st.floats(0.0, 3600.0),
    rand=st.floats(0.0, 1.0, exclude_max=True),
    backoff=st.builds(
        lambda initial, factor, extra, jitter: Backoff(initial, factor, min(3600.0, initial + extra), jitter),
        st.floats(0.001, 3600.0), st.floats(1.0, 10.0), st.floats(0.0, 3600.0), st.floats(0.0, 1.0),
    ),
    status=st.sampled_from([429, 503, 500, 408, 409]),
    max_attempts=st.integers(0, 30),
)
def test_any_retry_after_gives_a_finite_wait_inside_the_deadline(
    items: tuple[tuple[str, str], ...], multi: bool, wall: float, attempt: int, now: float, timeout: float,
    min_left: float, rand: float, backoff: Backoff, status: int, max_attempts: int,
) -> None:
    headers = as_headers(items, multi)
    announced = parse_retry_after(headers, wall)
    assert announced is None or (math.isfinite(announced) and 0.0 <= announced <= MAX_RETRY_AFTER), announced
    event("announced: " + ("none" if announced is None else "0" if announced == 0 else
                           "cap" if announced == MAX_RETRY_AFTER else "some"))

    err = error_for_status(status, None, retry_after=announced, text="busy")
    assert isinstance(err, RetryableStatus)
    assert isinstance(err, RateLimited) == (status == 429 or (status == 503 and announced is not None))
    deadline = now + timeout
    min_left = min(min_left, timeout / 2.0)  # what ClientConfig.min_attempt_window applies
    d = next_delay(attempt, err, now=now, deadline=deadline, backoff=backoff, rand=rand,
                   max_attempts=max_attempts, min_attempt_seconds=min_left)
    assert math.isfinite(d.delay) and d.delay >= 0.0, d
    event(f"decision: {d.reason or 'wait'}")
    if d.give_up:
        assert d.reason in (DEADLINE, "attempts_exhausted"), d
        if d.reason == "attempts_exhausted":
            assert not announced and max_attempts and attempt >= max_attempts  # a wait of 0 counts
        return
    if announced:  # the server named a wait: that is the wait (floored), however often it refused
        assert d.delay == max(announced, MIN_ANNOUNCED_WAIT) and d.server_said
    else:  # none, 0 or a date past: the backoff schedule
        assert d.delay == backoff_delay(attempt, backoff, rand) and not d.server_said
    assert now + d.delay <= deadline - min_left and now + d.delay < deadline


@settings(COMMON, max_examples=200)
@given(
    seconds=st.one_of(st.integers(0, 10**9), st.floats(0.0, 1e12, allow_nan=False)),
    ms=st.one_of(st.none(), st.integers(0, 10**12)),
    name=retry_after_names,
)
def test_a_readable_retry_after_is_read_exactly_and_capped(seconds: float, ms: int | None, name: str) -> None:
    items = [(name, str(seconds))]
    if ms is not None:
        items.append(("retry-after-ms", str(ms)))
    got = parse_retry_after(CIMultiDictProxy(CIMultiDict(items)), WALL0)
    want = min(ms / 1000.0, MAX_RETRY_AFTER) if ms is not None else min(float(seconds), MAX_RETRY_AFTER)
    assert got == want
    assert parse_retry_after(dict(items), WALL0) == want  # a plain dict, any case: the same


@settings(COMMON, max_examples=200)
@given(
    when=st.datetimes(min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(9999, 12, 30),
                      timezones=st.just(datetime.UTC)),
    wall=st.floats(0.0, 4e9),
)
def test_an_http_date_is_read_against_the_wall_clock_and_capped(when: datetime.datetime, wall: float) -> None:
    date = email.utils.format_datetime(when.replace(microsecond=0), usegmt=True)
    want = min(max(0.0, when.replace(microsecond=0).timestamp() - wall), MAX_RETRY_AFTER)
    assert parse_retry_after({"Retry-After": date}, wall) == want
