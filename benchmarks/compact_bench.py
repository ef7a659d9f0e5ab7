"""Compaction at scale: synthesise an output folder, compact it on a Beam runner, check and measure.

The folder looks like a long job's: ``--parts`` result parts holding ``--rows`` rows, of which
a fraction are copies of an id written by a retried bundle or a resumed run (each copy with
*different* content: the newest file must win), and failure parts whose ids were answered
later (superseded failures, dropped) or never (kept, one row per id). Then

    python -m arkbatch_beam.compact OUT --direct_num_workers 2 --direct_running_mode multi_processing

runs as a child process; every process of its tree is sampled for RSS (psutil), and afterwards
the folder is checked: exactly one row per answered id, holding its newest copy, and one
failure row per id that was never answered.

    python -m benchmarks.compact_bench                                  # 10^4 parts, 10^6 rows
    python -m benchmarks.compact_bench --parts 100000 --rows 10000000   # the issue's size
    python -m benchmarks.compact_bench --rows 100000 --parts 1000 --json r.json

Example (the synthetic folder alone):
    >>> import tempfile
    >>> expect = synthesise(tempfile.mkdtemp(), parts=4, rows=100, seed=1)
    >>> expect["results"], expect["failures"] > 0
    (95, True)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from arkbatch_beam._schema import OUTPUT_SCHEMA


def _table(ids: np.ndarray, part: int, status: str, content_bytes: int) -> pa.Table:
    n = len(ids)
    cid = pa.array([f"id-{i:09d}" for i in ids.tolist()], pa.string())
    pad = "x" * max(0, content_bytes - 20)
    cols: dict[str, Any] = {
        "custom_id": cid,
        "status": pa.array([status] * n, pa.string()),
        "content": pa.array([f"{i}@{part}:{pad}" for i in ids.tolist()], pa.string()),
        "request_sha256": pa.array([f"{i:064x}" for i in ids.tolist()], pa.string()),
        "attempts": pa.array(np.ones(n, dtype=np.int32)),
    }
    if status == "failed":
        cols["error_type"] = pa.array(["deadline_exceeded"] * n, pa.string())
        cols["retryable"] = pa.array([True] * n, pa.bool_())
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in OUTPUT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def synthesise(out: str, *, parts: int, rows: int, dup_fraction: float = 0.05,
               failed_fraction: float = 0.05, final_failed_fraction: float = 0.01,
               content_bytes: int = 200, seed: int = 0) -> dict[str, Any]:
    """Write the folder; returns what compaction must keep (and each answered id's newest part)."""
    rng = np.random.default_rng(seed)
    n_dup = int(rows * dup_fraction)
    unique = rows - n_dup
    # Result rows: every answered id once, plus n_dup copies of random ids; in random order.
    ids = np.concatenate([np.arange(unique), rng.integers(0, unique, n_dup)])
    rng.shuffle(ids)
    result_parts = np.array_split(ids, parts)
    os.makedirs(f"{out}/results", exist_ok=True)
    os.makedirs(f"{out}/failures", exist_ok=True)
    newest = np.full(unique, -1, dtype=np.int64)
    base = time.time() - 10 * parts - 1000
    for p, chunk in enumerate(result_parts):
        path = f"{out}/results/part-{uuid.uuid4().hex}.parquet"
        pq.write_table(_table(chunk, p, "ok", content_bytes), path, compression="zstd")
        os.utime(path, (base + p, base + p))  # later part = newer file
        newest[chunk] = p  # (within one part the first row wins; ids repeat in a part rarely)
    # Failure rows: failed_fraction of answered ids failed first (older files: superseded), and
    # final_failed_fraction of new ids only ever failed (twice: a bundle retry).
    superseded = rng.choice(unique, int(unique * failed_fraction), replace=False)
    n_final = max(1, int(rows * final_failed_fraction))
    final = np.arange(unique, unique + n_final)
    failed = np.concatenate([superseded, final, final])
    rng.shuffle(failed)
    fail_parts = max(1, parts // 20)
    for p, chunk in enumerate(np.array_split(failed, fail_parts)):
        path = f"{out}/failures/part-{uuid.uuid4().hex}.parquet"
        pq.write_table(_table(chunk, p, "failed", content_bytes), path, compression="zstd")
        os.utime(path, (base - 10 - p, base - 10 - p))
    return {"results": unique, "failures": n_final, "newest": newest, "final": final,
            "rows_in": rows + len(failed), "parts_in": parts + fail_parts}


def check(out: str, expect: dict[str, Any]) -> dict[str, Any]:
    """Exactly one row per answered id holding its newest copy; one row per failed-only id."""
    res = ds.dataset(f"{out}/results", format="parquet").to_table(columns=["custom_id", "content"])
    ids = np.array([int(c[3:]) for c in res.column("custom_id").to_pylist()])
    parts = np.array([int(c.split(":", 1)[0].split("@", 1)[1]) for c in res.column("content").to_pylist()])
    fail = ds.dataset(f"{out}/failures", format="parquet").to_table(columns=["custom_id"])
    fids = np.array([int(c[3:]) for c in fail.column("custom_id").to_pylist()])
    return {
        "results_rows": len(ids),
        "results_ok": bool(len(ids) == expect["results"] and len(np.unique(ids)) == len(ids)
                           and np.array_equal(np.sort(ids), np.arange(expect["results"]))),
        "newest_copy_won": bool(np.array_equal(parts, expect["newest"][ids])),
        "failures_rows": len(fids),
        "failures_ok": bool(np.array_equal(np.sort(fids), np.sort(expect["final"]))),
        "files_after": len(os.listdir(f"{out}/results")) + len(os.listdir(f"{out}/failures")),
    }


def run_measured(cmd: list[str], interval: float = 0.2) -> dict[str, Any]:
    """Run ``cmd``; peak RSS of each process in its tree (MiB), and the wall time."""
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, list[Any]] = {}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[1:4])
                t = p.cpu_times()
            except psutil.Error:
                continue
            entry = peaks.setdefault(p.pid, [0, name, 0.0])
            entry[0] = max(entry[0], rss)
            entry[2] = max(entry[2], t.user + t.system)
        time.sleep(interval)
    reader.join(5)
    wall = time.monotonic() - started
    procs = sorted(({"pid": pid, "peak_rss_mib": round(r / 2**20, 1), "cpu_s": round(cpu, 1), "cmd": name}
                    for pid, (r, name, cpu) in peaks.items()), key=lambda d: -d["peak_rss_mib"])
    return {"returncode": proc.returncode, "wall_s": round(wall, 1), "processes": procs,
            "output_tail": "".join(output)[-2000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--content_bytes", type=int, default=200, help="bytes of content per row")
    ap.add_argument("--workers", type=int, default=2, help="--direct_num_workers")
    ap.add_argument("--output_shards", type=int, default=0)
    ap.add_argument("--out", help="folder to use (default: a temporary one, removed after)")
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--seed", type=int, default=0)
    args, beam_args = ap.parse_known_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="compact-bench-")
    t0 = time.monotonic()
    expect = synthesise(out, parts=args.parts, rows=args.rows, content_bytes=args.content_bytes, seed=args.seed)
    made = time.monotonic() - t0
    size = sum(e.stat().st_size for d in ("results", "failures") for e in os.scandir(f"{out}/{d}"))
    cmd = [sys.executable, "-m", "arkbatch_beam.compact", out, "--output_shards", str(args.output_shards),
           "--direct_num_workers", str(args.workers), "--direct_running_mode", "multi_processing", *beam_args]
    measured = run_measured(cmd)
    checked = check(out, expect) if measured["returncode"] == 0 else {}
    procs = measured["processes"]
    workers = [p for p in procs if p["cmd"].startswith("-m apache_beam.runners.worker")]
    runner = [p for p in procs if "arkbatch_beam.compact" in p["cmd"]]
    figures = {
        "rows_in": expect["rows_in"], "parts_in": expect["parts_in"], "input_mib": round(size / 2**20, 1),
        "synthesise_s": round(made, 1), "compact_wall_s": measured["wall_s"],
        "rows_per_s": round(expect["rows_in"] / measured["wall_s"]) if measured["wall_s"] else None,
        "peak_rss_mib_runner": runner[0]["peak_rss_mib"] if runner else None,
        "peak_rss_mib_workers": [p["peak_rss_mib"] for p in workers],
        "cpu_s_runner": runner[0]["cpu_s"] if runner else None,
        "cpu_s_workers": [p["cpu_s"] for p in workers],
        "processes": procs, **checked, "returncode": measured["returncode"],
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "processes"}, indent=1))
    for p in procs:
        print(f"  pid {p['pid']:>7}  peak {p['peak_rss_mib']:>8.1f} MiB  cpu {p['cpu_s']:>7.1f} s  {p['cmd'][:80]}")
    if measured["returncode"] != 0:
        print(measured["output_tail"], file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    if not args.out:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    ok = measured["returncode"] == 0 and all(checked.get(k) for k in ("results_ok", "newest_copy_won", "failures_ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
