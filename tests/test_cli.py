"""The CLI (python -m pipelines.batch_chat) and the demo, in-process and as a subprocess."""

import json
import os
import socket
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from arkbatch_beam._attempt import FILES_BESIDES_SOCKETS
from arkbatch_beam.testing import Fault
from pipelines import batch_chat, demo

from .conftest import KEY, KEY_ENV, write_jsonl


def argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-cli", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", "16", "--timeout", "60", *extra]


def read(out, kind):
    return ds.dataset(os.path.join(out, kind), format="parquet").to_table().to_pylist()


def test_cli_end_to_end(server, tmp_path, capsys):
    server.add_fault(Fault.rate_limited("0.1", match="p 2"))
    server.add_fault(Fault.bad_request("refused by policy", match="p 4"))
    inp = write_jsonl(tmp_path / "in.jsonl", 30, extra=["{broken", "a plain prompt"])
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out)) == 0
    ok, failed = read(out, "results"), read(out, "failures")
    assert len(ok) == 30 and len(failed) == 2
    ids = [r["custom_id"] for r in ok + failed]
    assert len(ids) == len(set(ids))
    assert {r["error_type"] for r in failed} == {"rejected", "invalid_json"}
    rejected = [r for r in failed if r["error_type"] == "rejected"][0]
    assert rejected["custom_id"] == "id-4" and rejected["error_message"] == "refused by policy"
    assert rejected["http_status"] == 400 and json.loads(rejected["request_json"])["custom_id"] == "id-4"
    summary_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary_line.startswith("summary: ok=30 failed=2 ")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["ok"], summary["requests"]) == (30, 31)  # the broken line is never sent
    # first send .. last answer, from the per-bundle marks: inside the wall time, never longer
    assert 0 < summary["sending_seconds"] <= summary["wall_seconds"]
    assert summary["sending_requests_per_second"] >= summary["requests_per_second"]
    assert f"(sending {summary['sending_seconds']:.1f}s at " in summary_line
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "flag, value, text",
    [("--max_concurrency", "0", "--max_concurrency must be in 1..10000"),
     ("--timeout", "999999", "--timeout must be in 1..259200"),
     ("--input_format", "xml", "--input_format must be one of"),
     ("--backoff_max", "0.1", "--backoff_max must be in"),
     ("--part_rows", "0", "--part_rows must be in 1..10000000"),
     ("--max_requests_per_second", "0", "--max_requests_per_second must be in 0.01..100000"),
     ("--max_attempts", "-1", "--max_attempts must be in 0..10000"),
     ("--min_attempt_seconds", "-1", "--min_attempt_seconds must be in 0..3600"),
     ("--tcp_keepalive_interval", "0", "--tcp_keepalive_interval must be in 1..600")],
)
def test_bad_options_fail_before_the_pipeline(server, tmp_path, capsys, flag, value, text):
    inp = write_jsonl(tmp_path / "in.jsonl", 1)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"), flag, value)) == 2
    assert text in capsys.readouterr().err
    assert server.total_requests == 0


