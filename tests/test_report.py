import json

from arkbatch_beam import OUTPUT_SCHEMA, ChatResult
from arkbatch_beam._sink import write_parquet_atomic
from arkbatch_beam.report import main, summarize


def make_output(tmp_path):
    out = str(tmp_path)
    ok = [ChatResult(f"a{i}", "ok", prompt_tokens=10, completion_tokens=5, total_tokens=15,
                     cached_tokens=2, attempts=1 + (i % 2), latency_ms=float(i)).to_row() for i in range(100)]
    write_parquet_atomic(ok[:60], out + "/results", OUTPUT_SCHEMA)
    write_parquet_atomic(ok[60:], out + "/results", OUTPUT_SCHEMA)
    bad = [ChatResult.failure("b1", "rejected", "policy", http_status=400).to_row(),
           ChatResult.failure("b2", "deadline_exceeded", "late", retryable=True, http_status=429).to_row(),
           ChatResult.failure("b3", "rejected", "policy", http_status=400).to_row()]
    write_parquet_atomic(bad, out + "/failures", OUTPUT_SCHEMA)
    return out


def test_summary_figures(tmp_path):
    s = summarize(make_output(tmp_path))
    assert (s["rows"], s["ok"], s["failed"], s["failed_retryable"], s["files"]) == (103, 100, 3, 1, 3)
    assert s["tokens"]["prompt_tokens"] == 1000 and s["tokens"]["cached_tokens"] == 200
    assert s["failures_by_type"] == {"rejected": 2, "deadline_exceeded": 1}
    assert s["failures_by_http_status"] == {"400": 2, "429": 1}
    assert s["top_failure_messages"][0] == {"error_type": "rejected", "message": "policy", "count": 2}
    assert s["latency_ms"]["p50"] == 50.0 and s["latency_ms"]["max"] == 99.0
    assert s["attempts"] == {"1": 50, "2": 50}


def test_cli_text_and_json(tmp_path, capsys):
    out = make_output(tmp_path)
    assert main([out]) == 0
    text = capsys.readouterr().out
    assert "ok 100  failed 3" in text and "re-run with --resume" in text
    assert main([out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 100
    assert main([str(tmp_path / "empty")]) == 2


def test_counts_are_per_id_and_rows_written_apart(tmp_path):
    # A bundle retry wrote "a" twice; "b" failed on a first run and was answered on --resume;
    # "c" failed twice (two runs); "d" is an extra input line reusing an id.
    out = str(tmp_path)
    write_parquet_atomic([ChatResult("a", "ok", prompt_tokens=10, attempts=1).to_row(),
                          ChatResult("b", "ok", prompt_tokens=7, attempts=1).to_row()], out + "/results", OUTPUT_SCHEMA)
    write_parquet_atomic([ChatResult("a", "ok", prompt_tokens=10, attempts=1).to_row()], out + "/results",
                         OUTPUT_SCHEMA)
    write_parquet_atomic([ChatResult.failure("b", "deadline_exceeded", "late", retryable=True).to_row(),
                          ChatResult.failure("c", "rejected", "policy", http_status=400).to_row(),
                          ChatResult.failure("c", "rejected", "policy", http_status=400).to_row(),
                          ChatResult.failure("d", "duplicate_custom_id", "again").to_row()],
                         out + "/failures", OUTPUT_SCHEMA)
    s = summarize(out)
    assert (s["ids"], s["ok"], s["failed"], s["duplicate_rows"]) == (3, 2, 1, 1)
    assert s["tokens"]["prompt_tokens"] == 17  # "a" once
    assert s["failures_by_type"] == {"rejected": 1} and s["failed_retryable"] == 0
    assert s["rows_written"] == {"results": 3, "failures": 4} and s["rows"] == 7


def test_copies_in_many_files_count_once_with_their_tokens(tmp_path):
    out = str(tmp_path)
    for f in range(6):  # every id written by three files (bundle retries, a resumed run)
        write_parquet_atomic([ChatResult(f"a{i}", "ok", prompt_tokens=i, attempts=1 + f % 2,
                                         latency_ms=float(i)).to_row() for i in range(f % 3, 30, 3)],
                             out + "/results", OUTPUT_SCHEMA)
    write_parquet_atomic([ChatResult.failure(f"a{i}", "deadline_exceeded", "late", retryable=True).to_row()
                          for i in range(10)] + [ChatResult.failure("z", "rejected", "no").to_row()] * 3,
                         out + "/failures", OUTPUT_SCHEMA)
    s = summarize(out)
    assert (s["ok"], s["failed"], s["ids"]) == (30, 1, 31)
    assert s["tokens"]["prompt_tokens"] == sum(range(30))
    assert s["rows_written"] == {"results": 60, "failures": 13} and s["files"] == 7
    assert s["failures_by_type"] == {"rejected": 1} and s["failed_retryable"] == 0
    assert sum(s["attempts"].values()) == 30 and s["latency_ms"]["max"] == 29.0


def test_progress_lines_while_it_reads(tmp_path):
    import io

    out = make_output(tmp_path)
    stream = io.StringIO()
    summarize(out, progress_seconds=1e-9, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("report: ") for line in lines)
    assert "results 2/2 files, 100 rows" in lines[1] and "failures 1/1 files, 3 rows" in lines[-1]


def test_the_id_set_merges_its_recent_ids(tmp_path, monkeypatch):
    from arkbatch_beam import report

    monkeypatch.setattr(report._SeenIds, "RECENT", 4)  # merge into the sorted array every 4 ids
    test_copies_in_many_files_count_once_with_their_tokens(tmp_path)
