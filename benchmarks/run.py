"""The benchmark: ``python -m benchmarks.run [--quick] [--only a,b] [--tls] [--json out.json]``.

Starts the in-package fake Ark server as a separate process on 127.0.0.1 (one process per
latency setting: the machine has 2 cores, so one core serves and one runs the client), then
runs every contender in its own process, one after the other, against the same server:

    bare_aiohttp        the Python floor: one aiohttp session, C worker coroutines
    our_client          ArkClient.complete from C worker coroutines (max_concurrency=C)
    our_client_fixed    the same with pacing="fixed" (all C in flight at once, no adaptive ramp)
    our_pipeline        pipelines.batch_chat.run: JSONL -> BatchChatInference -> Parquet
    our_pipeline_fused  the same DoFns without the dedupe shuffle (the memory curve)
    ark_sdk             volcenginesdkarkruntime.AsyncArk, batch.chat.completions.create
    openai_async        openai.AsyncOpenAI at /v1
    go_peer             volcengine-go-sdk arkruntime (StartBatchWorker + CreateBatchChatCompletion)
    beam_remote         a RemoteModelHandler (sync openai client) inside RunInference
    beam_async_wrapper  Beam's AsyncWrapper around a sync-client DoFn
    ray_docs            Ray Data LLM HttpRequestProcessorConfig as its docs configure it
    ray_tuned           the same, tuned as far as its options allow

With ``--tls`` the server serves HTTPS with a certificate from a throw-away test CA; every
contender trusts it through its own option (``--ca_bundle``, an SSL context, or
``SSL_CERT_FILE`` for the Go peer), never by turning verification off. Every run reports the
connections the server accepted during it (over TLS: the handshakes), read from the
server's ``GET /_fake/stats``.

Settings: latency 0 (CPU-bound, C = first --concurrency), latency L > 0 with every C
(server-bound: reports throughput / (C/L)), and a memory curve of our client and pipeline
over --memory-ns. Each contender's process reports its own figures (see ``_contenders``);
the server's CPU per request is read from /proc. Before each measurement the machine must
be quiet (other processes using < 0.7 core); otherwise it waits 30 s at a time, up to 10
minutes, and notes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from ._contenders import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go_peer")
GO_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "arkbatch-bench", "go")

ALL = [
    "bare_aiohttp", "our_client", "our_client_fixed", "our_pipeline", "our_pipeline_fused", "ark_sdk", "openai_async",
    "go_peer", "beam_remote", "beam_async_wrapper", "ray_docs", "ray_tuned",
]
NO_OPTIONAL_DEPS = ["bare_aiohttp", "our_client", "our_client_fixed", "our_pipeline"]
OPTIONAL_IMPORTS = {
    "ark_sdk": "volcenginesdkarkruntime",
    "openai_async": "openai",
    "beam_remote": "openai",
    "beam_async_wrapper": "openai",
    "ray_docs": "ray.data.llm",
    "ray_tuned": "ray.data.llm",
}
# Pipelines cannot stop on a time budget: their N is capped where they are known to be slow.
CPU_BOUND_CAP = {"beam_remote": 20_000, "beam_async_wrapper": 20_000, "ray_docs": 5_000, "ray_tuned": 20_000}


# -- the machine -------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts), idle


def busy_cores(interval: float = 1.0) -> float:
    """Cores in use by anything on the machine over ``interval`` (call while we are idle)."""
    t0, i0 = _cpu_ticks()
    time.sleep(interval)
    t1, i1 = _cpu_ticks()
    total = t1 - t0
    return 0.0 if total <= 0 else (total - (i1 - i0)) / total * (os.cpu_count() or 1)


def wait_quiet(log: list[str], limit: float = 600.0) -> float:
    """Wait until other processes use < 0.7 core (checked while our own processes are idle)."""
    waited = 0.0
    busy = busy_cores()
    while busy > 0.7 and waited < limit:
        print(f"  machine busy ({busy:.2f} cores used by others, loadavg {loadavg()}); waiting 30 s", flush=True)
        time.sleep(30)
        waited += 30
        busy = busy_cores()
    if waited:
        log.append(f"waited {waited:.0f}s for a quiet machine (then {busy:.2f} cores busy)")
    return busy


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "cores": str(os.cpu_count()), "platform": platform.platform()}
    for pkg in ("apache-beam", "aiohttp", "orjson", "pyarrow", "openai", "volcengine-python-sdk",
                "volcengine-ark-runtime", "ray", "psutil"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    go = shutil.which("go")
    if go:
        out["go"] = subprocess.run([go, "version"], capture_output=True, text=True).stdout.strip()
    try:
        with open(os.path.join(GO_DIR, "go.mod")) as f:
            sdk = next((ln.split()[-1] for ln in f if "volcengine-go-sdk " in ln), "?")
        out["volcengine-go-sdk"] = sdk
    except OSError:
        pass
    return out


# -- the server --------------------------------------------------------------------------------
class Server:
    """``python -m arkbatch_beam.testing.fake_server`` in its own process."""

    def __init__(self, latency: float, tls: bool = False) -> None:
        self.latency = latency
        self.tls = tls
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arkbatch_beam.testing.fake_server", "--host", "127.0.0.1",
             "--port", str(self.port), "--latency", str(latency), "--api-key", "bench-key",
             *(["--tls"] if tls else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.ca_bundle = ""
        if tls:
            ca_line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not ca_line.startswith("ca_bundle "):
                self.stop()
                raise RuntimeError(f"fake server named no CA: {ca_line!r}")
            self.ca_bundle = ca_line.split(" ", 1)[1].strip()
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stats(self) -> dict[str, Any]:
        """The server's counters (``GET /_fake/stats``, on a connection of its own: counted)."""
        ctx = ssl.create_default_context(cafile=self.ca_bundle) if self.tls else None
        with urllib.request.urlopen(self.base + "/_fake/stats", timeout=30, context=ctx) as resp:
            return json.loads(resp.read())

    def connections(self) -> int:
        return int(self.stats()["connections_opened"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the Go peer -------------------------------------------------------------------------------
def build_go_peer() -> tuple[str | None, str]:
    """Build benchmarks/go_peer into ~/.cache/arkbatch-bench/go; returns (binary, why-not)."""
    go = shutil.which("go")
    if go is None:
        return None, "Go is not installed here (no `go` on PATH): go_peer skipped"
    binary = os.path.join(GO_CACHE, "bin", "go_peer")
    env = dict(os.environ, GOPATH=GO_CACHE, GOMODCACHE=os.path.join(GO_CACHE, "mod"),
               GOCACHE=os.path.join(GO_CACHE, "build"), GOFLAGS="-modcacherw")
    res = subprocess.run([go, "build", "-o", binary, "."], cwd=GO_DIR, env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return None, f"go build failed: {res.stderr.strip()[-500:]}"
    return binary, ""


# -- one measurement ---------------------------------------------------------------------------
def _machine_busy_seconds() -> float:
    total, idle = _cpu_ticks()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


STALL_SECONDS = 120.0
STALLED = -1000  # _spawn's exit code for a run killed because the server got no work for a while


def _spawn(
    cmd: list[str], timeout: float, alive: Callable[[], float] | None = None, env: dict[str, str] | None = None,
) -> tuple[int, str, str, float, float]:
    """Run ``cmd``; returns (exit code, stdout, stderr, wall seconds, CPU seconds of the child).

    ``alive`` (the server's CPU seconds) is sampled every 10 s: once it has moved (the first
    request arrived; start-up may take any time) and then stays still for ``STALL_SECONDS``, the
    run is killed and reported as stalled, not waited on until ``timeout``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0", **(env or {})))
        deadline = t0 + timeout
        first_seen = last_seen = alive() if alive else 0.0
        last_moved, next_check = t0, t0 + 10.0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            stalled = False
            if alive is not None and now >= next_check:
                next_check = now + 10.0
                seen = alive()
                if seen != last_seen:
                    last_seen, last_moved = seen, now
                stalled = last_seen != first_seen and now - last_moved > STALL_SECONDS
            if now > deadline or stalled:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                status = STALLED if stalled else -9
                break
            time.sleep(0.05)
        proc.returncode = 0  # reaped above; keep Popen from waiting again
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        code = status if status in (-9, STALLED) else os.waitstatus_to_exitcode(status)
        return code, out.read(), err.read(), wall, ru.ru_utime + ru.ru_stime


def run_one(
    name: str, server: Server, n: int, c: int, *, data: str, workdir: str, budget: float,
    extra: Sequence[str] = (), go_binary: str | None = None, timeout: float = 1800, max_wait: float = 600,
) -> dict[str, Any]:
    """One contender run; re-run (twice at most) when other processes disturbed it."""
    notes: list[str] = []
    for attempt in range(3):
        fig = _run_once(name, server, n, c, data=data, workdir=workdir, budget=budget, extra=extra,
                        go_binary=go_binary, timeout=timeout, max_wait=max_wait, notes=notes)
        others = fig.get("others_cores_during")
        if "error" in fig or others is None or others <= 0.3 or name.startswith("ray") or max_wait <= 0:
            break
        notes.append(f"attempt {attempt + 1} disturbed: other processes used {others:.2f} cores during the run"
                     f" ({fig.get('req_per_s')} req/s); re-run")
        print(f"  {name}: disturbed ({others:.2f} cores used by others); re-running", flush=True)
    if notes:
        fig["notes"] = notes
    return fig


def _run_once(
    name: str, server: Server, n: int, c: int, *, data: str, workdir: str, budget: float,
    extra: Sequence[str], go_binary: str | None, timeout: float, max_wait: float, notes: list[str],
) -> dict[str, Any]:
    busy = wait_quiet(notes, limit=max_wait)
    env: dict[str, str] = {}
    if name == "go_peer":
        assert go_binary is not None
        cmd = [go_binary, "-base", server.base + "/api/v3", "-n", str(n), "-c", str(c), "-budget", str(budget)]
        if server.ca_bundle:  # Go's crypto/x509 reads its roots from SSL_CERT_FILE on Linux
            env["SSL_CERT_FILE"] = server.ca_bundle
    else:
        cmd = [sys.executable, "-m", "benchmarks._contenders", name, "--base", server.base, "--n", str(n),
               "--c", str(c), "--data", data, "--workdir", workdir, "--budget", str(budget), *extra]
        if server.ca_bundle:
            cmd += ["--ca_bundle", server.ca_bundle]
    conns0 = server.connections()
    s0 = server.cpu()
    m0 = _machine_busy_seconds()
    code, stdout, stderr, elapsed, child_cpu = _spawn(cmd, timeout, alive=server.cpu, env=env)
    server_cpu = server.cpu() - s0
    # minus the connection of this stats query itself
    connections = server.connections() - conns0 - 1
    others = max(0.0, _machine_busy_seconds() - m0 - server_cpu - child_cpu) / max(elapsed, 1e-9)
    if code == -9:
        return {"contender": name, "error": f"timed out after {timeout:.0f}s"}
    if code == STALLED:
        return {"contender": name, "error": f"stalled: the server got no work for {STALL_SECONDS:.0f}s "
                f"(killed after {elapsed:.0f}s, {child_cpu:.0f} CPU s)"}
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("BENCH_RESULT ")), None)
    if line is None:
        tail = (stderr or stdout).strip().splitlines()[-6:]
        return {"contender": name, "error": f"exit {code}: " + " | ".join(tail)[-800:]}
    fig = json.loads(line[len("BENCH_RESULT "):])
    fig["contender"] = name
    fig["n_requested"] = n
    fig["process_s"] = round(elapsed, 2)
    fig["process_cpu_s"] = round(child_cpu, 2)
    done = fig.get("completed") or 0
    fig["server_cpu_us_per_req"] = round(server_cpu / done * 1e6, 1) if done else None
    fig["connections"] = connections
    fig["others_busy_cores_before"] = round(busy, 2)
    fig["others_cores_during"] = round(others, 2)
    fig["loadavg_before"] = loadavg()
    return fig


def _skip_reason(name: str, go_why: str) -> str | None:
    if name == "go_peer":
        return go_why or None
    mod = OPTIONAL_IMPORTS.get(name)
    if mod is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"cannot import {mod} ({last}); install the bench extra: pip install -e '.[bench]'"
    return None


def _show(fig: dict[str, Any]) -> None:
    if "error" in fig or "skipped" in fig:
        print(f"  {fig['contender']:<20} {fig.get('error') or fig.get('skipped')}", flush=True)
        return
    print(
        f"  {fig['contender']:<20} n={fig['completed']:<8} {fig['req_per_s']:>9.1f} req/s  "
        f"{fig['cpu_us_per_req'] or 0:>8.1f} µs CPU/req  {fig['peak_rss_mb']:>7.1f} MiB  "
        f"p50 {fig.get('p50_ms') or 0:>8.2f} ms  p99 {fig.get('p99_ms') or 0:>8.2f} ms"
        + (f"  [{fig['ratio_cl']:.3f} x C/L]" if "ratio_cl" in fig else "")
        + (f"  start-up {fig['startup_s']} s" if "startup_s" in fig else "")
        + (f"  sending {fig['sending_req_per_s']:.0f} req/s" if "sending_req_per_s" in fig else "")
        + (f"  {fig['connections']} connections" if "connections" in fig else ""),
        flush=True,
    )


# -- the plan ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny N everywhere: a smoke test")
    p.add_argument("--only", default="", help=f"comma-separated contenders, from: {','.join(ALL)}")
    p.add_argument("--n", type=int, default=None, help="requests per latency-0 run (default 100000)")
    p.add_argument("--concurrency", default="100,1000,3000", help="C values; latency-0 runs use the first")
    p.add_argument("--latency", default="0,1.0", help="server latencies in seconds; 0 = CPU-bound")
    p.add_argument("--held", default="",
                   help="C values of the latency > 0 runs (default: those of --concurrency)")
    p.add_argument("--waves", type=int, default=None, help="server-bound runs send waves x C requests (default 20)")
    p.add_argument("--budget", type=float, default=None,
                   help="async contenders stop taking work after S s (default 40)")
    p.add_argument("--memory-ns", default=None, help="N values for the memory curve (default 10000,100000,1000000)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory curve")
    p.add_argument("--beam-threads", type=int, default=100, help="beam_remote: most DirectRunner threads")
    p.add_argument("--ray-actors", type=int, default=8)
    p.add_argument("--ray-batch", type=int, default=16)
    p.add_argument("--ray-in-flight", type=int, default=4)
    p.add_argument("--max-wait", type=float, default=600.0,
                   help="wait at most S s for a quiet machine before each run (0: never wait, never re-run)")
    p.add_argument("--tls", action="store_true",
                   help="HTTPS: the server uses a test CA's certificate; contenders trust it via --ca_bundle "
                   "(the Go peer via SSL_CERT_FILE)")
    p.add_argument("--uvloop", action="store_true", help="run the Python asyncio contenders on uvloop")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--markdown", default=None, help="write the results tables (Markdown) to this file")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    a = p.parse_args(argv)

    names = [x.strip() for x in a.only.split(",") if x.strip()] or ALL
    unknown = [x for x in names if x not in ALL]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {ALL}")
    cs = [int(x) for x in a.concurrency.split(",") if x.strip()]
    held = [int(x) for x in a.held.split(",") if x.strip()] if a.held else None
    latencies = [float(x) for x in a.latency.split(",") if x.strip()]
    n0 = a.n or (300 if a.quick else 100_000)
    waves = a.waves or (2 if a.quick else 20)
    budget = a.budget if a.budget is not None else (10.0 if a.quick else 40.0)
    mem_ns = [int(x) for x in (a.memory_ns or ("300,1000" if a.quick else "10000,100000,1000000")).split(",")]
    if a.quick and a.latency == "0,1.0":
        latencies = [0.0, 0.05]
    if a.quick and a.concurrency == "100,1000,3000":
        cs = [20]

    workdir = a.workdir or tempfile.mkdtemp(prefix="arkbatch-bench-")
    os.makedirs(workdir, exist_ok=True)
    info = versions()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "loadavg_start": loadavg(), "runs": [], "memory": [], "skipped": {},
        "tls": a.tls, "uvloop": a.uvloop,
    }
    print(f"machine: {info['cores']} cores, Python {info['python']}, apache-beam {info['apache-beam']}, "
          f"loadavg {loadavg()}", flush=True)

    go_binary, go_why = (None, "")
    if "go_peer" in names:
        go_binary, go_why = build_go_peer()
    usable = []
    for name in names:
        why = _skip_reason(name, go_why)
        if why:
            report["skipped"][name] = why
            print(f"  skip {name}: {why}", flush=True)
        else:
            usable.append(name)

    datasets: dict[int, str] = {}

    def data_for(n: int) -> str:
        if n not in datasets:
            path = os.path.join(workdir, f"prompts-{n}.jsonl")
            write_jsonl(path, n)
            datasets[n] = path
        return datasets[n]

    def extra_for(name: str, c: int) -> list[str]:
        loop = ["--uvloop"] if a.uvloop else []
        if name == "beam_remote":
            return ["--threads", str(min(c, a.beam_threads)), *loop]
        if name in ("ray_docs", "ray_tuned"):
            return ["--ray_actors", str(a.ray_actors), "--ray_batch", str(a.ray_batch),
                    "--ray_in_flight", str(a.ray_in_flight), *loop]
        return [] if name == "go_peer" else loop

    def concurrency_of(name: str, c: int) -> int:
        """How many requests a contender can really keep in flight (to size slow runs)."""
        if name == "beam_remote":
            return min(c, a.beam_threads)
        if name == "ray_docs":
            return 4
        if name == "ray_tuned":
            return min(c, a.ray_actors * a.ray_in_flight)
        return c

    try:
        for lat in latencies:
            server = Server(lat, tls=a.tls)
            try:
                settings = [cs[0]] if lat == 0 else (held or cs)
                for c in settings:
                    if lat == 0:
                        title = f"latency 0 (CPU-bound), C={c}"
                    else:
                        title = f"latency {lat:g}s, C={c} (server-bound, C/L={c / lat:.0f} req/s)"
                    title = ("HTTPS, " if a.tls else "") + title
                    print(f"\n== {title}  [server pid {server.proc.pid}, port {server.port}]", flush=True)
                    for name in usable:
                        if lat == 0:
                            n = n0 if a.quick else min(n0, CPU_BOUND_CAP.get(name, n0))
                        else:
                            n = waves * c
                            k = concurrency_of(name, c)
                            if k < c:  # a slow contender: size its run to ~budget seconds
                                n = min(n, max(2 * k, int(k / lat * budget)))
                        fig = run_one(name, server, n, c, data=data_for(n), workdir=workdir, budget=budget,
                                      extra=extra_for(name, c), go_binary=go_binary, max_wait=a.max_wait)
                        fig.update(latency_s=lat, concurrency=c)
                        if lat > 0 and "req_per_s" in fig:
                            fig["ratio_cl"] = round(fig["req_per_s"] / (c / lat), 4)
                        report["runs"].append(fig)
                        _show(fig)
                if lat == 0 and not a.no_memory:
                    mem_names = [x for x in ("our_client", "our_pipeline_fused", "our_pipeline", "bare_aiohttp")
                                 if x in usable]
                    if mem_names:
                        print(f"\n== memory curve: latency 0, C={cs[0]}, N in {mem_ns}", flush=True)
                    for name in mem_names:
                        for n in mem_ns:
                            if name == "our_pipeline" and n > 300_000 and not a.quick:
                                report["memory"].append({
                                    "contender": name, "n_requested": n, "skipped":
                                    "the CLI's dedupe GroupByKey holds the whole PCollection in DirectRunner "
                                    "memory; see our_pipeline_fused for our own code's curve"})
                                continue
                            fig = run_one(name, server, n, cs[0], data=data_for(n), workdir=workdir, budget=0,
                                          extra=extra_for(name, cs[0]), timeout=3600, max_wait=a.max_wait)
                            fig.update(latency_s=0.0, concurrency=cs[0])
                            report["memory"].append(fig)
                            _show(fig)
            finally:
                server.stop()
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    report["goals"] = goals(report)
    print("\n== goals")
    for g in report["goals"]:
        print(f"  [{g['status']:>6}] {g['goal']}: {g['detail']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {a.json}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(report))
        print(f"wrote {a.markdown}")
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The figures as Markdown tables: one per setting, then the memory curve and the goals."""
    m = report["machine"]
    out = [f"Measured {report['date']} with `{report['command']}` on {m['cores']} cores, Python {m['python']}, "
           f"apache-beam {m['apache-beam']}, aiohttp {m['aiohttp']}, {m['platform']}"
           + (", over HTTPS (a test CA's certificate, trusted through --ca_bundle / SSL_CERT_FILE)"
              if report.get("tls") else "")
           + (", Python contenders on uvloop" if report.get("uvloop") else "") + ".", ""]
    head = ("| contender | n | req/s | CPU µs/req | peak RSS MiB | p50 ms | p99 ms | connections | notes |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---|")
    base_rss = {r["contender"]: r for r in report["runs"] if r.get("latency_s") == 0 and "peak_rss_mb" in r}

    def row(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"| {r['contender']} | | | | | | | | error: {r['error'][:160]} |"
        notes = []
        zero = base_rss.get(r["contender"])
        if r["latency_s"] > 0 and zero is not None and r["concurrency"] > zero["concurrency"]:
            extra = (r["peak_rss_mb"] - zero["peak_rss_mb"]) * 1024 / (r["concurrency"] - zero["concurrency"])
            notes.append(f"{extra:.0f} KiB per extra request in flight (vs latency 0, C = {zero['concurrency']})")
        if "ratio_cl" in r:
            notes.append(f"{r['ratio_cl']:.3f} x C/L")
        if "startup_s" in r:
            notes.append(f"start-up {r['startup_s']} s (not counted)")
        if "sending_req_per_s" in r:
            notes.append(f"{r['sending_req_per_s']:.0f} req/s from first send to last answer ({r['sending_s']} s)")
        if r.get("lost_rows"):
            notes.append(f"{r['lost_rows']} rows lost")
        if r.get("others_cores_during", 0) > 0.3:
            notes.append(f"disturbed: others used {r['others_cores_during']} cores")
        return (f"| {r['contender']} | {r['completed']} | {r['req_per_s']:.0f} | {r['cpu_us_per_req'] or 0:.0f} | "
                f"{r['peak_rss_mb']:.0f} | {r.get('p50_ms') or 0:.1f} | {r.get('p99_ms') or 0:.1f} | "
                f"{r.get('connections', '')} | {'; '.join(notes)} |")

    seen: list[tuple[float, int]] = []
    for r in report["runs"]:
        key = (r["latency_s"], r["concurrency"])
        if key not in seen:
            seen.append(key)
    for lat, c in seen:
        title = "latency 0 (CPU-bound)" if lat == 0 else f"latency {lat:g} s (server-bound, C/L = {c / lat:.0f} req/s)"
        title = ("HTTPS, " if report.get("tls") else "") + title
        out += [f"### {title}, C = {c}", "", head]
        out += [row(r) for r in report["runs"] if (r["latency_s"], r["concurrency"]) == (lat, c)]
        out.append("")
    if report["memory"]:
        out += ["### Memory curve (latency 0)", "", "| contender | N | peak RSS MiB | req/s |", "|---|---:|---:|---:|"]
        for r in report["memory"]:
            if "peak_rss_mb" in r:
                rss, rate = r["peak_rss_mb"], r["req_per_s"]
                out.append(f"| {r['contender']} | {r['n_requested']:,} | {rss:.0f} | {rate:.0f} |")
            else:
                out.append(f"| {r['contender']} | {r['n_requested']:,} | {r.get('skipped') or r.get('error')} | |")
        out.append("")
    if report["skipped"]:
        out += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()), ""]
    out += ["### Goals", "", "| goal | status | figure |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['status']} | {g['detail']} |" for g in report["goals"]]
    return "\n".join(out) + "\n"


def _get(runs: list[dict[str, Any]], name: str, lat: float, c: int | None = None) -> dict[str, Any] | None:
    for r in runs:
        if r.get("contender") == name and r.get("latency_s") == lat and (c is None or r.get("concurrency") == c) \
                and "req_per_s" in r:
            return r
    return None


def goals(report: dict[str, Any]) -> list[dict[str, str]]:
    """Each goal of the issue, met / missed / n/a, with the ratio behind it."""
    runs = report["runs"]
    out: list[dict[str, str]] = []

    def add(goal: str, ok: bool | None, detail: str) -> None:
        out.append({"goal": goal, "status": "n/a" if ok is None else ("met" if ok else "MISSED"), "detail": detail})

    bare, ours, pipe = _get(runs, "bare_aiohttp", 0.0), _get(runs, "our_client", 0.0), _get(runs, "our_pipeline", 0.0)
    if report.get("tls"):  # issue 17: over HTTPS, at every setting
        for r in runs:
            who = {"our_client": "our client", "our_client_fixed": "our client (fixed pacing)"}.get(r.get("contender"))
            if who is None or "req_per_s" not in r:
                continue
            b = _get(runs, "bare_aiohttp", r["latency_s"], r["concurrency"])
            if b:
                ratio = r["req_per_s"] / b["req_per_s"]
                add(f"HTTPS: {who} >= 0.95 x bare aiohttp (latency {r['latency_s']:g}, C={r['concurrency']})",
                    ratio >= 0.95, f"{ratio:.2f}x ({r['req_per_s']:.0f} vs {b['req_per_s']:.0f} req/s)")
            if r["latency_s"] > 0 and r["concurrency"] >= 10_000 and "ratio_cl" in r:
                add(f"HTTPS: {who} server-bound >= 0.9 x C/L at C={r['concurrency']}", r["ratio_cl"] >= 0.9,
                    f"{r['ratio_cl']:.3f} x C/L")
    if bare and ours:
        r = ours["req_per_s"] / bare["req_per_s"]
        add("our client >= 0.8 x bare aiohttp (latency 0)", r >= 0.8, f"{r:.2f}x")
    ark = _get(runs, "ark_sdk", 0.0)
    if ours and ark and ours.get("req_per_cpu_s") and ark.get("req_per_cpu_s"):
        r = ours["req_per_cpu_s"] / ark["req_per_cpu_s"]
        add(">= 10 x official Ark Python SDK in req/s per CPU-second (latency 0)", r >= 10, f"{r:.1f}x")
    for name in ("our_client", "our_pipeline"):
        for r in runs:
            if r.get("contender") == name and r.get("latency_s", 0) > 0 and "ratio_cl" in r:
                add(f"{name} server-bound >= 0.95 x C/L at C={r['concurrency']}", r["ratio_cl"] >= 0.95,
                    f"{r['ratio_cl']:.3f} x C/L ({r['req_per_s']} req/s, L={r['latency_s']}s)")
    if bare and pipe:
        r = pipe["req_per_s"] / bare["req_per_s"]
        steady = pipe.get("sending_req_per_s")
        add("pipeline JSONL->Parquet >= 0.8 x bare aiohttp (latency 0; never < 0.6)", r >= 0.8,
            f"{r:.2f}x whole run" + ("" if r >= 0.6 else " (below the 0.6 floor)")
            + (f"; {steady / bare['req_per_s']:.2f}x first send to last answer" if steady else ""))
    for name in ("our_client", "our_pipeline_fused", "our_pipeline"):
        pts = sorted((m["n_requested"], m["peak_rss_mb"]) for m in report["memory"]
                     if m.get("contender") == name and "peak_rss_mb" in m)
        big = [(n, rss) for n, rss in pts if n >= 100_000]
        if len(big) >= 2:
            growth = big[-1][1] / big[0][1]
            add(f"{name} peak RSS flat from N={big[0][0]:,} to N={big[-1][0]:,}", growth <= 1.15,
                f"{big[0][1]:.0f} -> {big[-1][1]:.0f} MiB ({growth:.2f}x)")
        elif pts:
            add(f"{name} peak RSS curve", None, ", ".join(f"N={n:,}: {rss:.0f} MiB" for n, rss in pts))
    ray = _get(runs, "ray_tuned", 0.0)
    if pipe and ray:
        r1 = pipe["req_per_s"] / ray["req_per_s"]
        r2 = (pipe["req_per_cpu_s"] or 0) / (ray["req_per_cpu_s"] or 1)
        r3 = pipe["peak_rss_mb"] / ray["peak_rss_mb"]
        add("pipeline >= 3 x Ray Data LLM (tuned) in req/s and per CPU-second, at 1/10 of its memory (latency 0)",
            r1 >= 3 and r2 >= 3 and r3 <= 0.1,
            f"req/s {r1:.1f}x, per CPU-s {r2:.1f}x, memory {r3:.2f}x of Ray's")
    return out


if __name__ == "__main__":
    sys.exit(main())
