"""Crash-safe output, duplicates, compaction and --resume."""

import json
import os
import signal
import subprocess
import sys
import threading

import pyarrow.dataset as ds
import pytest

from arkbatch_beam import ChatResult
from arkbatch_beam._schema import OUTPUT_SCHEMA
from arkbatch_beam._sink import compact, write_parquet_atomic
from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY_ENV, write_jsonl


def argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-r", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", "8", "--timeout", "60", *extra]


def rows(out, kind):
    path = os.path.join(out, kind)
    if not os.path.isdir(path):
        return []
    return ds.dataset(path, format="parquet").to_table().to_pylist()


def test_kill_9_then_resume_sends_only_the_missing(server, tmp_path):
    n, kill_at, part_rows, cap = 1200, 600, 50, 8
    server.latency = 0.002
    inp = write_jsonl(tmp_path / "in.jsonl", n)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pipelines.batch_chat",
           *argv(server, inp, out, "--part_rows", str(part_rows))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    killed = threading.Event()

    def kill(total):
        if total >= kill_at and not killed.is_set():
            killed.set()
            os.kill(proc.pid, signal.SIGKILL)

    server.on_request(kill)
    proc.communicate(timeout=240)
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    survived = {r["custom_id"] for r in rows(out, "results")}
    assert 0 < len(survived) < n
    # Every visible file is a complete Parquet file (the dataset read above would have failed).
    answered_before = {k for k, v in server.ok_by_key.items() if v}
    # Resume: only ids without a final row are sent.
    assert batch_chat.main(argv(server, inp, out, "--resume", "--part_rows", str(part_rows))) == 0
    final = rows(out, "results")
    ids = [r["custom_id"] for r in final]
    assert len(ids) == n == len(set(ids)) and not rows(out, "failures")
    twice = [k for k, v in server.ok_by_key.items() if v > 1]
    lost_in_flight = answered_before - {f"p {int(i.split('-')[1])}" for i in survived}
    assert len(twice) == len(lost_in_flight) <= part_rows + 2 * cap
    assert all(server.ok_by_key[f"p {i}"] == 1 for i in (int(s.split("-")[1]) for s in survived))
    print(f"killed after {kill_at} requests; {len(survived)} rows survived; re-sent {len(twice)}")


def test_duplicate_ids_are_sent_once(server, tmp_path):
    line = json.dumps({"custom_id": "same", "body": {"messages": [{"role": "user", "content": "A"}]}})
    other = json.dumps({"custom_id": "same", "body": {"messages": [{"role": "user", "content": "B"}]}})
    broken = line[:30]  # a cut copy whose id is salvaged: it sorts first, but must not win
    inp = write_jsonl(tmp_path / "in.jsonl", 3, extra=[line, other, line, broken])
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out)) == 0
    ok, failed = rows(out, "results"), rows(out, "failures")
    assert [r["custom_id"] for r in ok].count("same") == 1
    dups = [r for r in failed if r["error_type"] == "duplicate_custom_id"]
    assert len(dups) == 3 and all(r["custom_id"] == "same" for r in dups)
    assert broken in [r["request_json"] for r in dups]
    assert server.attempts_by_key["A"] + server.attempts_by_key["B"] == 1


