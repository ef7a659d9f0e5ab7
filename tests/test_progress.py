"""Progress lines: each worker process's runtime logs done/ok/failed/in flight/rate, and % + ETA
when the job's size is known (the CLI counts the inputs for in-process runners)."""

import asyncio
import logging
import os
import subprocess
import sys

import pytest

from arkbatch_beam import ChatRequest, ClientConfig, Endpoint, JobProgress, _runtime
from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY_ENV, write_jsonl


def _req(i):
    return ChatRequest(f"id-{i}", {"messages": [{"role": "user", "content": f"p {i}"}]})


def _line(rt):
    return asyncio.run_coroutine_threadsafe(_async(rt._progress.line), rt.loop).result(10)


async def _async(fn):
    return fn()


def test_progress_line_counts_and_eta(server):
    server.add_fault(Fault.bad_request("no", match="p 3"))
    cfg = ClientConfig(Endpoint("ep-p", base_url=server.base_url, api_key_env=KEY_ENV), max_concurrency=4,
                       progress_seconds=3600)
    progress = JobProgress()
    progress.set_total(20)
    progress.add_skipped(1)  # a blank line: no row
    progress.add_failed(1)  # a bad input line: a failure row, never sent
    rt = _runtime.acquire(cfg)
    rt.progress = progress  # what InferDoFn does for its job
    try:
        for fut in [rt.submit(_req(i)) for i in range(9)]:
            fut.result(10)
        line = _line(rt)
    finally:
        _runtime.release(rt)
    # The bad line counts as failed (as in the summary): 10 of 19 rows done.
    assert "done=10 ok=8 failed=2 in_flight=0 queued=0 waiting_to_retry=0 attempts=9 " in line
    assert " of~19 (52.6%) eta=" in line  # 20 lines - 1 blank = 19 rows
    assert "paused" not in line


def test_progress_seconds_is_validated():
    ep = Endpoint("ep")
    assert ClientConfig(ep, progress_seconds=0).progress_seconds == 0
    with pytest.raises(ValueError, match=r"progress_seconds must be in 1..86400 s \(or 0: off\), got 0.5"):
        ClientConfig(ep, progress_seconds=0.5)


def test_cli_logs_progress_and_counts_the_inputs(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="arkbatch_beam")
    inp = write_jsonl(tmp_path / "in.jsonl", 25, extra=["{broken"])
    args = batch_chat.build_parser().parse_args(["--input", inp, "--output", str(tmp_path / "o")])
    files = batch_chat.check_input(args)
    assert batch_chat.count_inputs(args, files) == 26
    (tmp_path / "nonl.txt").write_text("a\nb\nc")  # no newline at the end
    args.input = str(tmp_path / "nonl.txt")
    assert batch_chat.count_inputs(args, batch_chat.check_input(args)) == 3
    rc = batch_chat.main(["--input", inp, "--output", str(tmp_path / "out"), "--model", "ep-cli", "--base_url",
                          server.base_url, "--api_key_env", KEY_ENV, "--max_concurrency", "4", "--timeout", "60"])
    assert rc == 0
    final = [r.getMessage() for r in caplog.records if "arkbatch progress" in r.getMessage()]
    assert final and final[-1].endswith("(final)"), final
    assert "done=26 ok=25 failed=1" in final[-1]  # the bad line counts, as in the summary


def test_a_request_backing_off_does_not_hold_a_worker(server):
    """max_concurrency=2 and the first two requests both sleep 2 s before a retry: the others
    still go through meanwhile (a retry waits on a loop timer, not in a worker)."""
    import queue

    from arkbatch_beam import Backoff

    for i in range(2):  # each slow prompt fails once, with no Retry-After: a 2 s backoff
        server.add_fault(Fault.server_error(500, match=f"slow {i}"))
    cfg = ClientConfig(Endpoint("ep-p", base_url=server.base_url, api_key_env=KEY_ENV), max_concurrency=2,
                       backoff=Backoff(initial=2.0, jitter=0.0), progress_seconds=0)
    slow = [ChatRequest(f"s{i}", {"messages": [{"role": "user", "content": f"slow {i}"}]}) for i in range(2)]
    fast = [_req(i) for i in range(10)]
    got: queue.SimpleQueue = queue.SimpleQueue()
    rt = _runtime.acquire(cfg)
    try:
        rt.submit_batch([(r, r.custom_id) for r in slow + fast], got.put)
        done: dict[str, object] = {}
        while not all(r.custom_id in done for r in fast):
            done.update(got.get(timeout=30))
        assert not any(r.custom_id in done for r in slow)  # still sleeping: they held no worker
        while len(done) < 12:
            done.update(got.get(timeout=30))
    finally:
        _runtime.release(rt)
    assert all(done[r.custom_id].ok for r in slow + fast)
    assert server.attempts_by_key["slow 0"] == server.attempts_by_key["slow 1"] == 2
    assert server.peak_in_flight <= 2


