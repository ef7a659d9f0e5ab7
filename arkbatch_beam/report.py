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
from ._types import DUPLICATE

_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return round(sorted_values[idx], 1)


def _newest_first(directory: str) -> list[Any]:
    return sorted(part_files(directory), key=lambda m: m.last_updated_in_seconds, reverse=True)


def summarize(output: str, *, top: int = 10) -> dict[str, Any]:
    """Figures for the output folder ``output``, per id and per row written.

    Every figure but ``rows_written`` counts each ``custom_id`` once, by its final state: an
    id with an ``ok`` row is ok (its tokens and latency counted once, however many copies a
    bundle retry or a resumed run wrote); otherwise it is failed with the newest of its failure
    rows. ``duplicate_custom_id`` rows (extra input lines that reuse an id) are counted apart,
    as ``duplicate_rows``. Memory grows with the number of ids (a 64-bit hash each).
    """
    output = output.rstrip("/")
    tokens: Counter[str] = Counter()
    latencies: list[float] = []
    attempts: Counter[int] = Counter()
    by_type: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    messages: Counter[tuple[str, str]] = Counter()
    retryable = duplicates = rows_ok = rows_failed = files = 0
    ok_ids: set[int] = set()
    for meta in _newest_first(f"{output}/{RESULTS_DIR}"):
        files += 1
        cols = read_columns(meta.path, ["custom_id", "latency_ms", "attempts", *_TOKENS])
        rows_ok += len(cols["custom_id"])
        for i, cid in enumerate(cols["custom_id"]):
            h = hash(cid)
            if h in ok_ids:
                continue  # another copy of an answered id
            ok_ids.add(h)
            for name in _TOKENS:
                tokens[name] += cols[name][i] or 0
            if cols["latency_ms"][i] is not None:
                latencies.append(cols["latency_ms"][i])
            if cols["attempts"][i] is not None:
                attempts[cols["attempts"][i]] += 1
    failed_ids: set[int] = set()
    for meta in _newest_first(f"{output}/{FAILURES_DIR}"):
        files += 1
        cols = read_columns(meta.path, ["custom_id", "error_type", "http_status", "error_message", "retryable"])
        rows_failed += len(cols["custom_id"])
        for i, cid in enumerate(cols["custom_id"]):
            etype = cols["error_type"][i] or "unknown"
            if etype == DUPLICATE:
                duplicates += 1
                continue
            h = hash(cid)
            if h in ok_ids or h in failed_ids:
                continue  # answered after all, or an older copy of this failure
            failed_ids.add(h)
            by_type[etype] += 1
            if cols["http_status"][i] is not None:
                by_status[str(cols["http_status"][i])] += 1
            retryable += bool(cols["retryable"][i])
            messages[(etype, (cols["error_message"][i] or "")[:160])] += 1
    latencies.sort()
    ok, failed = len(ok_ids), len(failed_ids)
    total = ok + failed
    return {
        "output": output,
        "ids": total,
        "ok": ok,
        "failed": failed,
        "ok_fraction": round(ok / total, 6) if total else None,
        "failed_retryable": retryable,
        "failures_by_type": dict(by_type.most_common()),
        "failures_by_http_status": dict(by_status.most_common()),
        "top_failure_messages": [
            {"error_type": t, "message": m, "count": c} for (t, m), c in messages.most_common(top)
        ],
        "duplicate_rows": duplicates,
        "tokens": dict(tokens),
        "latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p90": _percentile(latencies, 0.90),
            "p99": _percentile(latencies, 0.99),
            "max": round(latencies[-1], 1) if latencies else None,
        },
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "rows_written": {"results": rows_ok, "failures": rows_failed},
        "rows": rows_ok + rows_failed,
        "files": files,
    }


def top_reasons(summary: dict[str, Any], n: int = 3) -> str:
    """The most common failure types, e.g. ``"rejected 12, deadline_exceeded 3"`` ("" when none).

    Example:
        >>> top_reasons({"failures_by_type": {"rejected": 12, "deadline_exceeded": 3}})
        'rejected 12, deadline_exceeded 3'
    """
    return ", ".join(f"{k} {v}" for k, v in list(summary["failures_by_type"].items())[:n])


def format_text(s: dict[str, Any]) -> str:
    """The summary as a short human-readable text."""
    written = s["rows_written"]
    lines = [
        f"output:   {s['output']}  ({s['files']} files)",
        f"ids:      {s['ids']}  ok {s['ok']}  failed {s['failed']}"
        + (f"  ({s['failed_retryable']} retryable: re-run with --resume)" if s["failed_retryable"] else ""),
        f"rows:     {written['results']} results, {written['failures']} failures written"
        + (f" ({s['duplicate_rows']} for duplicate ids)" if s["duplicate_rows"] else ""),
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
