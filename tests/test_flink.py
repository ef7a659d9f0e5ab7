"""The CLI pipeline on Beam's portable FlinkRunner with an embedded Flink (``--flink_master=[local]``).

The job server comes from Maven Central through ``scripts/fetch_flink_jar.sh`` (cached outside
the repo; set ``ARKBATCH_FLINK_JAR`` to use a jar you already have, otherwise the ``flink``
fixture runs the script). The tests skip only when java or mvn is missing.

* LOOPBACK: the SDK worker runs inside this process.
* EXTERNAL: a Beam Python worker pool started here (``worker_pool_main``) starts one process per
  SDK worker; with ``--parallelism=2`` the two inference subtasks run in two worker processes,
  each with its own shared runtime and its own ``max_concurrency`` cap.
"""

import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pyarrow.dataset as ds
import pytest

from arkbatch_beam.testing import FakeArkServer, Fault
from pipelines import batch_chat

from .conftest import KEY, KEY_ENV, write_jsonl

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
N = 200


# --execution_mode_for_batch=BATCH_FORCED (a Java FlinkPipelineOptions flag, declared by the CLI's
# FlinkJavaOptions so it travels with the pipeline) makes every exchange blocking, so Flink starts a
# stage only when its inputs are complete: the two inference subtasks are then the only stages
# opening in the job's SDK-worker context, take consecutive round-robin slots and so land in two
# different worker processes. (With the default PIPELINED mode every stage opens at once and the
# slot order is a race: about one run in eight put both inference subtasks into one process.
# --load_balance_bundles is no way out in batch: each stage holds a worker for its whole input, so
# downstream stages that are already waiting for input take every worker and the read stage never
# gets one: a deadlock.)


def _runner_hung_up(exc):
    """The job server cancelling the data stream of an SDK worker: ``CANCELLED: Multiplexer hanging up``."""
    while exc is not None:
        if (isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None))
                and exc.code() == grpc.StatusCode.CANCELLED and "Multiplexer hanging up" in (exc.details() or "")):
            return True
        exc = exc.__cause__
    return False


@pytest.fixture(scope="module", autouse=True)
def _tolerate_runner_hang_up():
    """Let one known shutdown race through, and only that one.

    When the job server hangs up the data stream of the in-process (LOOPBACK) SDK worker at the
    end of a job that has already succeeded, the worker's ``read_grpc_client_inputs`` thread and
    then its ``run_worker_<id>`` thread raise that CANCELLED error (apache/beam#22643; in about
    one run in six here), which pytest turns into an error. A reader failing mid-job fails the job
    itself, so nothing is lost by dropping exactly this error; every other thread exception
    still reaches pytest.
    """
    previous = threading.excepthook

    def hook(args):
        if not _runner_hung_up(args.exc_value):
            previous(args)

    threading.excepthook = hook
    yield
    threading.excepthook = previous


@pytest.fixture(scope="module")
def flink():
    """``(job server jar, flink version)``, fetching the jar into the cache when needed."""
    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("java and mvn are needed to fetch and run Beam's Flink job server")
    jar = os.environ.get("ARKBATCH_FLINK_JAR")
    if not jar or not os.path.isfile(jar):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_flink_jar.sh")], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
        if proc.returncode != 0:
            pytest.fail(f"no Flink job server: scripts/fetch_flink_jar.sh exited {proc.returncode}:\n"
                        f"{proc.stderr[-3000:]}")
        jar = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"beam-runners-flink-(\d+\.\d+)-job-server", os.path.basename(jar))
    assert m, f"cannot tell the Flink version from {jar}"
    return jar, m.group(1)


def argv(server, inp, out, flink, *extra, cap):
    jar, version = flink
    return ["--input", inp, "--output", out, "--model", "ep-flink", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", str(cap), "--timeout", "60", "--part_rows", "50",
            "--runner=FlinkRunner", "--flink_master=[local]", f"--flink_version={version}",
            f"--flink_job_server_jar={jar}", *extra]


def read(out, kind):
    return sorted(ds.dataset(os.path.join(out, kind), format="parquet").to_table().to_pylist(),
                  key=lambda r: int(r["custom_id"].split("-")[1]))


