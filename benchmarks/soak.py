"""The reliability soak: the CLI against a fake server scripted with every fault it knows.

    python -m benchmarks.soak --n 20000                  # the long soak; prints figures as JSON
    python -m benchmarks.soak --n 2000 --restart 10      # kill the server mid-run, restart 10 s later

Each prompt gets a random fault (seeded): 429 in every ``Retry-After`` form (``0``, a float,
``retry-after-ms``, an HTTP-date in the past), 5xx, resets, truncated, invalid and empty bodies,
holds, 400s, and errors that echo the API key; two global pauses run meanwhile. Then it checks
the promises and returns them as figures (``tests/test_soak.py`` runs a short one and asserts):
every id exactly once; every id without a 400 ok; every 400 id failed with the server's message;
peak in flight <= cap; few arrivals inside an announced pause; the key nowhere in the output;
the process's memory.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import pathlib
import random
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
import pyarrow.dataset as ds

from arkbatch_beam.testing import FakeArkServer, Fault

KEY_ENV = "ARKBATCH_SOAK_KEY"
PAST = email.utils.formatdate(0, usegmt=True)


def _plan(n: int, rng: random.Random, key: str) -> tuple[list[Fault], dict[str, str]]:
    """A fault (or none) per prompt ``q i``; returns the faults and the kind per custom_id."""
    kinds = [
        ("ok", 50), ("429_zero", 5), ("429_float", 4), ("429_ms", 4), ("429_past_date", 4),
        ("5xx", 8), ("reset", 4), ("truncate", 3), ("invalid_json", 2), ("empty", 2), ("hold", 3),
        ("bad_request", 4), ("echo_502", 4), ("echo_400", 3),
    ]
    names, weights = zip(*kinds, strict=True)
    faults: list[Fault] = []
    plan: dict[str, str] = {}
    for i in range(n):
        kind = rng.choices(names, weights)[0]
        plan[f"s{i}"] = kind
        m = f"q {i}"
        if kind == "429_zero":
            faults.append(Fault.rate_limited("0", match=m, times=rng.randint(1, 2)))
        elif kind == "429_float":
            faults.append(Fault.rate_limited("0.05", match=m, times=rng.randint(1, 2)))
        elif kind == "429_ms":
            faults.append(Fault.rate_limited("20", match=m, header="retry-after-ms"))
        elif kind == "429_past_date":
            faults.append(Fault.rate_limited(PAST, match=m))
        elif kind == "5xx":
            faults.append(Fault.server_error(rng.choice([500, 502, 503, 504]), match=m, times=rng.randint(1, 3)))
        elif kind in ("reset", "truncate", "invalid_json", "empty"):
            faults.append(getattr(Fault, kind)(match=m))
        elif kind == "hold":
            faults.append(Fault.hold(rng.uniform(0.05, 0.5), match=m))
        elif kind == "bad_request":
            faults.append(Fault.bad_request(f"bad prompt {i}", match=m, times=-1))
        elif kind == "echo_502":
            faults.append(Fault.server_error(502, message=f"upstream saw Authorization: Bearer {key}", match=m))
        elif kind == "echo_400":
            faults.append(Fault.bad_request(f"bad prompt {i} sent with key {key}", match=m, times=-1))
    return faults, plan


def _read(out: pathlib.Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in ("results", "failures"):
        path = out / kind
        if path.exists() and any(path.glob("*.parquet")):
            rows += ds.dataset(str(path), format="parquet").to_table().to_pylist()
    return rows


def _pauses(server: FakeArkServer, n: int, seen: list[int], stop: threading.Event) -> None:
    """Two global pauses, at a third and at two thirds of the requests."""
    for at, seconds, form in ((n // 3, 1.0, "float"), (2 * n // 3, 0.5, "ms")):
        while not stop.is_set() and not server.wait_for_requests(at, timeout=1.0):
            pass
        if stop.is_set():
            return
        server.pause(seconds, retry_after_form=form)
        stop.wait(seconds + 0.5)  # the pause is the event; read its count once it is over
        seen.append(server.requests_during_pause)


def run_soak(n: int, *, workdir: str, cap: int = 64, seed: int = 0, restart: float | None = None) -> dict[str, Any]:
    """Run the soak; returns figures and the list of broken promises (empty when all hold)."""
    from pipelines import batch_chat

    rng = random.Random(seed)
    key = f"sk-SOAK-{rng.getrandbits(64):016x}"
    os.environ[KEY_ENV] = key
    work = pathlib.Path(workdir)
    inp, out = work / "in.jsonl", work / "out"
    with inp.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"s{i}", "messages": [{"role": "user", "content": f"q {i}"}]}) + "\n")
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    server = FakeArkServer(api_key=key).start()
    port = server.port
    faults, plan = ({}, {f"s{i}": "ok" for i in range(n)}) if restart is not None else _plan(n, rng, key)
    for fault in faults or ():
        server.add_fault(fault)
    stop = threading.Event()
    pause_counts: list[int] = []
    servers = [server]
    if restart is None:
        helper = threading.Thread(target=_pauses, args=(server, n, pause_counts, stop), daemon=True)
    else:
        def bounce() -> None:  # kill at a third of the requests, back on the same port later
            if server.wait_for_requests(n // 3, timeout=600):
                server.stop()
                if not stop.wait(restart):
                    servers.append(FakeArkServer(api_key=key, port=port).start())
        helper = threading.Thread(target=bounce, daemon=True)
    helper.start()
    t0 = time.monotonic()
    try:
        rc = batch_chat.main([
            "--input", str(inp), "--output", str(out), "--model", "ep-soak", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", str(cap), "--timeout", "600", "--progress_seconds", "0",
            "--backoff_initial", "0.05", "--backoff_max", "1", "--no_preflight",
        ])
    finally:
        stop.set()
        helper.join(timeout=30)
        for s in servers:
            s.stop()
    wall = time.monotonic() - t0
    rows = _read(out)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(r["custom_id"], []).append(r)
    broken: list[str] = []
    if rc != 0:
        broken.append(f"exit code {rc}")
    missing = [i for i in plan if i not in by_id]
    twice = [i for i, rs in by_id.items() if len(rs) != 1]
    extra = [i for i in by_id if i not in plan]
    for name, ids in (("missing", missing), ("more than once", twice), ("unknown", extra)):
        if ids:
            broken.append(f"{len(ids)} ids {name}: {ids[:5]}")
    for cid, kind in plan.items():
        got = by_id.get(cid)
        if not got:
            continue
        row = got[0]
        if kind in ("bad_request", "echo_400"):
            said = "bad prompt" in (row["error_message"] or "")
            if row["status"] != "failed" or row["error_type"] != "rejected" or not said:
                broken.append(f"{cid} ({kind}): {row['status']} {row['error_type']} {row['error_message']!r}")
        elif row["status"] != "ok":
            broken.append(f"{cid} ({kind}): {row['error_type']} {row['error_message']!r}")
    peak = max(s.peak_in_flight for s in servers)
    if peak > cap:
        broken.append(f"peak in flight {peak} > cap {cap}")
    if any(c > 2 * cap for c in pause_counts):
        broken.append(f"arrivals during an announced pause {pause_counts} > 2 x cap")
    key_b = key.encode()
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and key_b in p.read_bytes()]
    if leaks:
        broken.append(f"the key is in {leaks[:3]}")
    attempts = sum(s.total_requests for s in servers)
    return {
        "n": n, "cap": cap, "wall_s": round(wall, 2), "req_per_s": round(n / wall, 1), "attempts": attempts,
        "peak_in_flight": peak, "arrivals_during_pauses": pause_counts,
        "rss_start_mib": rss0 >> 20, "rss_end_mib": proc.memory_info().rss >> 20,
        "faults": {k: sum(1 for v in plan.values() if v == k) for k in sorted(set(plan.values()))},
        "restart_after_s": restart, "broken": broken[:20], "broken_count": len(broken),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="prompts (default 20000)")
    ap.add_argument("--cap", type=int, default=64, help="--max_concurrency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restart", type=float, default=None,
                    help="instead of faults: kill the server at a third of the requests, restart it after this many s")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="arkbatch-soak-") as tmp:
        figures = run_soak(args.n, workdir=tmp, cap=args.cap, seed=args.seed, restart=args.restart)
    print(json.dumps(figures, indent=2))
    return 0 if not figures["broken"] else 1


if __name__ == "__main__":
    sys.exit(main())
