"""Exactly once, item by item (issue 11): every answer kept, what --resume re-sends, shuffle size.

* ``request_sha256``: every row names the request it answers; compaction tells a copy of a row
  (same id, same request) from the answer to *another* request with the same id, and keeps that
  answer as a ``duplicate_custom_id`` row instead of dropping it (``--no_dedupe``).
* ``--resume``: one table (``ERROR_TYPES``) says which rows are final; only ``ok`` and the
  server's ``rejected`` are, so what the input or the options decided is decided again.
* The dedupe shuffle carries each request once (its line), and a hot id resolves as a stream.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import pathlib
import tracemalloc
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from apache_beam import typehints
from apache_beam.testing.util import assert_that, equal_to

import arkbatch_beam
from arkbatch_beam import (
    BatchChatInference,
    ChatRequest,
    ChatResult,
    Endpoint,
    WriteResults,
    _errors,
    _resume,
    _types,
    parse_input,
)
from arkbatch_beam._errors import _tree
from arkbatch_beam._inputs import InputOptions
from arkbatch_beam._resume import ReadDoneIds, _Resolve
from arkbatch_beam._schema import OUTPUT_SCHEMA
from arkbatch_beam._sink import compact, write_parquet_atomic
from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY_ENV, write_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(arkbatch_beam.__file__).resolve().parent


def sha(body: dict[str, Any]) -> str:
    """The expected request_sha256, computed independently of the library (stdlib json)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def batch_line(cid: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": cid, "body": body})


def rows(out: str, kind: str) -> list[dict[str, Any]]:
    path = os.path.join(out, kind)
    if not os.path.isdir(path) or not any(p.endswith(".parquet") for p in os.listdir(path)):
        return []
    return ds.dataset(path, format="parquet").to_table().to_pylist()


def cli_argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-eo", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", "8", "--timeout", "60", *extra]


def endpoint(server, model: str | None = "ep-eo") -> Endpoint:
    return Endpoint(model, base_url=server.base_url, api_key_env=KEY_ENV)


def run_pipeline(lines: list[str], out: str, ep: Endpoint, **kw: Any) -> None:
    with beam.Pipeline() as p:
        _ = p | beam.Create(lines) | BatchChatInference(ep, max_concurrency=8, **kw) | WriteResults(out)


# --- item 4: request_sha256, and no answer dropped by compaction -----------------------------------


def test_no_dedupe_keeps_the_answer_to_another_request_with_the_same_id(server, tmp_path):
    # Two shards that both number their lines: id-3 names two different requests.
    other = batch_line("id-3", user("p 3 from shard B"))
    copy = batch_line("id-1", user("p 1"))  # the very same request twice: one row is enough
    inp = write_jsonl(tmp_path / "in.jsonl", 5, extra=[other, copy])
    out = str(tmp_path / "out")
    assert batch_chat.main(cli_argv(server, inp, out, "--no_dedupe")) == 0
    assert server.attempts_by_key["p 3"] == server.attempts_by_key["p 3 from shard B"] == 1
    assert server.attempts_by_key["p 1"] == 2
    ok = {r["custom_id"]: r for r in rows(out, "results")}
    assert sorted(ok) == [f"id-{i}" for i in range(5)]
    failed = rows(out, "failures")
    assert len(failed) == 1, failed  # id-1's copy is gone; id-3's other answer is not
    dup = failed[0]
    assert (dup["custom_id"], dup["status"], dup["error_type"], dup["retryable"]) == (
        "id-3", "failed", "duplicate_custom_id", False)
    assert "answered" in dup["error_message"]
    assert all(r["request_sha256"] == sha(user(f"p {r['custom_id'][3:]}")) for r in ok.values()
               if r["custom_id"] != "id-3")
    answers = {ok["id-3"]["content"]: ok["id-3"]["request_sha256"], dup["content"]: dup["request_sha256"]}
    assert answers == {"echo: p 3": sha(user("p 3")), "echo: p 3 from shard B": sha(user("p 3 from shard B"))}
    assert dup["response_json"] and dup["completion_tokens"] and dup["attempts"] == 1  # the answer, whole
    assert compact(out) == {"results": 5, "failures": 1}  # idempotent