def check_rows(out, *, rejected=None):
    """Every prompt has exactly one row, answered or failed as scripted."""
    ok = read(out, "results")
    want = [i for i in range(N) if i != rejected]
    assert [r["custom_id"] for r in ok] == [f"id-{i}" for i in want]
    for i, r in zip(want, ok, strict=True):
        assert (r["status"], r["content"], r["model"], r["error_type"]) == ("ok", f"echo: p {i}", "ep-flink", None)
        assert r["attempts"] >= 1 and r["total_tokens"] > 0 and r["request_id"]
    return ok


def test_flink_loopback(server, tmp_path, flink, capsys):
    server.latency = 0.01
    server.add_fault(Fault.rate_limited("0.2", match="p 7"))
    server.add_fault(Fault.bad_request("refused by policy", match="p 9"))
    inp = write_jsonl(tmp_path / "in.jsonl", N, extra=["{broken"])
    out = str(tmp_path / "out")
    started = time.monotonic()
    assert batch_chat.main(argv(server, inp, out, flink, "--environment_type=LOOPBACK", cap=8)) == 0
    ok = check_rows(out, rejected=9)
    assert next(r for r in ok if r["custom_id"] == "id-7")["attempts"] == 2
    failed = sorted(read_failures(out), key=lambda r: r["error_type"])
    assert [(r["error_type"], r["custom_id"] if r["attempts"] else None) for r in failed] == [
        ("invalid_json", None), ("rejected", "id-9")]
    assert failed[1]["http_status"] == 400 and failed[1]["error_message"] == "refused by policy"
    assert server.peak_in_flight <= 8
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["ok"], summary["failed"]) == (N - 1, 2)  # Flink reports the metrics back
    assert KEY not in capsys.readouterr().out
    print(f"flink loopback: {time.monotonic() - started:.1f}s")


def read_failures(out):
    return ds.dataset(os.path.join(out, "failures"), format="parquet").to_table().to_pylist()


def _connections(proc):
    """``proc``'s TCP connections (psutil >= 6 renamed ``connections`` to ``net_connections``)."""
    get = getattr(proc, "net_connections", None) or proc.connections
    return get("tcp")


