"""Summarise a job's output folder: what was answered, what failed and why, tokens, latency.

Reads only the columns it needs, file by file, through Beam's FileSystems (local or
``gs://``), so it works on a 10-million-row output and while a job is still writing parts.

Usage::

    python -m arkbatch_beam.report OUTPUT_DIR           # text
    python -m arkbatch_beam.report OUTPUT_DIR --json    # one JSON object
    python -m arkbatch_beam.report OUTPUT_DIR --plot report.png --html report.html \
        --price_input 0.4 --price_output 1.0           # figures, a page, and the cost

Prices are per million tokens (any currency); cached input tokens cost ``--price_cached_input``
(default: the input price). Without price flags, the prices ``OUTPUT_DIR/summary.json`` recorded
(the job's own ``--price_*`` flags) are used. The run's own figures (rate over time, wall time,
retries, pauses) come from ``OUTPUT_DIR/summary.json`` when the job wrote one.

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
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._parquet_io import iter_batches
from ._progress import TOKEN_KINDS
from ._sink import FAILURES_DIR, RESULTS_DIR, part_files
from ._types import DUPLICATE

_READERS = 8  # files read ahead in threads (object stores: latency, not bandwidth, per file)
_MAX_MESSAGES = 100_000  # distinct (type, message) pairs held before the rarest are dropped


def _percentile(sorted_values: Any, q: float) -> float | None:
    if not len(sorted_values):
        return None
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return round(float(sorted_values[idx]), 1)


def _newest_first(directory: str) -> list[Any]:
    return sorted(part_files(directory), key=lambda m: (-m.last_updated_in_seconds, m.path))


def _column(batch: pa.RecordBatch, name: str, kind: pa.DataType) -> pa.Array:
    if name in batch.schema.names:
        return batch.column(name)
    return pa.nulls(batch.num_rows, kind)


def _hashes(ids: pa.Array) -> np.ndarray:
    """64-bit hashes of the ids (one process: Python's string hash is stable within it)."""
    values = ids.to_pylist()
    return np.fromiter(map(hash, values), dtype=np.int64, count=len(values))


def _read_results(meta: Any, slowest: int = 0) -> dict[str, Any]:
    cols = ["custom_id", "latency_ms", "attempts", *TOKEN_KINDS]
    hashes, latency, attempts, tokens = [], [], [], []
    candidates: list[tuple[float, int, str, int]] = []  # (latency, row, custom_id, attempts)
    row0 = 0
    for batch in iter_batches(meta.path, cols, size=meta.size_in_bytes):
        ids = _column(batch, "custom_id", pa.string())
        hashes.append(_hashes(ids))
        lat = pc.fill_null(_column(batch, "latency_ms", pa.float64()).cast(pa.float64()), float("nan"))
        lat_np = lat.to_numpy().astype(np.float32)
        latency.append(lat_np)
        att = pc.fill_null(_column(batch, "attempts", pa.int32()).cast(pa.int32()), -1).to_numpy()
        attempts.append(att)
        tokens.append(np.stack([pc.fill_null(_column(batch, t, pa.int64()).cast(pa.int64()), 0).to_numpy()
                                for t in TOKEN_KINDS], axis=1))
        if slowest and len(lat_np):
            # A few more than asked per batch: copies of an id seen in a newer file drop out later.
            keep = np.argsort(-np.nan_to_num(lat_np, nan=-1.0), kind="stable")[:4 * slowest]
            names = ids.take(pa.array(keep)).to_pylist()
            candidates.extend((float(lat_np[i]), row0 + int(i), names[j], int(att[i]))
                              for j, i in enumerate(keep.tolist()) if not np.isnan(lat_np[i]))
        row0 += batch.num_rows
    return {"hashes": _cat(hashes, np.int64), "latency": _cat(latency, np.float32),
            "attempts": _cat(attempts, np.int32),
            "tokens": np.concatenate(tokens) if tokens else np.zeros((0, len(TOKEN_KINDS)), np.int64),
            "slowest": sorted(candidates, reverse=True)[:4 * slowest]}


def _read_failures(meta: Any) -> dict[str, Any]:
    cols = ["custom_id", "error_type", "http_status", "error_message", "retryable"]
    out: dict[str, Any] = {"hashes": [], "n": 0, "duplicates": 0, "rows": []}
    for batch in iter_batches(meta.path, cols, size=meta.size_in_bytes):
        etype = _column(batch, "error_type", pa.string())
        dup = pc.fill_null(pc.equal(etype, DUPLICATE), False).to_numpy(zero_copy_only=False)
        out["n"] += batch.num_rows
        out["duplicates"] += int(dup.sum())
        keep = pa.array(np.flatnonzero(~dup))
        out["hashes"].append(_hashes(_column(batch, "custom_id", pa.string()).take(keep)))
        out["rows"].append(pa.table({
            "error_type": etype.take(keep), "http_status": _column(batch, "http_status", pa.int32()).take(keep),
            "error_message": _column(batch, "error_message", pa.string()).take(keep),
            "retryable": _column(batch, "retryable", pa.bool_()).take(keep),
        }))
    out["hashes"] = _cat(out["hashes"], np.int64)
    return out


def _cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _read_ahead(read: Callable[[Any], Any], metas: list[Any]) -> Iterator[tuple[Any, Any]]:
    """``(meta, read(meta))`` in order, with up to ``_READERS`` files read ahead in threads."""
    with ThreadPoolExecutor(_READERS, thread_name_prefix="arkbatch-report") as pool:
        pending: list[Any] = []
        it = iter(metas)
        for meta in it:
            pending.append((meta, pool.submit(read, meta)))
            if len(pending) >= 2 * _READERS:
                break
        while pending:
            meta, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield meta, fut.result()


class _SeenIds:
    """A set of 64-bit id hashes in ~8 bytes each: a sorted array, plus a small set of recent ones
    merged into it now and then (a merge of two sorted runs: linear)."""

    RECENT = 1 << 17

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.int64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        if len(self._sorted):
            at = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
            found = self._sorted[at] == hashes
        if self._recent:
            recent = self._recent
            found |= np.fromiter((h in recent for h in hashes.tolist()), dtype=bool, count=len(hashes))
        return found

    def add(self, hashes: np.ndarray) -> None:
        self._recent.update(hashes.tolist())
        if len(self._recent) >= self.RECENT:
            self._merge()

    def _merge(self) -> None:
        if self._recent:
            new = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            new.sort()
            self._sorted = np.sort(np.concatenate([self._sorted, new]), kind="stable")
            self._recent = set()


def _first_unseen(hashes: np.ndarray, *seen: _SeenIds) -> np.ndarray:
    """Rows whose id is in none of ``seen`` and not earlier in ``hashes``."""
    new = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        _, first = np.unique(hashes, return_index=True)
        new[first] = True
        for s in seen:
            new &= ~s.contains(hashes)
    return new


class _Progress:
    def __init__(self, every: float, stream: Any) -> None:
        self._every = every
        self._stream = stream
        self._started = self._last = time.monotonic()

    def __call__(self, stage: str, done: int, total: int, rows: int) -> None:
        now = time.monotonic()
        if self._every and now - self._last >= self._every:
            self._last = now
            print(f"report: {stage} {done}/{total} files, {rows} rows, {now - self._started:.0f} s",
                  file=self._stream, flush=True)


def summarize(output: str, *, top: int = 10, progress_seconds: float = 0.0, stream: Any = None,
              slowest: int = 10) -> dict[str, Any]:
    """Figures for the output folder ``output``, per id and per row written.

    Every figure but ``rows_written`` counts each ``custom_id`` once, by its final state: an
    id with an ``ok`` row is ok (its tokens and latency counted once, however many copies a
    bundle retry or a resumed run wrote); otherwise it is failed with the newest of its failure
    rows. ``duplicate_custom_id`` rows (extra input lines that reuse an id) are counted apart,
    as ``duplicate_rows``.

    One pass, newest file first, a few files read ahead by threads (an object store's per-file
    latency overlaps). Memory is bounded per id, never a Python object per id: a 64-bit id hash
    in a sorted array (8 bytes) and the latency (4 bytes) per answered id, 8 bytes per failed id.
    ``progress_seconds``: a line on ``stream`` (default stderr) at most that often (0: none).
    ``slowest``: how many of the slowest answered requests to list (id, latency, attempts).

    Example:
        >>> import tempfile
        >>> from arkbatch_beam import ChatResult, OUTPUT_SCHEMA
        >>> from arkbatch_beam._sink import write_parquet_atomic
        >>> out = tempfile.mkdtemp()
        >>> _ = write_parquet_atomic([ChatResult("a", "ok", prompt_tokens=3).to_row()] * 2,
        ...                          out + "/results", OUTPUT_SCHEMA)
        >>> s = summarize(out)
        >>> s["ok"], s["tokens"]["prompt_tokens"], s["rows_written"]["results"]
        (1, 3, 2)
    """
    output = output.rstrip("/")
    note = _Progress(progress_seconds, stream if stream is not None else sys.stderr)

    ok_ids = _SeenIds()
    tokens = np.zeros(len(TOKEN_KINDS), dtype=np.int64)
    latency: list[np.ndarray] = []
    attempts: Counter[int] = Counter()
    rows_ok = 0
    slow: list[tuple[float, str, int]] = []
    res_metas = _newest_first(f"{output}/{RESULTS_DIR}")
    for i, (_, got) in enumerate(_read_ahead(lambda m: _read_results(m, slowest), res_metas)):
        rows_ok += len(got["hashes"])
        new = _first_unseen(got["hashes"], ok_ids)  # a copy of an id answered in a newer file: skipped
        slow = sorted(slow + [(lat, cid, att) for lat, row, cid, att in got["slowest"] if new[row]],
                      reverse=True)[:slowest]
        ok_ids.add(got["hashes"][new])
        tokens += got["tokens"][new].sum(axis=0)
        lat = got["latency"][new]
        latency.append(lat[~np.isnan(lat)])
        att = got["attempts"][new]
        values, counts = np.unique(att[att >= 0], return_counts=True)
        attempts.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
        note("results", i + 1, len(res_metas), rows_ok)
    lat_sorted = np.sort(_cat(latency, np.float32))
    del latency

    failed_ids = _SeenIds()
    by_type: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    messages: Counter[tuple[str, str]] = Counter()
    retryable = duplicates = rows_failed = 0
    fail_metas = _newest_first(f"{output}/{FAILURES_DIR}")
    for i, (_, got) in enumerate(_read_ahead(_read_failures, fail_metas)):
        rows_failed += got["n"]
        duplicates += got["duplicates"]
        new = _first_unseen(got["hashes"], ok_ids, failed_ids)  # answered after all, or an older copy
        failed_ids.add(got["hashes"][new])
        if new.any():
            rows = pa.concat_tables(got["rows"]).filter(pa.array(new))
            for etype, status, message, retry in zip(*(rows.column(c).to_pylist() for c in rows.column_names),
                                                     strict=True):
                etype = etype or "unknown"
                by_type[etype] += 1
                if status is not None:
                    by_status[str(status)] += 1
                retryable += bool(retry)
                messages[(etype, (message or "")[:160])] += 1
            if len(messages) > _MAX_MESSAGES:  # keep the common ones (an approximate top list)
                messages = Counter(dict(messages.most_common(_MAX_MESSAGES // 10)))
        note("failures", i + 1, len(fail_metas), rows_failed)
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
        "tokens": dict(zip(TOKEN_KINDS, tokens.tolist(), strict=True)),
        "latency_ms": {
            "p50": _percentile(lat_sorted, 0.50),
            "p90": _percentile(lat_sorted, 0.90),
            "p99": _percentile(lat_sorted, 0.99),
            "max": round(float(lat_sorted[-1]), 1) if len(lat_sorted) else None,
        },
        "latency_histogram": _histogram(lat_sorted),
        "slowest": [{"custom_id": cid, "latency_ms": round(lat, 1), "attempts": att} for lat, cid, att in slow],
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "rows_written": {"results": rows_ok, "failures": rows_failed},
        "rows": rows_ok + rows_failed,
        "files": len(res_metas) + len(fail_metas),
    }


def _histogram(sorted_values: np.ndarray, bins: int = 40) -> dict[str, list[float]]:
    """Counts of ``sorted_values`` in ``bins`` log-spaced bins (ms) between the smallest and largest."""
    if not len(sorted_values):
        return {"edges_ms": [], "counts": []}
    lo, hi = max(float(sorted_values[0]), 0.1), max(float(sorted_values[-1]), 0.1)
    if hi <= lo * 1.0001:
        hi = lo * 1.01
    edges = np.geomspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(sorted_values, lo, hi), bins=edges)
    return {"edges_ms": [round(float(e), 2) for e in edges], "counts": counts.tolist()}


PRICE_KINDS = ("input", "cached_input", "output")


def cost(tokens: Mapping[str, int], prices: Mapping[str, float | None] | None) -> dict[str, float] | None:
    """What ``tokens`` cost at ``prices`` (per million tokens): input not cached, cached input (at
    the input price when no cached price is given), and output (completion, reasoning included).
    ``None`` when no price is given.

    Example:
        >>> cost({"prompt_tokens": 3_000_000, "cached_tokens": 1_000_000, "completion_tokens": 500_000},
        ...      {"input": 0.4, "cached_input": 0.08, "output": 1.0})
        {'input': 0.8, 'cached_input': 0.08, 'output': 0.5, 'total': 1.38}
        >>> cost({"prompt_tokens": 10}, {}) is None
        True
    """
    prices = prices or {}
    if all(prices.get(k) is None for k in PRICE_KINDS):
        return None
    p_in = prices.get("input") or 0.0
    p_cached = prices.get("cached_input")
    p_cached = p_in if p_cached is None else p_cached
    cached = int(tokens.get("cached_tokens") or 0)
    uncached = max(int(tokens.get("prompt_tokens") or 0) - cached, 0)
    parts = {"input": uncached * p_in / 1e6, "cached_input": cached * p_cached / 1e6,
             "output": int(tokens.get("completion_tokens") or 0) * (prices.get("output") or 0.0) / 1e6}
    parts["total"] = sum(parts.values())
    return {k: round(v, 6) for k, v in parts.items()}


def load_run_summary(output: str) -> dict[str, Any] | None:
    """``OUTPUT/summary.json`` (the job's own figures), or ``None`` when there is none.

    Example:
        >>> import tempfile
        >>> load_run_summary(tempfile.mkdtemp()) is None
        True
    """
    from apache_beam.io.filesystems import FileSystems

    path = FileSystems.join(output.rstrip("/"), "summary.json")
    try:
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as f:
            got = json.loads(f.read().decode())
    except Exception:  # noqa: BLE001 - a report without the run's figures is still a report
        return None
    return got if isinstance(got, dict) else None


def top_reasons(summary: dict[str, Any], n: int = 3) -> str:
    """The most common failure types, e.g. ``"rejected 12, deadline_exceeded 3"`` ("" when none).

    Example:
        >>> top_reasons({"failures_by_type": {"rejected": 12, "deadline_exceeded": 3}})
        'rejected 12, deadline_exceeded 3'
    """
    ranked = sorted(summary["failures_by_type"].items(), key=lambda kv: (-kv[1], kv[0]))  # ties: by name
    return ", ".join(f"{k} {v}" for k, v in ranked[:n])


def _money(x: float) -> str:
    return f"{x:,.4f}" if x < 100 else f"{x:,.2f}"


def format_text(s: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """The summary as a short human-readable text (``run``: the job's ``summary.json``, for the
    run's own figures; ``s["cost"]``, when set, is shown too).

    Example:
        >>> s = {"output": "o", "files": 1, "ids": 1, "ok": 1, "failed": 0, "failed_retryable": 0,
        ...      "rows_written": {"results": 1, "failures": 0}, "duplicate_rows": 0,
        ...      "tokens": {"total_tokens": 5}, "latency_ms": {"p50": 3.0}, "attempts": {"1": 1},
        ...      "failures_by_type": {}, "slowest": [{"custom_id": "a", "latency_ms": 3.0, "attempts": 1}]}
        >>> print(format_text(s).splitlines()[-1])
               3.0 ms  1 attempt(s)  a
    """
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
    if run:
        state = run.get("state", "done")
        lines.append(
            f"run:      {state}" + (" (or stopped: the job is not writing it any more)" if state == "running" else "")
            + f", wall {run.get('wall_seconds', 0):.1f} s, {run.get('requests', 0)} requests at "
            f"{run.get('requests_per_second', 0)} req/s, {run.get('tokens_per_second', 0)} tokens/s, "
            f"{run.get('retries', 0)} retries, paused {run.get('paused_seconds', 0)} s"
            + (f", {run['skipped_done']} ids skipped as done" if run.get("skipped_done") else ""))
    c = s.get("cost")
    if c:
        lines.append("cost:     " + "  ".join(f"{k} {_money(v)}" for k, v in c.items())
                     + "  (whole output, each id once; prices per million tokens)")
    if run and (run.get("cost") or {}).get("this_run"):
        lines.append("          this run " + _money(run["cost"]["this_run"]["total"]))
    if s["failures_by_type"]:
        lines.append("failures by type: " + ", ".join(f"{k} {v}" for k, v in s["failures_by_type"].items()))
        for m in s["top_failure_messages"]:
            lines.append(f"  {m['count']:>8}  {m['error_type']}: {m['message']}")
    if s.get("slowest"):
        lines.append("slowest requests:")
        for r in s["slowest"]:
            lines.append(f"  {r['latency_ms']:>8} ms  {r['attempts']} attempt(s)  {r['custom_id']}")
    return "\n".join(lines)


def prices_of(args: argparse.Namespace, run: dict[str, Any] | None) -> dict[str, float | None]:
    """The ``--price_*`` flags, else the prices the job recorded in ``summary.json``."""
    given = {k: getattr(args, f"price_{k}") for k in PRICE_KINDS}
    if any(v is not None for v in given.values()):
        return given
    recorded = ((run or {}).get("cost") or {}).get("prices_per_million") or {}
    return {k: recorded.get(k) for k in PRICE_KINDS}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arkbatch_beam.report OUTPUT_DIR [--json] [--top N] [--plot PNG] [--html PAGE] [--price_* P]``."""
    ap = argparse.ArgumentParser(prog="python -m arkbatch_beam.report", description=__doc__.split("\n")[0])
    ap.add_argument("output", help="the job's --output folder (local or gs://)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--top", type=int, default=10, help="failure messages and slowest requests to list (1..1000)")
    ap.add_argument("--progress_seconds", type=float, default=5.0,
                    help="a progress line on stderr this often while it reads (0: none)")
    ap.add_argument("--plot", metavar="PNG", help="draw the figures into this PNG file (local or gs://)")
    ap.add_argument("--html", metavar="PAGE", help="write one self-contained HTML page (local or gs://)")
    for kind in PRICE_KINDS:
        ap.add_argument(f"--price_{kind}", type=float, default=None, metavar="P",
                        help=f"price of a million {kind.replace('_', ' ')} tokens (any currency)")
    args = ap.parse_args(argv)
    if not 1 <= args.top <= 1000:
        ap.error(f"--top must be in 1..1000, got {args.top}")
    for kind in PRICE_KINDS:
        value = getattr(args, f"price_{kind}")
        if value is not None and not 0 <= value <= 1e6:
            ap.error(f"--price_{kind} must be in 0..1000000, got {value:g}")
    summary = summarize(args.output, top=args.top, progress_seconds=args.progress_seconds, slowest=args.top)
    if summary["files"] == 0:
        print(f"error: no Parquet output under {args.output}/{{results,failures}}", file=sys.stderr)
        return 2
    run = load_run_summary(args.output)
    prices = prices_of(args, run)
    summary["cost"] = cost(summary["tokens"], prices)
    if summary["cost"] is not None:
        summary["prices_per_million"] = prices
    if args.plot or args.html:
        from . import _plots  # matplotlib: only when a figure is asked for

        if args.plot:
            _write(args.plot, _plots.png(summary, run))
        if args.html:
            from . import _html

            _write(args.html, _html.page(summary, run).encode())
    print(json.dumps({**summary, "run": run}, indent=2) if args.json else format_text(summary, run))
    return 0


def _write(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(data)


if __name__ == "__main__":
    sys.exit(main())