def test_compaction_tells_copies_from_answers_to_other_requests(tmp_path):
    out = str(tmp_path)
    res = str(tmp_path / "results")
    h1, h2 = "1" * 64, "2" * 64

    def ok(cid, content, h):
        return ChatResult(cid, "ok", content=content, attempts=1, request_sha256=h).to_row()

    # A part from before the column existed (an older run of this job): still merged.
    legacy_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "request_sha256"])
    legacy = [{k: v for k, v in ok(c, "old " + c, None).items() if k != "request_sha256"} for c in ("y", "z")]
    write_parquet_atomic(legacy, res, legacy_schema)
    write_parquet_atomic([ok("x", "a1", h1), ok("z", "z new", h1)], res, OUTPUT_SCHEMA)
    newest = write_parquet_atomic([ok("x", "a2", h2), ok("x", "a1 again", h1), ok("x", "a2 again", h2)],
                                  res, OUTPUT_SCHEMA)
    now = os.path.getmtime(newest)
    for i, path in enumerate(sorted((tmp_path / "results").iterdir(), key=lambda p: p.stat().st_mtime)):
        os.utime(path, (now - 100 + i, now - 100 + i))  # distinct ages: newest file wins
    assert compact(out) == {"results": 3, "failures": 1}
    got = {r["custom_id"]: r for r in rows(out, "results")}
    assert {k: v["content"] for k, v in got.items()} == {"x": "a2", "y": "old y", "z": "z new"}
    assert got["y"]["request_sha256"] is None  # an unknown request counts as a copy, never as another one
    [moved] = rows(out, "failures")
    assert (moved["custom_id"], moved["content"], moved["request_sha256"]) == ("x", "a1 again", h1)
    assert (moved["status"], moved["error_type"], moved["retryable"]) == ("failed", "duplicate_custom_id", False)
    assert compact(out) == {"results": 3, "failures": 1}


def test_every_row_names_the_request_it_answers(server, tmp_path):
    server.add_fault(Fault.bad_request("refused", match="q 1"))
    lines = [batch_line(f"c{i}", user(f"q {i}")) for i in range(3)]
    lines += [batch_line("c0", user("q 0-b")), "{broken", "a plain prompt"]
    out = str(tmp_path / "out")
    run_pipeline(lines, out, endpoint(server))
    got = {(r["custom_id"], r["error_type"]): r["request_sha256"] for r in rows(out, "results") + rows(out, "failures")}
    plain = parse_input("a plain prompt", InputOptions()).custom_id
    broken = [k for k in got if k[1] == "invalid_json"][0]
    assert got == {
        ("c0", None): sha(user("q 0")),  # the body as given: the endpoint's model is not in it
        ("c0", "duplicate_custom_id"): sha(user("q 0-b")),
        ("c1", "rejected"): sha(user("q 1")),
        ("c2", None): sha(user("q 2")),
        (plain, None): sha(user("a plain prompt")),
        broken: None,  # no body, no hash
    }
    # Without a model the client cannot send: invalid_request rows name their request too.
    out2 = str(tmp_path / "out2")
    run_pipeline(lines[:1], out2, endpoint(server, model=None))
    [row] = rows(out2, "failures")
    assert (row["error_type"], row["request_sha256"]) == ("invalid_request", sha(user("q 0")))


def test_input_failure_rows_name_the_body_they_hold():
    """Needs the parser change (``_inputs.py``) described in the issue-11 report."""
    opts = InputOptions(model="m", strict_model=True)
    cases = {
        batch_line("a", {"messages": []}): {"messages": []},
        batch_line("b", {"model": "other", **user("hi")}): {"model": "other", **user("hi")},
        json.dumps({"id": "c", "stream": True, **user("hi")}): {"stream": True, **user("hi")},
    }
    for line, body in cases.items():
        row = parse_input(line, opts)
        assert isinstance(row, ChatResult) and row.request_sha256 == sha(body), (line, row)
    assert parse_input("{broken", opts).request_sha256 is None