def _cli(server, tmp_path, *extra):
    tmp_path.mkdir(exist_ok=True)
    inp = write_jsonl(tmp_path / "in.jsonl", 60, extra=["{broken"])
    return [sys.executable, "-m", "pipelines.batch_chat", "--input", inp, "--output", str(tmp_path / "out"),
            "--model", "ep-bar", "--base_url", server.base_url, "--api_key_env", KEY_ENV,
            "--max_concurrency", "8", "--timeout", "60", *extra]


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_progress_bar_in_a_pseudo_terminal(server, tmp_path):
    """On a terminal: a tqdm bar with done/total, ok/failed and rates, instead of the plain lines."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen(_cli(server, tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=follower, cwd=_root(), env={**os.environ})
    os.close(follower)
    screen = b""
    while True:  # until the child closes the terminal
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer is gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")[-2000:]
    text = screen.decode(errors="replace")
    last = text.replace("\r\n", "\r").split("\r")
    final = [s for s in last if "61/61" in s]
    assert final, text[-2000:]
    assert "arkbatch: 100%|" in final[-1] and "req/s]" in final[-1]
    assert "ok=60 failed=1 in_flight=0" in final[-1] and "tok/s=" in final[-1]  # the bad line counts
    assert "arkbatch progress (pid" not in text  # the bar replaces the plain lines
    assert "summary: ok=60 failed=1" in stdout


def test_plain_lines_when_not_a_terminal_and_quiet_shows_neither(server, tmp_path):
    proc = subprocess.run(_cli(server, tmp_path, "--progress_seconds", "1"), capture_output=True, text=True,
                          timeout=240, cwd=_root(), env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [s for s in proc.stderr.splitlines() if "arkbatch progress (pid" in s]
    assert lines and lines[-1].endswith("(final)") and "done=61 ok=60 failed=1 " in lines[-1]
    assert "%|" not in proc.stderr and "\r" not in proc.stderr
    quiet = subprocess.run(_cli(server, tmp_path / "q", "--quiet", "--log_level", "WARNING"),
                           capture_output=True, text=True, timeout=240, cwd=_root(), env={**os.environ})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "arkbatch progress" not in quiet.stderr and "%|" not in quiet.stderr
    assert "INFO" not in quiet.stderr and "summary: ok=60 failed=1" in quiet.stdout



def test_a_runtime_rebuilt_mid_job_adds_to_the_totals_never_replaces_them(server):
    # A worker's runtime may be closed and rebuilt within one job (a failed bundle's teardown, a
    # dead loop). Before: figures were keyed by id(runtime), which CPython hands out again once
    # the old one is collected, so the new runtime's figures overwrote the old one's (whether
    # it does depends on the allocator: this test guards the sum, it could not force a reuse).
    import gc

    cfg = ClientConfig(Endpoint("ep-p", base_url=server.base_url, api_key_env=KEY_ENV), max_concurrency=4,
                       progress_seconds=0)
    progress = JobProgress()
    for n in (3, 2, 4):
        rt = _runtime.acquire(cfg)
        rt.progress = progress
        try:
            for fut in [rt.submit(_req(i)) for i in range(n)]:
                assert fut.result(10).ok
        finally:
            _runtime.release(rt)  # closes it: its last figures are published
        del rt, fut
        gc.collect()
    assert progress.counts().ok == 9
