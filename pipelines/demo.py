"""The README's first command: the whole job, end to end, with no key and no network.

Starts the in-package fake Ark server on 127.0.0.1 (with a few scripted faults: 429 with
``Retry-After``, 503s, a connection reset, one bad request), writes a small JSONL input with
a couple of bad lines, runs the real CLI pipeline on the DirectRunner, then prints the
summary and a few rows read back from the Parquet output.

Example:
    python -m pipelines.demo                      # 2000 prompts into ./demo-output
    python -m pipelines.demo --n 500 --output /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import pyarrow.dataset as ds

from arkbatch_beam import report
from arkbatch_beam.testing import FakeArkServer, Fault
from pipelines import batch_chat

DEMO_KEY_ENV = "ARKBATCH_DEMO_KEY"


def write_input(path: str, n: int) -> None:
    """``n`` prompts in Ark batch JSONL, plus one invalid line and one plain-text prompt."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            line = {
                "custom_id": f"demo-{i:06d}",
                "method": "POST",
                "url": "/v3/batch/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"Name a crucifer, #{i}"}]},
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.write('{"custom_id": "demo-broken", "body": {"messages": \n')
        f.write("What are common cruciferous plants?\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo")
    ap.add_argument("--n", type=int, default=2000, help="number of prompts (1..1000000)")
    ap.add_argument("--output", default="demo-output", help="output folder (recreated)")
    ap.add_argument("--latency", type=float, default=0.02, help="fake server latency, seconds")
    ap.add_argument("--max_concurrency", type=int, default=200)
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 1_000_000:
        ap.error(f"--n must be in 1..1000000, got {args.n}")
    shutil.rmtree(args.output, ignore_errors=True)
    os.makedirs(args.output, exist_ok=True)
    input_path = os.path.join(args.output, "input.jsonl")
    write_input(input_path, args.n)
    os.environ[DEMO_KEY_ENV] = "demo-key"  # the fake server's key; real jobs export ARK_API_KEY
    with FakeArkServer(api_key="demo-key", latency=args.latency) as server:
        server.add_fault(Fault.rate_limited("1", match="Name a crucifer, #3"))
        server.add_fault(Fault.server_error(503, match="Name a crucifer, #5", times=2))
        server.add_fault(Fault.reset(match="Name a crucifer, #7"))
        server.add_fault(Fault.bad_request("demo: this prompt is refused", match="Name a crucifer, #9"))
        batch_chat.run([
            "--input", input_path,
            "--output", os.path.join(args.output, "out"),
            "--model", "ep-demo-endpoint",
            "--base_url", server.base_url,
            "--api_key_env", DEMO_KEY_ENV,
            "--max_concurrency", str(args.max_concurrency),
            "--timeout", "120",
        ])
        print(f"fake server: {server.total_requests} requests, peak in flight "
              f"{server.peak_in_flight} (cap {args.max_concurrency})")
    out = os.path.join(args.output, "out")
    print("\n" + report.format_text(report.summarize(out)))
    cols = ["custom_id", "status", "content", "error_type", "error_message", "attempts"]
    for kind in ("results", "failures"):
        table = ds.dataset(os.path.join(out, kind), format="parquet").to_table(columns=cols)
        print(f"\n{kind}: {table.num_rows} rows in {out}/{kind}/")
        rows = sorted(table.to_pylist(), key=lambda r: r["custom_id"])
        for row in rows[:4]:
            print("  " + json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False))
    print(f"\nreport any time: python -m arkbatch_beam.report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