def test_request_hash_is_canonical():
    a = {"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "héllo"}]}
    b = {"messages": [{"content": "héllo", "role": "user"}], "temperature": 0.5, "model": "m"}
    assert _types.request_hash(a) == _types.request_hash(b) == sha(a)
    assert _types.request_hash({"x": object()}) is None  # never raises


# --- item 5: what --resume re-sends ----------------------------------------------------------------


def test_only_ok_and_rejected_rows_are_final(tmp_path):
    out = str(tmp_path)
    kinds = {"rejected": False, "endpoint_error": False, "invalid_response": True, "deadline_exceeded": True,
             "attempts_exhausted": True, "invalid_request": False, "invalid_json": False, "invalid_input": False,
             "invalid_encoding": False, "invalid_id": False, "no_messages": False, "empty_prompt": False,
             "request_too_large": False, "stream_not_allowed": False, "model_mismatch": False,
             "duplicate_custom_id": False, "cancelled": True, "internal_error": False}
    failures = [ChatResult.failure(name, name, "why", retryable=r).to_row() for name, r in kinds.items()]
    failures.append(ChatResult.failure("future_type", "some_type_of_a_later_version", "?").to_row())
    failures.append(ChatResult.failure("rejected_retryable", "rejected", "?", retryable=True).to_row())
    write_parquet_atomic(failures, out + "/failures", OUTPUT_SCHEMA)
    write_parquet_atomic([ChatResult("answered", "ok", content="x", attempts=1).to_row()],
                         out + "/results", OUTPUT_SCHEMA)

    with beam.Pipeline() as p:
        assert_that(p | "Done" >> ReadDoneIds(out), equal_to(["answered", "rejected"]), label="final")
        assert_that(p | "DoneOk" >> ReadDoneIds(out, retry_failed=True), equal_to(["answered"]), label="ok")
    assert _errors.FINAL_ON_RESUME == {"rejected"}
    assert {e.error_type: e.retryable for e in _errors.ERROR_TYPES if e.error_type in kinds} == kinds
    assert _errors.final_on_resume("ok", None, None) and not _errors.final_on_resume("failed", None, None)


def test_resume_sends_what_a_fixed_option_or_input_now_allows(server, tmp_path):
    # Run 1 without a model: every request that names none is an invalid_request row; one that
    # names its own model is sent and refused by the server; one line has no messages.
    server.add_fault(Fault.bad_request("refused by policy", match="q own"))
    lines = [batch_line(f"c{i}", user(f"q {i}")) for i in range(6)]
    lines.append(batch_line("own", {"model": "m-own", **user("q own")}))
    lines.append(batch_line("fixme", {"messages": []}))
    out = str(tmp_path / "out")
    run_pipeline(lines, out, endpoint(server, model=None))
    first = {r["custom_id"]: r["error_type"] for r in rows(out, "failures")}
    assert first == {**{f"c{i}": "invalid_request" for i in range(6)}, "own": "rejected", "fixme": "no_messages"}
    assert dict(server.attempts_by_key) == {"q own": 1}
    # Run 2: --model given, the bad line fixed, --resume: all but the server's verdict is sent.
    server.reset_counters()
    lines[-1] = batch_line("fixme", user("q fixed"))
    run_pipeline(lines, out, endpoint(server), resume_from=out)
    assert dict(server.attempts_by_key) == {**{f"q {i}": 1 for i in range(6)}, "q fixed": 1}
    compact(out)
    assert sorted(r["custom_id"] for r in rows(out, "results")) == sorted([f"c{i}" for i in range(6)] + ["fixme"])
    assert [(r["custom_id"], r["error_type"]) for r in rows(out, "failures")] == [("own", "rejected")]


def test_readme_error_table_is_rendered_from_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- error-types:start -->", "<!-- error-types:end -->"
    assert start in text and end in text, f"README.md needs the table between {start} and {end}"
    table = text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"
    assert table == _errors.render_error_types_table(), "paste render_error_types_table() into README.md"


def _error_types_written_by_the_code() -> set[str]:
    """Every error_type literal the package writes: ``error_type = "..."`` class attributes,
    ``error_type="..."`` arguments, ``ChatResult.failure(id, "...")`` and ``_Bad("...")``."""
    found: set[str] = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "error_type" for t in node.targets):
                value = node.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.add(value.value)
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            args = {"failure": 1}
            if name in args and len(node.args) > args[name]:
                arg = node.args[args[name]]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value)
            for kw in node.keywords:
                if kw.arg == "error_type" and isinstance(kw.value, ast.Constant):
                    found.add(kw.value.value)
    # The abstract classes of the tree and the ones that stop a job (never a row's error_type).
    abstract = {c.error_type for c in _tree(_errors.ArkError) if not c.meaning}
    return found - abstract


def test_every_error_type_the_code_writes_is_in_the_table():
    written = _error_types_written_by_the_code()
    assert {"rejected", "invalid_request", "invalid_json", "deadline_exceeded"} <= written  # the scan works
    assert written - {e.error_type for e in _errors.ERROR_TYPES} == set()


# --- item 9: the shuffle ---------------------------------------------------------------------------