def test_resume_keeps_final_failures_and_resends_retryable_ones(server, tmp_path):
    server.add_fault(Fault.bad_request("nope", match="p 1"))
    server.add_fault(Fault.server_error(503, match="p 2", times=-1))
    server.add_fault(Fault.unauthorized(match="p 3"))  # e.g. a key that expired mid-job
    inp = write_jsonl(tmp_path / "in.jsonl", 5)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out, "--timeout", "1", "--backoff_initial", "0.05",
                                "--backoff_max", "0.1")) == 0
    failed = {r["custom_id"]: r for r in rows(out, "failures")}
    assert failed["id-1"]["retryable"] is False and failed["id-2"]["error_type"] == "deadline_exceeded"
    assert failed["id-3"]["error_type"] == "endpoint_error"
    server.clear_faults()
    server.reset_counters()
    assert batch_chat.main(argv(server, inp, out, "--resume")) == 0
    # The retryable failure and the 401 (fixed on the user's side) went again; the 400 did not.
    assert dict(server.attempts_by_key) == {"p 2": 1, "p 3": 1}
    assert sorted(r["custom_id"] for r in rows(out, "results")) == ["id-0", "id-2", "id-3", "id-4"]
    assert [r["custom_id"] for r in rows(out, "failures")] == ["id-1"]
    server.reset_counters()
    assert batch_chat.main(argv(server, inp, out, "--resume", "--retry_failed")) == 0
    assert dict(server.attempts_by_key) == {"p 1": 1}
    assert len(rows(out, "results")) == 5 and rows(out, "failures") == []


def test_output_in_use_needs_resume(server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 2)
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out)) == 0
    assert batch_chat.main(argv(server, inp, out)) == 2
    assert "add --resume" in capsys.readouterr().err


def test_compaction_keeps_each_id_once_and_ok_wins(tmp_path):
    out = str(tmp_path)
    res, fail = str(tmp_path / "results"), str(tmp_path / "failures")

    def ok(i):
        return ChatResult(f"x{i}", "ok", content=f"a{i}", attempts=1).to_row()

    write_parquet_atomic([ok(i) for i in range(10)], res, OUTPUT_SCHEMA)
    write_parquet_atomic([ok(i) for i in range(5, 15)], res, OUTPUT_SCHEMA)  # a retried bundle
    write_parquet_atomic([ChatResult.failure("x3", "deadline_exceeded", "late", retryable=True).to_row(),
                          ChatResult.failure("x99", "rejected", "no").to_row(),
                          ChatResult.failure("x99", "rejected", "no").to_row()], fail, OUTPUT_SCHEMA)
    kept = compact(out, rows_per_file=6)
    assert kept == {"results": 15, "failures": 1}
    got = rows(out, "results")
    assert sorted(r["custom_id"] for r in got) == sorted(f"x{i}" for i in range(15))
    assert [r["custom_id"] for r in rows(out, "failures")] == ["x99"]
    assert all(p.name.startswith("data-") for p in (tmp_path / "results").iterdir())
    assert compact(out) == kept  # idempotent


@pytest.mark.parametrize("flags, text", [(["--retry_failed"], "--retry_failed needs --resume")])
def test_resume_flag_checks(server, tmp_path, capsys, flags, text):
    inp = write_jsonl(tmp_path / "in.jsonl", 1)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"), *flags)) == 2
    assert text in capsys.readouterr().err


def test_an_old_buffer_is_written_while_no_row_arrives(server, tmp_path, monkeypatch):
    """A batch endpoint may hold requests for hours: rows answered before that wait must not
    sit in the writer's buffer until the next row (a kill then would lose them)."""
    from arkbatch_beam import _sink

    written = threading.Event()
    real_write = _sink.write_parquet_atomic

    def write(rows_, directory, schema):
        path = real_write(rows_, directory, schema)
        written.set()
        return path

    monkeypatch.setattr(_sink, "write_parquet_atomic", write)
    server.add_fault(Fault.hold(600, match="p 9"))  # the last prompt is held until released
    inp = write_jsonl(tmp_path / "in.jsonl", 10)
    out = str(tmp_path / "out")
    seen = {}

    def release_after_a_write():
        seen["written_while_held"] = written.wait(60)  # only the age limit can write these rows
        seen["rows"] = len(rows(out, "results"))
        server.release_holds()

    server.on_request(lambda total: total == 10 and threading.Thread(target=release_after_a_write).start())
    assert batch_chat.main(argv(server, inp, out, "--part_rows", "1000", "--part_seconds", "0.5",
                                "--max_concurrency", "16")) == 0
    assert seen["written_while_held"] and 1 <= seen["rows"] <= 9, seen
    assert len(rows(out, "results")) == 10