def test_missing_key_fails_fast(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    inp = write_jsonl(tmp_path / "in.jsonl", 1)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"))) == 2
    assert f"{KEY_ENV} is not set" in capsys.readouterr().err


def test_wrong_path_fails_the_job_and_unreachable_endpoint_fails_fast(server, tmp_path, capsys, caplog):
    # A wrong path: the GET probe only warns (servers answer a GET on a POST path in many
    # ways); the workers then see nothing but 404s and stop the job instead of failing every row.
    inp = write_jsonl(tmp_path / "in.jsonl", 40)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"), "--path", "/nope")) == 1
    assert "answered HTTP 404" in capsys.readouterr().err
    assert any("answered 404 to a GET probe" in r.getMessage() for r in caplog.records)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    args = argv(server, inp, str(tmp_path / "o2"))
    args[args.index("--base_url") + 1] = f"http://127.0.0.1:{port}/api/v3"
    assert batch_chat.main(args) == 2
    assert "unreachable" in capsys.readouterr().err


def test_wrong_key_fails_the_job_instead_of_every_row(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    inp = write_jsonl(tmp_path / "in.jsonl", 40)
    rc = batch_chat.main(argv(server, inp, str(tmp_path / "o"), "--no_preflight"))
    err = capsys.readouterr().err
    assert rc == 1 and "answered HTTP 401" in err and "sk-wrong" not in err


def test_cli_as_a_subprocess_with_beam_options(server, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", 50)
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.batch_chat", *argv(server, inp, out),
         "--direct_num_workers=2", "--direct_running_mode=multi_threading"],
        capture_output=True, text=True, timeout=240, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "summary: ok=50 failed=0" in proc.stdout
    assert KEY not in proc.stdout + proc.stderr
    assert sorted(r["custom_id"] for r in read(out, "results")) == sorted(f"id-{i}" for i in range(50))


def test_demo_runs(tmp_path, capsys):
    assert demo.main(["--n", "200", "--output", str(tmp_path / "demo"), "--latency", "0"]) == 0
    text = capsys.readouterr().out
    assert "summary: ok=200 failed=2" in text and "results: 200 rows" in text


def test_parquet_input_with_prompt_and_id_columns(server, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "k": [f"row-{i}" for i in range(12)] + ["row-3", None],
        "q": [f"p {i}" for i in range(12)] + ["p 3 again", "no id given"],
    })
    table = pa.concat_tables([table, pa.table({"k": ["row-empty"], "q": pa.array([None], pa.string())})])
    pq.write_table(table, tmp_path / "prompts.parquet")
    out = str(tmp_path / "out")
    args = argv(server, str(tmp_path / "prompts.parquet"), out, "--prompt_column", "q", "--id_column", "k",
                "--system", "Be brief.", "--include_request")
    assert batch_chat.main(args) == 0
    ok = {r["custom_id"]: r for r in read(out, "results")}
    failed = {r["custom_id"]: r for r in read(out, "failures")}
    assert sorted(ok) == sorted([f"row-{i}" for i in range(12)] + [next(k for k in ok if k.startswith("h-"))])
    assert ok["row-5"]["content"] == "echo: p 5"
    assert set(failed) == {"row-3", "row-empty"}  # the second row-3, and a null prompt
    assert failed["row-3"]["error_type"] == "duplicate_custom_id"
    dup = json.loads(failed["row-3"]["request_json"])["messages"][-1]["content"]
    assert {ok["row-3"]["content"], "echo: " + dup} == {"echo: p 3", "echo: p 3 again"}  # one sent, one kept
    assert failed["row-empty"]["error_type"] in {"invalid_input", "no_messages"}
    assert server.total_requests == 13
    body = json.loads(ok["row-5"]["request_json"])
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p 5"}]
    assert "summary: ok=13 failed=1 " in capsys.readouterr().out  # per id: row-3 was answered


def test_parquet_input_bad_column_and_missing_input_fail_fast(server, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "in.parquet")
    assert batch_chat.main(argv(server, str(tmp_path / "in.parquet"), str(tmp_path / "o"))) == 2
    assert "--prompt_column 'prompt' is not a column of" in capsys.readouterr().err
    assert batch_chat.main(argv(server, str(tmp_path / "nothing-*.jsonl"), str(tmp_path / "o"))) == 2
    assert "matches no file" in capsys.readouterr().err
    assert server.total_requests == 0


def test_no_dedupe_streams_and_still_leaves_one_row_per_id(server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 20, extra=[json.dumps(
        {"custom_id": "id-3", "body": {"messages": [{"role": "user", "content": "p 3"}]}})])
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out, "--no_dedupe")) == 0
    assert server.attempts_by_key["p 3"] == 2  # no shuffle by id: the repeated id was sent again
    ok = read(out, "results")
    assert sorted(r["custom_id"] for r in ok) == sorted(f"id-{i}" for i in range(20))  # compaction: one each
    assert batch_chat.main(argv(server, inp, out, "--no_dedupe", "--resume")) == 2
    assert "--resume needs the dedupe shuffle" in capsys.readouterr().err


def test_bad_bytes_and_a_bom_never_fail_the_job(server, tmp_path):
    good = json.dumps({"custom_id": "bom-1", "body": {"messages": [{"role": "user", "content": "p 1"}]}})
    latin1 = '{"custom_id": "lat-2", "body": {"messages": [{"role": "user", "content": "caf\xe9"}]}}'
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + latin1.encode("latin-1") + b"\n")
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, str(tmp_path / "in.jsonl"), out)) == 0
    ok = {r["custom_id"]: r for r in read(out, "results")}
    assert ok["bom-1"]["content"] == "echo: p 1"  # the byte-order mark did not hide the id
    assert "lat-2" not in ok and server.total_requests == 1  # a Latin-1 byte: never sent as "caf?"
    (bad,) = read(out, "failures")
    assert bad["error_type"] == "invalid_encoding"


