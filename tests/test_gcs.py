"""gs:// input and output through Beam's FileSystems, against a real GCS emulator on 127.0.0.1.

The emulator (``gcp-storage-emulator``, a test extra) runs as a subprocess, in memory, with one
bucket made at start. ``STORAGE_EMULATOR_HOST`` sends google-cloud-storage (which Beam's
``GcsIO`` uses) there, with anonymous credentials. Credential look-up: Beam's ``GcsIO`` always
asks ``google.auth.default()`` first, retrying 4 times with backoff (~20-30 s) when nothing is
found, and caches the answer per process; so the fixture seeds that cache with "none found"
(what Beam itself concludes after its retries: connect anonymously). The pipelines here run on
the in-process DirectRunner, so the cache covers every GCS call, and nothing leaves 127.0.0.1
(a developer's own ADC is never used either).
"""

import io
import json
import socket
import subprocess
import sys
import time

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from arkbatch_beam import BatchChatInference, Endpoint, WriteResults
from arkbatch_beam._sink import compact
from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY, KEY_ENV

pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator is a test extra: pip install -e .[test]")

BUCKET = "arkbatch-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on 127.0.0.1 holding the bucket ``BUCKET``; yields ``gs://BUCKET``."""
    from apache_beam.internal.gcp import auth

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--default-bucket", BUCKET, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # poll until the port accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"GCS emulator did not start: {proc.stderr.read().decode()[-2000:]}") from None
                try:  # also notices an emulator that died at start
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            mp.setenv("GOOGLE_CLOUD_PROJECT", "arkbatch-test")
            # Beam's per-process credential cache: "looked up, none found" -> anonymous client.
            mp.setattr(auth._Credentials, "_credentials_init", True)
            mp.setattr(auth._Credentials, "_credentials", None)
            yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def put(path, text):
    with FileSystems.create(path) as f:
        f.write(text.encode())


def jsonl(ids, extra=()):
    lines = [json.dumps({"custom_id": f"id-{i}", "body": {"messages": [{"role": "user", "content": f"p {i}"}]}})
             for i in ids]
    return "\n".join([*lines, *extra]) + "\n"


def listing(prefix):
    """Every object under ``prefix`` (a gs:// folder), as paths relative to it."""
    found = FileSystems.match([prefix + "/**"])[0].metadata_list
    return sorted(m.path[len(prefix) + 1:] for m in found)


def read_rows(folder):
    """All rows of the visible Parquet files in a gs:// folder, read through FileSystems."""
    rows = []
    for m in FileSystems.match([folder + "/*.parquet"])[0].metadata_list:
        with FileSystems.open(m.path) as f:
            rows += pq.read_table(io.BytesIO(f.read())).to_pylist()
    return sorted(rows, key=lambda r: r["custom_id"])


def argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-gcs", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", "8", "--timeout", "60", "--part_rows", "7", *extra]


def test_cli_reads_and_writes_gs_and_resumes_there(gcs, server, capsys):
    root = f"{gcs}/job1"
    put(f"{root}/in/a.jsonl", jsonl(range(40), extra=["{broken"]))
    put(f"{root}/in/b.jsonl", jsonl(range(40, 60)))
    out = f"{root}/out/"  # a trailing slash is fine
    server.add_fault(Fault.rate_limited("0.1", match="p 2"))
    server.add_fault(Fault.bad_request("refused by policy", match="p 4"))

    # Run 1: the first file only -> 39 answers, 2 failures, in compacted files on gs://.
    assert batch_chat.main(argv(server, f"{root}/in/a.jsonl", out)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: ok=39 failed=2 ")
    objects = listing(f"{root}/out")
    assert "summary.json" in objects
    assert not [o for o in objects if "/.tmp-" in o], objects  # every part was renamed when complete
    # The parts were merged by the parallel compaction into one bucket's files per kind on gs://
    # (data-<buckets>-<bucket>-<run>-<k>), and the parts deleted.
    assert [o.split("-")[0] for o in objects] == ["failures/data", "results/data", "summary.json"], objects
    ok = read_rows(f"{root}/out/results")
    assert [r["custom_id"] for r in ok] == sorted(f"id-{i}" for i in range(40) if i != 4)
    for r in ok:  # row by row
        i = int(r["custom_id"].split("-")[1])
        assert (r["status"], r["content"], r["model"], r["finish_reason"]) == ("ok", f"echo: p {i}", "ep-gcs", "stop")
        assert r["attempts"] == (2 if i == 2 else 1) and r["error_type"] is None and r["total_tokens"] > 0
    failed = {r["error_type"]: r for r in read_rows(f"{root}/out/failures")}
    assert set(failed) == {"rejected", "invalid_json"}
    assert failed["rejected"]["custom_id"] == "id-4" and failed["rejected"]["http_status"] == 400
    assert failed["rejected"]["error_message"] == "refused by policy"
    assert failed["invalid_json"]["request_json"] == "{broken" and failed["invalid_json"]["attempts"] == 0
    with FileSystems.open(f"{root}/out/summary.json") as f:
        summary = json.load(f)
    assert (summary["ok"], summary["failed"], summary["output"]) == (39, 2, f"{root}/out")

    # The output holds results: a second run needs --resume.
    assert batch_chat.main(argv(server, f"{root}/in/a.jsonl", out)) == 2
    assert "add --resume" in capsys.readouterr().err

    # Run 2: both files with --resume -> only the 20 new prompts are sent.
    server.reset_counters()
    assert batch_chat.main(argv(server, f"{root}/in/*.jsonl", out, "--resume")) == 0
    assert dict(server.attempts_by_key) == {f"p {i}": 1 for i in range(40, 60)}
    ok = read_rows(f"{root}/out/results")
    assert [r["custom_id"] for r in ok] == sorted(f"id-{i}" for i in range(60) if i != 4)
    assert all(r["content"] == f"echo: p {r['custom_id'].split('-')[1]}" for r in ok)
    assert sorted(r["error_type"] for r in read_rows(f"{root}/out/failures")) == ["invalid_json", "rejected"]

    # Run 3: nothing left to do -> nothing is sent.
    server.reset_counters()
    assert batch_chat.main(argv(server, f"{root}/in/*.jsonl", out, "--resume")) == 0
    assert server.total_requests == 0
    # The summary tells the whole output's state per id; the rejected id is final, the broken line is
    # checked again (a fixed line would be sent); nothing was paid for.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("summary: ok=59 failed=2 (invalid_json 1, rejected 1) ") and " skipped=60 " in last
    for path in listing(f"{root}/out"):
        with FileSystems.open(f"{root}/out/{path}") as f:
            assert KEY.encode() not in f.read(), path


def test_transform_api_on_gs(gcs, server):
    """The library API as a user writes it: ReadFromText(gs://) | BatchChatInference | WriteResults(gs://)."""
    root = f"{gcs}/job2"
    put(f"{root}/prompts.jsonl", jsonl(range(25)))
    ep = Endpoint("ep-lib", base_url=server.base_url, api_key_env=KEY_ENV)
    for resume in (None, f"{root}/out"):
        with beam.Pipeline() as p:
            _ = (p | beam.io.ReadFromText(f"{root}/prompts.jsonl")
                 | BatchChatInference(ep, max_concurrency=4, resume_from=resume)
                 | WriteResults(f"{root}/out", max_rows=10))
    assert server.total_requests == 25  # the resumed run sent nothing
    assert compact(f"{root}/out") == {"results": 25, "failures": 0}
    rows = read_rows(f"{root}/out/results")
    assert [(r["custom_id"], r["content"]) for r in rows] == sorted((f"id-{i}", f"echo: p {i}") for i in range(25))