class PerProcessServer(FakeArkServer):
    """The fake server, also counting requests in flight per client *process*.

    Each new client connection is mapped to the process holding its socket, looked up among
    the worker pool's descendants (``pool_pid``); a sender outside the pool counts under
    ``None``. Everything is updated in the server thread under the server's lock.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pool_pid: int | None = None
        self.worker_ids: dict[int, str] = {}  # pid -> the SDK worker id on its command line
        self.in_flight_by_pid: collections.Counter = collections.Counter()
        self.peak_by_pid: collections.Counter = collections.Counter()
        self.requests_by_pid: collections.Counter = collections.Counter()
        self.runtimes_by_pid: collections.defaultdict = collections.defaultdict(set)  # X-Client-Request-Id prefixes
        self._pid_of_port: dict[int, int | None] = {}

    def _pid_of(self, port):
        if port in self._pid_of_port:
            return self._pid_of_port[port]
        found = None
        procs = psutil.Process(self.pool_pid).children(recursive=True) if self.pool_pid else []
        for proc in procs:
            try:
                if any(c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == self.port
                       for c in _connections(proc)):
                    found = proc.pid
                    m = re.search(r'worker_id="([^"]+)"', " ".join(proc.cmdline()))
                    self.worker_ids[found] = m.group(1) if m else "?"
                    break
            except psutil.Error:
                continue
        self._pid_of_port[port] = found
        return found

    async def _handle(self, request):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        pid = self._pid_of(peer[1]) if peer else None
        runtime = request.headers.get("X-Client-Request-Id", "").rsplit("-", 1)[0]
        with self._lock:
            self.in_flight_by_pid[pid] += 1
            self.requests_by_pid[pid] += 1
            self.peak_by_pid[pid] = max(self.peak_by_pid[pid], self.in_flight_by_pid[pid])
            self.runtimes_by_pid[pid].add(runtime)
        try:
            return await super()._handle(request)
        finally:
            with self._lock:
                self.in_flight_by_pid[pid] -= 1

    def in_flight_per_process(self):
        with self._lock:
            return {pid: n for pid, n in self.in_flight_by_pid.items() if n}


@pytest.fixture
def process_server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with PerProcessServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def worker_pool(tmp_path, process_server):
    """A Beam Python SDK worker pool on 127.0.0.1; it inherits this environment (the key).

    The pool starts each worker as ``python -c ...`` from ``PATH``: this interpreter's folder
    goes first so the workers run the same Python, and the repo root goes on ``PYTHONPATH`` so
    they import ``arkbatch_beam`` and ``pipelines`` whatever their working directory.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = tmp_path / "worker_pool.log"
    log = open(log_path, "wb")
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # poll until the pool's port accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker pool did not start") from None
                try:
                    pool.wait(timeout=0.05)
                    raise RuntimeError(f"the worker pool exited: {log_path.read_text()}")
                except subprocess.TimeoutExpired:
                    pass
        yield pool, port, log_path
    finally:
        try:
            children = psutil.Process(pool.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        pool.terminate()
        try:
            pool.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait(timeout=30)
        finally:
            for child in children:  # SDK workers the pool started for us, if any are left
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(children, timeout=10)
            log.close()


def test_flink_external_worker_processes_each_keep_their_own_cap(process_server, tmp_path, flink, worker_pool):
    server = process_server
    pool, port, pool_log = worker_pool
    server.pool_pid = pool.pid
    cap = 4
    server.latency = 0.1
    # A barrier without sleeps: the first 2 x cap requests are held until all of them have
    # arrived, so none completes before then. Both processes must therefore be saturated at the
    # same moment, and what is in flight per process at that moment is exactly its cap.
    server.add_fault(Fault.hold(90, times=2 * cap))
    at_barrier = {}

    def release_at_barrier():
        at_barrier["reached"] = server.wait_for_requests(2 * cap, timeout=150)
        at_barrier["in_flight"] = server.in_flight_per_process()
        server.release_holds()

    releaser = threading.Thread(target=release_at_barrier, name="release-at-barrier", daemon=True)
    releaser.start()
    inp = write_jsonl(tmp_path / "in.jsonl", N)
    out = str(tmp_path / "out")
    started = time.monotonic()
    try:
        rc = batch_chat.main(argv(server, inp, out, flink, "--environment_type=EXTERNAL",
                                  f"--environment_config=localhost:{port}", "--parallelism=2",
                                  "--sdk_worker_parallelism=2", "--execution_mode_for_batch=BATCH_FORCED",
                                  cap=cap))
    finally:
        server.release_holds()
        releaser.join(timeout=10)  # done by now unless the job failed before the barrier
    wall = time.monotonic() - started
    assert rc == 0
    check_rows(out)
    assert not os.path.isdir(os.path.join(out, "failures"))
    assert server.total_requests == N
    report = (f"requests per pid {dict(server.requests_by_pid)}, peak per pid {dict(server.peak_by_pid)}, "
              f"worker ids {server.worker_ids}, at the barrier {at_barrier}; pool log:\n{pool_log.read_text()[-3000:]}")
    senders = set(server.requests_by_pid)
    # Requests came from two SDK worker processes the pool started (none from this process) ...
    assert None not in senders and len(senders) == 2, report
    # ... each with its own runtime: one client (X-Client-Request-Id prefix) per process ...
    assert all(len(server.runtimes_by_pid[pid]) == 1 for pid in senders), report
    assert len(set().union(*(server.runtimes_by_pid[pid] for pid in senders))) == 2, report
    # ... and its own cap: never more than cap in flight from one process, over the whole run,
    assert all(server.peak_by_pid[pid] <= cap for pid in senders), report
    # while both were busy at once: at the barrier each process had exactly cap in flight.
    assert at_barrier.get("reached") and at_barrier["in_flight"] == {pid: cap for pid in senders}, report
    assert server.peak_in_flight == 2 * cap, report
    print(f"flink external: {wall:.1f}s; {report.split('; pool log')[0]}")
