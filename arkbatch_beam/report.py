"""Summarise a job's output folder: what was answered, what failed and why, tokens, latency.

Reads only the columns it needs, file by file, through Beam's FileSystems (local or
``gs://``), so it works on a 10-million-row output and while a job is still writing parts.

Usage::

    python -m arkbatch_beam.report OUTPUT_DIR           # text
    python -m arkbatch_beam.report OUTPUT_DIR --json    # one JSON object

Example:
    >>> import tempfile
    >>> from arkbatch_beam._sink import write_parquet_atomic
    >>> from arkbatch_beam import ChatResult, OUTPUT_SCHEMA
    >>> out = tempfile.mkdtemp()
    >>> write_parquet_atomic([ChatResult("a", "ok", prompt_tokens=3, attempts=1).to_row()],
    ...                      out + "/results", OUTPUT_SCHEMA)[-8:]
    '.parquet'
    >>> summarize(out)["ok"]
    1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ._sink import FAILURES_DIR, RESULTS_DIR, part_files, read_columns

_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return round(sorted_values[idx], 1)


def summarize(output: str, *, top: int = 10) -> dict[str, Any]:
    """Figures for the output folder ``output`` (see the module docstring)."""
    output = output.rstrip("/")
    tokens: Counter[str] = Counter()
    latencies: list[float] = []
    attempts: Counter[int] = Counter()
    ok = failed = 0
    by_type: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    messages: Counter[tuple[str, str]] = Counter()
    retryable = 0
    files = 0
    for meta in part_files(f"{output}/{RESULTS_DIR}"):
        files += 1
        cols = read_columns(meta.path, ["latency_ms", "attempts", *_TOKENS])
        ok += len(cols["attempts"])
        for name in _TOKENS:
            tokens[name] += sum(v for v in cols[name] if v)
        latencies.extend(v for v in cols["latency_ms"] if v is not None)
        attempts.update(a for a in cols["attempts"] if a is not None)
    for meta in part_files(f"{output}/{FAILURES_DIR}"):
        files += 1
        cols = read_columns(meta.path, ["error_type", "http_status", "error_message", "retryable"])
        failed += len(cols["error_type"])
        by_type.update(t or "unknown" for t in cols["error_type"])
        by_status.update(str(s) for s in cols["http_status"] if s is not None)
        retryable += sum(1 for r in cols["retryable"] if r)
        messages.update(
            (t or "unknown", (m or "")[:160])
            for t, m in zip(cols["error_type"], cols["error_message"], strict=True)
        )
    latencies.sort()
    total = ok + failed
    return {
        "output": output,
        "rows": total,
        "ok": ok,
        "failed": failed,
        "ok_fraction": round(ok / total, 6) if total else None,
        "failed_retryable": retryable,
        "failures_by_type": dict(by_type.most_common()),
        "failures_by_http_status": dict(by_status.most_common()),
        "top_failure_messages": [
            {"error_type": t, "message": m, "count": c} for (t, m), c in messages.most_common(top)
        ],
        "tokens": dict(tokens),
        "latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p90": _percentile(latencies, 0.90),
            "p99": _percentile(latencies, 0.99),
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "files": files,
    }


def format_text(s: dict[str, Any]) -> str:
    """The summary as a short human-readable text."""
    lines = [
        f"output:   {s['output']}  ({s['files']} files)",
        f"rows:     {s['rows']}  ok {s['ok']}  failed {s['failed']}"
        + (f"  ({s['failed_retryable']} retryable: re-run with --resume)" if s["failed_retryable"] else ""),
        "tokens:   " + "  ".join(f"{k.replace('_tokens', '')} {v}" for k, v in s["tokens"].items()),
        "latency:  " + "  ".join(f"{k} {v} ms" for k, v in s["latency_ms"].items() if v is not None),
        "attempts: " + "  ".join(f"{k}x {v}" for k, v in s["attempts"].items()),
    ]
    if s["failures_by_type"]:
        lines.append("failures by type: " + ", ".join(f"{k} {v}" for k, v in s["failures_by_type"].items()))
        for m in s["top_failure_messages"]:
            lines.append(f"  {m['count']:>8}  {m['error_type']}: {m['message']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arkbatch_beam.report OUTPUT_DIR [--json] [--top N]``."""
    ap = argparse.ArgumentParser(prog="python -m arkbatch_beam.report", description=__doc__.split("\n")[0])
    ap.add_argument("output", help="the job's --output folder (local or gs://)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--top", type=int, default=10, help="failure messages to list (1..1000)")
    args = ap.parse_args(argv)
    if not 1 <= args.top <= 1000:
        ap.error(f"--top must be in 1..1000, got {args.top}")
    summary = summarize(args.output, top=args.top)
    if summary["files"] == 0:
        print(f"error: no Parquet output under {args.output}/{{results,failures}}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
