"""The CLI (python -m pipelines.batch_chat) and the demo, in-process and as a subprocess."""

import json
import os
import socket
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

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
    assert json.load(open(os.path.join(out, "summary.json")))["ok"] == 30
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "flag, value, text",
    [("--max_concurrency", "0", "--max_concurrency must be in 1..10000"),
     ("--timeout", "999999", "--timeout must be in 1..259200"),
     ("--input_format", "xml", "--input_format must be one of"),
     ("--backoff_max", "0.1", "--backoff_max must be in"),
     ("--part_rows", "0", "--part_rows must be in 1..10000000")],
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


def test_wrong_path_and_unreachable_endpoint_fail_fast(server, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", 3)
    assert batch_chat.main(argv(server, inp, str(tmp_path / "o"), "--path", "/nope")) == 2
    assert "answered 404" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    args = argv(server, inp, str(tmp_path / "o"))
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