def test_a_request_crosses_the_dedupe_shuffle_once():
    body = {"model": "m", "temperature": 0.2, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What are common cruciferous plants? " * 4}]}
    line = batch_line("id-1", body)
    request = parse_input(line, InputOptions())
    registry = beam.coders.registry
    before = registry.get_coder(typehints.Tuple[str, typehints.Tuple[int, typehints.Any]]).encode(
        (request.custom_id, (1, request)))  # what crossed it before: (id, (kind, ChatRequest))
    after = registry.get_coder(typehints.Tuple[str, typehints.Any]).encode(_resume.shuffle_value(request))
    print(f"bytes per request in the dedupe shuffle: line {len(line)}, before {len(before)}, after {len(after)}")
    assert len(after) <= len(line) + 16 and len(after) * 1.8 <= len(before)
    bad = parse_input("{broken", InputOptions()).to_row()
    before_bad = registry.get_coder(typehints.Tuple[str, typehints.Tuple[int, typehints.Any]]).encode(
        (bad["custom_id"], (1, bad)))
    after_bad = registry.get_coder(typehints.Tuple[str, typehints.Any]).encode(_resume.shuffle_value(bad))
    print(f"bytes per bad-input row: before {len(before_bad)}, after {len(after_bad)}")
    assert len(after_bad) * 2 <= len(before_bad)


@pytest.mark.parametrize("opts", [InputOptions(), InputOptions(system="Be brief."), InputOptions(input_format="chat"),
                                  InputOptions(input_format="text"), InputOptions(max_request_bytes=1024)])
def test_a_request_rebuilt_from_its_line_is_the_same_request(opts):
    """After the shuffle a request is parsed again from ``raw``: that must give it back exactly."""
    items: list[Any] = [
        batch_line("a", user("hi")), json.dumps({"id": 7, "temperature": 0, **user("x")}),
        "\ufeffa prompt with a byte-order mark", "  padded prompt  ", "plain", "caf\u00e9 \u4e2d",
        "\ufeff" + batch_line("bom", user("b")), b'{"custom_id": "bytes", "body": {"messages": '
        b'[{"role": "user", "content": "caf\xc3\xa9"}]}}', b"a byte prompt",
        {"custom_id": "row-1", "messages": [{"role": "user", "content": "from parquet"}]},
        {"messages": [{"role": "user", "content": "no id"}], "temperature": 0.5},
    ]
    rebuilt = 0
    for item in items:
        request = parse_input(item, opts)
        if isinstance(request, ChatRequest):
            assert request.raw is not None and parse_input(request.raw, opts) == request, item
            rebuilt += 1
    assert rebuilt >= 3


def test_a_request_read_in_another_encoding_is_rebuilt_from_its_decoded_line():
    if "input_encoding" not in {f.name for f in dataclasses.fields(InputOptions)}:
        pytest.skip("InputOptions has no input_encoding")
    opts = InputOptions(input_encoding="gbk")
    request = parse_input('{"custom_id": "g", "body": {"messages": [{"role": "user", "content": "你好"}]}}'
                          .encode("gbk"), opts)
    assert isinstance(request, ChatRequest) and parse_input(request.raw, opts) == request


class _LazyGroup:
    """A re-iterable group whose values are made as they are read (as a runner's paged one is)."""

    def __init__(self, n: int, done_at: int | None = None) -> None:
        self.n, self.done_at, self.passes = n, done_at, 0

    def __iter__(self):
        self.passes += 1
        pad = "x" * 1000
        for i in range(self.n):
            if i == self.done_at:
                yield None
            yield json.dumps({"custom_id": "hot", "body": user(f"{(i * 7919) % self.n:07d} {pad}")})


def test_a_hot_id_resolves_as_a_stream():
    n = 40_000  # ~1 KB lines: a sorted list of the group would hold ~40 MB
    resolve = _Resolve(InputOptions(), None)
    resolve.setup()
    group = _LazyGroup(n)
    tracemalloc.start()
    try:
        winner, dups, lines = None, 0, set()
        for out in resolve.process(("hot", group)):
            if isinstance(out, ChatRequest):
                winner = out
            else:
                assert out["error_type"] == "duplicate_custom_id" and out["request_sha256"]
                dups += 1
                lines.add(hashlib.sha256(out["request_json"].encode()).digest())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert winner is not None and winner.body["messages"][0]["content"].startswith("0000000 ")
    assert dups == n - 1 and len(lines) == n - 1  # each other copy: its own row, with its own line
    assert group.passes <= 2
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # (the test's own set of digests included)
    # A final row for the id: nothing is sent and no duplicate row is written, however many copies.
    assert list(resolve.process(("hot", _LazyGroup(1000, done_at=999)))) == []


def test_a_hot_id_in_a_pipeline_is_sent_once(server, tmp_path):
    n = 3000  # identical prompts: one derived id
    out = str(tmp_path / "out")
    with beam.Pipeline() as p:
        _ = (p | beam.Create(["same prompt"] * n)
             | BatchChatInference(endpoint(server), max_concurrency=8) | WriteResults(out))
    assert server.total_requests == 1
    [ok] = rows(out, "results")
    failed = rows(out, "failures")
    assert len(failed) == n - 1 and {r["error_type"] for r in failed} == {"duplicate_custom_id"}
    assert {r["request_sha256"] for r in failed} == {ok["request_sha256"]} == {sha(user("same prompt"))}