def test_text_input_without_model_fails_fast(server, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hello\n")
    args = argv(server, str(tmp_path / "p.txt"), str(tmp_path / "o"), "--input_format", "text")
    args[args.index("--model"):args.index("--model") + 2] = []
    assert batch_chat.main(args) == 2
    assert "--model is needed with plain-text input" in capsys.readouterr().err


def test_chat_jsonl_without_model_fails_fast_naming_the_flag(server, tmp_path, capsys):
    # Before: the job ran every line into an invalid_request row and exited 0.
    inp = write_jsonl(tmp_path / "in.jsonl", 30, extra=["{broken"])
    args = argv(server, inp, str(tmp_path / "o"))
    args[args.index("--model"):args.index("--model") + 2] = []
    assert batch_chat.main(args) == 2
    err = capsys.readouterr().err
    assert "name no model" in err and "--model" in err
    assert server.total_requests == 0 and not (tmp_path / "o").exists()


def test_the_summary_counts_ids_and_names_the_top_failure_reasons(server, tmp_path, capsys):
    for i in (1, 2):
        server.add_fault(Fault.bad_request("refused by policy", match=f"p {i}"))
    inp = write_jsonl(tmp_path / "in.jsonl", 10, extra=["{broken"])
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out, "--no_compact")) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("summary: ok=8 failed=3 (rejected 2, invalid_json 1) wall="), line
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["failures_by_type"] == {"rejected": 2, "invalid_json": 1}
    assert summary["rows_written_ok"] == 8 and summary["rows_written_failed"] == 3


def test_input_encoding_decodes_a_gbk_file(server, tmp_path, capsys):
    line = json.dumps({"custom_id": "zh-1", "body": {"messages": [{"role": "user", "content": "十字花科植物"}]}},
                      ensure_ascii=False)
    (tmp_path / "in.jsonl").write_bytes(line.encode("gbk") + b"\n")
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, str(tmp_path / "in.jsonl"), out, "--input_encoding", "gbk")) == 0
    (row,) = read(out, "results")
    assert row["custom_id"] == "zh-1" and row["content"] == "echo: 十字花科植物"
    assert batch_chat.main(argv(server, str(tmp_path / "in.jsonl"), str(tmp_path / "o2"),
                                "--input_encoding", "no-such-codec")) == 2
    assert "--input_encoding" in capsys.readouterr().err


@pytest.mark.parametrize(("typo", "meant"), [("--max_concurency", "--max_concurrency"),
                                             ("--direct_num_worker", "--direct_num_workers"),
                                             ("--part_row", "--part_rows")])
def test_a_mistyped_flag_fails_fast_with_did_you_mean(server, tmp_path, capsys, typo, meant):
    # Before: Beam warned "Discarding unparseable args" and the job ran at the default (500).
    inp = write_jsonl(tmp_path / "in.jsonl", 3)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"), typo, "10")) == 2
    assert f"error: unknown option {typo}: did you mean {meant}?" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and server.total_requests == 0


def test_help_shows_every_default_and_unit(capsys):
    with pytest.raises(SystemExit):
        batch_chat.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--max_concurrency", "1..10000; default 500", "1..259200 s; default 86400",
                  "--part_rows", "--tcp_keepalive_idle", "(0: off)", "--resume"):
        assert piece in text, piece


def test_a_worker_process_error_reaches_the_user_as_its_message(server, tmp_path):
    # Before: multi_processing printed "error: raise EndpointUnusable(self._rt.fatal)", a source line.
    inp = write_jsonl(tmp_path / "in.jsonl", 40)
    env = {**os.environ, KEY_ENV: KEY}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.batch_chat", *argv(server, inp, str(tmp_path / "o"), "--path", "/nope",
                                                             "--no_preflight", "--progress_seconds", "0"),
         "--direct_running_mode", "multi_processing", "--direct_num_workers", "1"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert last.startswith("error: the endpoint ") and "answered HTTP 404" in last, last
    assert "raise " not in last and "while running" not in last


def _hard_open_file_limit_300():
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))


def test_a_cap_above_the_open_file_limit_fails_fast_before_sending(server, tmp_path):
    # Before: a warning, then a job whose sockets run out mid-way (each one a retried error).
    inp = write_jsonl(tmp_path / "in.jsonl", 3)
    args = argv(server, inp, str(tmp_path / "o"))
    args[args.index("--max_concurrency") + 1] = "1000"
    proc = subprocess.run([sys.executable, "-m", "pipelines.batch_chat", *args], capture_output=True, text=True,
                          env={**os.environ, KEY_ENV: KEY}, timeout=240, preexec_fn=_hard_open_file_limit_300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    fits = 300 - FILES_BESIDES_SOCKETS
    assert f"error: --max_concurrency must be at most {fits} here" in proc.stderr and "ulimit -Hn" in proc.stderr
    assert server.total_requests == 0 and not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("args, local", [
    ([], True), (["--runner=direct"], True), (["--runner", "DirectRunner"], True), (["--runner=prism"], True),
    (["--runner=PrismRunner"], True), (["--runner=DataflowRunner"], False), (["--runner", "flink"], False),
])
def test_runs_here_reads_the_runner_as_beam_does(args, local):
    # Before: only the spelled-out class names counted, so --runner=direct or prism (which Beam
    # accepts) skipped the launcher's checks of the key and the open-file limit.
    import types

    assert batch_chat.runs_here(types.SimpleNamespace(beam_args=tuple(args))) is local
