"""Pacing a fleet: several CLI processes with default flags sharing one fake-server quota.

    python -m benchmarks.fleet                                   # every scenario: 3 processes, 300 req/s, 6000 prompts
    python -m benchmarks.fleet --scenario halve --json fleet.json
    python -m benchmarks.fleet --scenario steady --retry_after_step 1      # whole-second Retry-After
    python -m benchmarks.fleet --scenario steady -- --max_concurrency 64   # extra flags for every client

One fake server runs in this process with a quota shared by all its clients; each client is a
``python -m pipelines.batch_chat`` process with the default pacing flags, sending its own third of
the prompts (ids and prompts carry a per-process prefix, so the server counts per process):

* ``steady``: a quota of ``--rps`` requests per second.
* ``tpm``: a quota of tokens per minute worth ``--rps`` requests per second (every prompt costs the
  same number of tokens).
* ``halve``: ``--rps``, halved once a third of the prompts were accepted.
* ``pause``: ``--rps``; once a third of the prompts were accepted, the server announces a global
  pause of ``--pause_seconds`` (every arrival inside it is refused with the time left).

Figures per scenario: the accepted rate over the busy span (first to last accepted arrival) against
the quota's rate over it (``ratio``; the bucket's initial burst can lift it a little above 1) and
against the most the bucket could admit (``of most``: the rate plus a full bucket at the start, and
after a pause; at most 1); the same from 5 % to 95 % of the accepted arrivals (``core``: no
start-up, no tail) and the seconds the last 5 % took (``tail``); refusals as a share of all
requests (in all and in the core); each process's share of the
accepted requests while all of them were sending (against a fair ``1/procs``); every id answered
exactly once (the results and failures Parquet of every process against the inputs); and for
``halve`` / ``pause`` the rates before and after the change and the arrivals inside the pause.
Clients still running at ``--timeout`` are killed (so are all of them when this script stops early).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.dataset as ds

from arkbatch_beam.testing import FakeArkServer

KEY_ENV = "ARKBATCH_FLEET_KEY"
KEY = "sk-fleet-benchmark"
SCENARIOS = ("steady", "tpm", "halve", "pause")
REPO = pathlib.Path(__file__).resolve().parent.parent
TICK = 0.1  # the server's timeline resolution


def _words(text: str) -> int:
    return len(text.split())


def _prompt(proc: int, j: int) -> str:
    return f"p{proc} q {j}"


def _tokens(prompt: str) -> int:
    """What the fake server charges a prompt: its words plus the words of ``echo: <prompt>``."""
    return _words(prompt) + _words("echo: " + prompt)


def _write_inputs(work: pathlib.Path, procs: int, n: int) -> list[tuple[pathlib.Path, set[str]]]:
    """One JSONL file per process, ids ``p<i>-<j>``, prompts ``p<i> q <j>``; n split evenly."""
    files = []
    for i in range(procs):
        path = work / f"in-p{i}.jsonl"
        ids = set()
        with path.open("w") as f:
            for j in range(i, n, procs):
                cid = f"p{i}-{j}"
                ids.add(cid)
                f.write(json.dumps({"custom_id": cid, "messages": [{"role": "user", "content": _prompt(i, j)}]}))
                f.write("\n")
        files.append((path, ids))
    return files


def _read_rows(out: pathlib.Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in ("results", "failures"):
        path = out / kind
        if path.is_dir() and any(path.rglob("*.parquet")):
            table = ds.dataset(str(path), format="parquet").to_table(columns=["custom_id", "status", "error_type"])
            rows += table.to_pylist()
    return rows


@dataclasses.dataclass
class Schedule:
    """The quota over time (seconds since the server started): for ``allowed()``."""

    rate: float  # requests per second (the tpm scenario: its equivalent)
    burst_seconds: float
    halved_at: float | None = None
    pause: tuple[float, float] | None = None

    def rate_at(self, t: float) -> float:
        if self.pause is not None and self.pause[0] <= t < self.pause[1]:
            return 0.0
        if self.halved_at is not None and t >= self.halved_at:
            return self.rate / 2
        return self.rate

    def allowed(self, t0: float, t1: float) -> float:
        """Requests the quota admits over ``[t0, t1)`` at its rate (no burst), integrated per 10 ms."""
        step, total, t = 0.01, 0.0, t0
        while t < t1 - 1e-9:
            dt = min(step, t1 - t)
            total += self.rate_at(t) * dt
            t += dt
        return total

    def most(self, t0: float, t1: float, *, full_at_start: bool) -> float:
        """The most the bucket could admit over ``[t0, t1)``: ``allowed()`` plus a full bucket at ``t0``."""
        burst = max(1.0, self.rate_at(t0) * self.burst_seconds) if full_at_start else 0.0
        return self.allowed(t0, t1) + burst


def _count(rows: list[tuple[float, int, int]], t0: float, t1: float) -> tuple[int, int]:
    """Accepted and refused arrivals in the 0.1 s bins starting in ``[t0, t1)``."""
    acc = sum(a for t, a, _ in rows if t0 - 1e-6 <= t < t1 - 1e-6)
    ref = sum(r for t, _, r in rows if t0 - 1e-6 <= t < t1 - 1e-6)
    return acc, ref


def _busy(rows: list[tuple[float, int, int]]) -> tuple[float, float] | None:
    """First and end of the last 0.1 s bin with an accepted arrival."""
    busy = [t for t, a, _ in rows if a]
    return (busy[0], busy[-1] + TICK) if busy else None


def _quantile_time(rows: list[tuple[float, int, int]], q: float) -> float:
    """Start of the 0.1 s bin in which the cumulative accepted count reaches ``q`` of the total."""
    total = sum(a for _, a, _ in rows)
    seen = 0
    for t, a, _ in rows:
        seen += a
        if seen >= q * total:
            return t
    return rows[-1][0]


def _kill(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill every client process still running (its process group: it was started in its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


def _watch(server: FakeArkServer, at: int, action: Callable[[], None], stop: threading.Event) -> None:
    """Run ``action`` once ``at`` requests were answered ok (polled every 50 ms)."""
    while not stop.is_set():
        if server.ok_responses >= at:
            action()
            return
        stop.wait(0.05)


def run_scenario(name: str, args: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    """Run one scenario in ``work``; return its figures."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}")
    for stale in work.glob("out-p*"):
        shutil.rmtree(stale)
    files = _write_inputs(work, args.procs, args.n)
    expected = set().union(*(ids for _, ids in files))
    cost = _tokens(_prompt(0, 0))
    assert all(_tokens(_prompt(i, j)) == cost for i in range(args.procs) for j in (0, args.n - 1))
    server = FakeArkServer(api_key=KEY, latency=args.latency, client_of=lambda key: key.split(" ", 1)[0])
    rate = args.rps
    step = args.retry_after_step or None
    quota_text = f"{rate:g} req/s"
    if name == "tpm":
        tpm = rate * cost * 60
        server.set_quota(tokens_per_minute=tpm, burst_seconds=args.burst_seconds, retry_after_step=step)
        quota_text = f"{tpm:g} tok/min (= {rate:g} req/s x {cost} tok)"
    else:
        server.set_quota(requests_per_second=rate, burst_seconds=args.burst_seconds, retry_after_step=step)
    schedule = Schedule(rate, args.burst_seconds)
    events: dict[str, float] = {}

    def now() -> float:
        return server.clock() - server.started_at

    def halve() -> None:
        server.set_quota(requests_per_second=rate / 2, burst_seconds=args.burst_seconds, retry_after_step=step)
        events["halved_at"] = schedule.halved_at = now()

    def pause() -> None:
        server.pause(args.pause_seconds, status=args.pause_status)
        t = now()
        events["pause_at"] = t
        schedule.pause = (t, t + args.pause_seconds)

    env = {**os.environ, KEY_ENV: KEY, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    stop = threading.Event()
    watcher = None
    timed_out = False
    server.start()
    try:
        if name in ("halve", "pause"):
            action = halve if name == "halve" else pause
            watcher = threading.Thread(target=_watch, args=(server, args.n // 3, action, stop), daemon=True)
            watcher.start()
        t0 = time.monotonic()
        launched_at = now()
        for i, (path, _) in enumerate(files):
            log = (work / f"p{i}.log").open("wb")
            logs.append(log)
            cmd = [
                sys.executable, "-m", "pipelines.batch_chat", "--input", str(path), "--output", str(work / f"out-p{i}"),
                "--model", "ep-fleet", "--base_url", server.base_url, "--api_key_env", KEY_ENV, "--no_preflight",
                "--progress_seconds", "0", *args.client_args,
            ]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = t0 + args.timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
        wall = time.monotonic() - t0
    finally:
        stop.set()
        _kill(procs)
        for log in logs:
            log.close()
        if watcher is not None:
            watcher.join(timeout=5)
        server.stop()

    snap = server.snapshot()
    rows = server.timeline(TICK)
    busy = _busy(rows)
    figures: dict[str, Any] = {
        "scenario": name, "procs": args.procs, "n": args.n, "quota": quota_text, "latency_s": args.latency,
        "burst_seconds": args.burst_seconds, "retry_after_step": step, "client_args": list(args.client_args),
        "wall_s": round(wall, 1), "timed_out": timed_out, "exit_codes": [p.returncode for p in procs],
        "requests": snap["total_requests"], "accepted": sum(snap["accepted_by_client"].values()),
        "ok_responses": snap["ok_responses"], "quota_refusals": sum(snap["quota_refusals"].values()),
        "pause_refusals": snap["requests_during_pause"] if name == "pause" else 0,
        "peak_in_flight": snap["peak_in_flight"], "events": {k: round(v, 2) for k, v in events.items()},
        "first_send_after_launch_s": None,
    }
    refused = figures["quota_refusals"] + figures["pause_refusals"]
    figures["refused_pct"] = round(100 * refused / max(1, figures["requests"]), 2)
    if busy is not None:
        b0, b1 = busy
        figures["first_send_after_launch_s"] = round(b0 - launched_at, 2)
        figures["busy_span_s"] = round(b1 - b0, 2)
        figures["accepted_per_s"] = round(figures["accepted"] / (b1 - b0), 1)
        figures["ratio_to_quota"] = round(figures["accepted"] / schedule.allowed(b0, b1), 3)
        figures["of_most"] = round(figures["accepted"] / schedule.most(b0, b1, full_at_start=True), 3)
        # The core: from 5 % to 95 % of the accepted arrivals (no start-up burst, no tail).
        c0, c1 = _quantile_time(rows, 0.05), _quantile_time(rows, 0.95)
        if c1 - c0 >= 1.0:
            core_acc, core_ref = _count(rows, c0, c1)
            figures["core"] = {
                "from_s": round(c0 - b0, 2), "to_s": round(c1 - b0, 2),
                "accepted_per_s": round(core_acc / (c1 - c0), 1),
                "ratio_to_quota": round(core_acc / schedule.allowed(c0, c1), 3),
                "refused_pct": round(100 * core_ref / max(1, core_acc + core_ref), 2),
            }
        figures["tail_s"] = round(b1 - (c1 + TICK), 2)  # sending the last 5 %
        cut = events.get("halved_at", events.get("pause_at"))
        if cut is not None:
            resume = cut + (args.pause_seconds if name == "pause" else 0.0)
            before_acc, before_ref = _count(rows, b0, cut)
            after_acc, after_ref = _count(rows, resume, b1)
            figures["before"] = {
                "span_s": round(cut - b0, 2), "accepted_per_s": round(before_acc / max(cut - b0, TICK), 1),
                "ratio_to_quota": round(before_acc / max(schedule.allowed(b0, cut), 1e-9), 3),
                "of_most": round(before_acc / max(schedule.most(b0, cut, full_at_start=True), 1e-9), 3),
                "refused_pct": round(100 * before_ref / max(1, before_acc + before_ref), 2),
            }
            figures["after"] = {
                "span_s": round(b1 - resume, 2), "accepted_per_s": round(after_acc / max(b1 - resume, TICK), 1),
                "ratio_to_quota": round(after_acc / max(schedule.allowed(resume, b1), 1e-9), 3),
                "of_most": round(
                    after_acc / max(schedule.most(resume, b1, full_at_start=name == "pause"), 1e-9), 3
                ),
                "refused_pct": round(100 * after_ref / max(1, after_acc + after_ref), 2),
            }
        if name == "pause" and "pause_at" in events:
            times = snap["pause_arrival_times"]
            figures["pause"] = {
                "seconds": args.pause_seconds, "status": args.pause_status, "arrivals": len(times),
                "arrivals_after_first_0.5s": sum(1 for t in times if t >= 0.5),
                "arrivals_after_first_1s": sum(1 for t in times if t >= 1.0),
                "quota_would_admit": round(rate * args.pause_seconds),
            }

    # Each process: its busy window, and its share while every process was sending.
    per: list[dict[str, Any]] = []
    windows = []
    for i in range(args.procs):
        c_rows = server.timeline(TICK, client=f"p{i}")
        c_busy = _busy(c_rows)
        windows.append(c_busy)
        per.append({
            "proc": f"p{i}", "accepted": snap["accepted_by_client"][f"p{i}"],
            "refused": snap["refused_by_client"][f"p{i}"],
            "first_s": None if c_busy is None else round(c_busy[0], 2),
            "last_s": None if c_busy is None else round(c_busy[1], 2),
            "_rows": c_rows,
        })
    if all(w is not None for w in windows):
        w0 = max(w[0] for w in windows if w is not None)
        w1 = min(w[1] for w in windows if w is not None)
        figures["common_window_s"] = round(max(0.0, w1 - w0), 2)
        if w1 - w0 >= 1.0:
            in_window = [_count(p["_rows"], w0, w1)[0] for p in per]
            total = sum(in_window) or 1
            fair = 1 / args.procs
            for p, acc in zip(per, in_window, strict=True):
                p["share"] = round(acc / total, 3)
                p["vs_fair"] = round(acc / total / fair - 1, 3)
            figures["max_share_deviation"] = max(abs(p["vs_fair"]) for p in per)
    for p in per:
        del p["_rows"]

    # Every id answered exactly once.
    seen: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    for i in range(args.procs):
        out = work / f"out-p{i}"
        for row in _read_rows(out):
            seen[row["custom_id"]] += 1
            statuses[row["status"] if row["status"] == "ok" else f"failed:{row['error_type']}"] += 1
        summary = out / "summary.json"
        if summary.exists():
            per[i]["summary"] = json.loads(summary.read_text())
    figures["ids"] = {
        "expected": len(expected), "answered": len(seen), "missing": len(expected - set(seen)),
        "duplicated": sum(1 for c in seen.values() if c > 1), "unknown": len(set(seen) - expected),
        "statuses": dict(statuses),
    }
    figures["exactly_once"] = (
        figures["ids"]["missing"] == 0 and figures["ids"]["duplicated"] == 0 and figures["ids"]["unknown"] == 0
    )
    figures["per_process"] = per
    figures["timeline_per_s"] = [list(row) for row in server.timeline(1.0)]  # (start s, accepted, refused)
    if timed_out or any(p.returncode != 0 for p in procs):
        figures["log_tails"] = {
            f"p{i}": (work / f"p{i}.log").read_text(errors="replace")[-1500:] for i in range(args.procs)
        }
    return figures


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def _pacing(summary: dict[str, Any]) -> str:
    """The client's own pacing figures from its summary.json (those it has)."""
    names = ("retries", "window_cuts", "paused_seconds", "throttled_seconds", "budget_waits")
    got = [f"{name} {summary[name]}" for name in names if name in summary]
    return f"; {', '.join(got)}" if got else ""


def table(results: Sequence[dict[str, Any]]) -> str:
    """A compact text table of the figures (one line per scenario, then details)."""
    head = (f"{'scenario':<8} {'quota':<38} {'wall s':>6} {'busy s':>6} {'acc/s':>7} {'ratio':>6} {'of most':>7} "
            f"{'refused':>8} {'core ratio':>10} {'core ref':>8} {'tail s':>6} {'share dev':>9} {'once':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        dev = r.get("max_share_deviation")
        core = r.get("core") or {}
        lines.append(
            f"{r['scenario']:<8} {r['quota']:<38} {r['wall_s']:>6} {_fmt(r.get('busy_span_s')):>6} "
            f"{_fmt(r.get('accepted_per_s')):>7} {_fmt(r.get('ratio_to_quota'), '.3f'):>6} "
            f"{_fmt(r.get('of_most'), '.3f'):>7} "
            f"{r['refused_pct']:>7.2f}% {_fmt(core.get('ratio_to_quota'), '.3f'):>10} "
            f"{'-' if 'refused_pct' not in core else format(core['refused_pct'], '.2f') + '%':>8} "
            f"{_fmt(r.get('tail_s')):>6} {'-' if dev is None else format(dev, '+.1%'):>9} "
            f"{'yes' if r['exactly_once'] else 'NO':>5}"
        )
    for r in results:
        lines.append("")
        extra = " TIMED OUT" if r["timed_out"] else ""
        lines.append(f"[{r['scenario']}] requests {r['requests']}, accepted {r['accepted']}, quota refusals "
                     f"{r['quota_refusals']}, pause refusals {r['pause_refusals']}, peak in flight "
                     f"{r['peak_in_flight']}, first send {_fmt(r['first_send_after_launch_s'])} s after launch, "
                     f"exit codes {r['exit_codes']}{extra}")
        lines.append(f"  ids: {r['ids']}")
        for p in r["per_process"]:
            lines.append(f"  {p['proc']}: accepted {p['accepted']}, refused {p['refused']}, busy "
                         f"{_fmt(p['first_s'])}..{_fmt(p['last_s'])} s, share while all sent {_fmt(p.get('share'))} "
                         f"({'-' if p.get('vs_fair') is None else format(p['vs_fair'], '+.1%')} vs fair)"
                         + _pacing(p.get("summary") or {}))
        for part in ("before", "after"):
            if part in r:
                b = r[part]
                lines.append(f"  {part:<6}: {b['span_s']} s at {b['accepted_per_s']} acc/s (ratio "
                             f"{b['ratio_to_quota']}, of most {b['of_most']}), refused {b['refused_pct']}%")
        if "pause" in r:
            p = r["pause"]
            lines.append(f"  pause {p['seconds']} s (status {p['status']}) at {r['events'].get('pause_at')} s: "
                         f"{p['arrivals']} arrivals inside ({p['arrivals_after_first_0.5s']} after its first 0.5 s, "
                         f"{p['arrivals_after_first_1s']} after 1 s; the quota would have admitted "
                         f"{p['quota_would_admit']})")
        if "halved_at" in r["events"]:
            lines.append(f"  quota halved at {r['events']['halved_at']} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rps", type=float, default=300, help="the shared quota, requests per second (default 300)")
    ap.add_argument("--n", type=int, default=6000, help="prompts in all (default 6000)")
    ap.add_argument("--procs", type=int, default=3, help="CLI processes (default 3)")
    ap.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    ap.add_argument("--latency", type=float, default=0.05, help="the fake server's latency (default 0.05 s)")
    ap.add_argument("--pause_seconds", type=float, default=5.0, help="the pause scenario's pause (default 5 s)")
    ap.add_argument("--pause_status", type=int, default=429, help="status of the pause's refusals (default 429)")
    ap.add_argument("--burst_seconds", type=float, default=1.0, help="the quota bucket holds this much (default 1 s)")
    ap.add_argument("--retry_after_step", type=float, default=0.1,
                    help="quota refusals announce Retry-After rounded up to this (default 0.1 s; 1: whole seconds; "
                         "0: no Retry-After)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds before the clients are killed (default 180)")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the figures here")
    ap.add_argument("--workdir", type=pathlib.Path, default=None, help="keep inputs, outputs and logs here")
    ap.add_argument("client_args", nargs="*", help="extra CLI flags for every client (after --)")
    args = ap.parse_args(argv)

    def _on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through run_scenario's finally: the clients are killed

    signal.signal(signal.SIGTERM, _on_term)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = []
    with tempfile.TemporaryDirectory(prefix="arkbatch-fleet-") as tmp:
        root = args.workdir or pathlib.Path(tmp)
        for name in names:
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results.append(run_scenario(name, args, work))
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
