"""The report's figures (matplotlib, Agg: no display needed): throughput over time, the latency
histogram, failures by type and tokens by kind.

They are drawn from :func:`arkbatch_beam.report.summarize`'s figures (per id, from the output
rows) and, for throughput over time, from the ``timeline`` the launcher records in
``summary.json`` while the job runs (the rows carry no timestamp of their own: one sample a
second of rows done, ok, failed and tokens, from the same counters as the progress bar).

Example:
    >>> s = {"output": "out", "ids": 3, "ok": 2, "failed": 1, "failures_by_type": {"rejected": 1},
    ...      "tokens": {"prompt_tokens": 10, "completion_tokens": 6, "cached_tokens": 2, "reasoning_tokens": 0},
    ...      "latency_ms": {"p50": 20.0, "p90": 30.0, "p99": 30.0, "max": 30.0},
    ...      "latency_histogram": {"edges_ms": [10.0, 20.0, 40.0], "counts": [1, 1]}}
    >>> data = png(s, {"timeline": [[0, 0, 0, 0, 0], [1, 2, 1, 1, 8], [2, 3, 2, 1, 16]]})
    >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_OK, _FAIL, _ACCENT, _GREY = "#2a9d8f", "#e76f51", "#264653", "#8d99ae"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color=_GREY, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def throughput(ax: Any, s: dict[str, Any], run: dict[str, Any] | None) -> None:
    """Rows done per second over the run (and the running total), from ``summary.json``'s timeline."""
    ax.set_title("Throughput over time", loc="left", fontweight="bold")
    timeline = (run or {}).get("timeline") or []
    if len(timeline) < 2:
        _empty(ax, "no timeline: summary.json holds one when the job\n"
                   "ran with a launcher that waited (python -m pipelines.batch_chat)")
        return
    data = np.asarray(timeline, dtype=float)
    t, done, failed = data[:, 0], data[:, 1], data[:, 3]
    dt = np.maximum(np.diff(t), 1e-9)
    mid = (t[1:] + t[:-1]) / 2
    rate = np.diff(done) / dt
    frate = np.diff(failed) / dt
    ax.fill_between(mid, rate, step="mid", color=_OK, alpha=0.35)
    ax.plot(mid, rate, drawstyle="steps-mid", color=_OK, label="rows/s (ok + failed)")
    if frate.any():
        ax.plot(mid, frate, drawstyle="steps-mid", color=_FAIL, label="failed/s")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("rows per second")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    total = ax.twinx()
    total.plot(t, done, color=_ACCENT, linestyle="--", linewidth=1.2, label="rows done (total)")
    total.set_ylabel("rows done")
    total.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = total.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=9)
    wall = (run or {}).get("wall_seconds") or t[-1]
    if wall:
        ax.set_title(f"Throughput over time (average {done[-1] / wall:.1f} rows/s over {wall:.0f} s)",
                     loc="left", fontweight="bold")


def latency(ax: Any, s: dict[str, Any], run: dict[str, Any] | None = None) -> None:
    """Answered requests by latency (first send to answer, retries included; log scale)."""
    ax.set_title("Latency of answered requests", loc="left", fontweight="bold")
    hist = s.get("latency_histogram") or {}
    edges, counts = hist.get("edges_ms") or [], hist.get("counts") or []
    if not counts or not sum(counts):
        _empty(ax, "no answered request yet")
        return
    widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=_OK, edgecolor="white", linewidth=0.5)
    if edges[-1] / max(edges[0], 1e-9) > 20:
        ax.set_xscale("log")
    marks = s.get("latency_ms") or {}
    for (name, color) in (("p50", _ACCENT), ("p90", "#f4a261"), ("p99", _FAIL)):
        v = marks.get(name)
        if v is not None:
            ax.axvline(v, color=color, linestyle="--", linewidth=1.2, label=f"{name} {v:g} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)


def failures(ax: Any, s: dict[str, Any], run: dict[str, Any] | None = None) -> None:
    """Failed ids by error type (each id once, by its final state), beside the ok count."""
    ax.set_title("Outcome by type (each id once)", loc="left", fontweight="bold")
    by_type = list((s.get("failures_by_type") or {}).items())[:10]
    names = ["ok"] + [k for k, _ in by_type]
    values = [s.get("ok", 0)] + [v for _, v in by_type]
    if not any(values):
        _empty(ax, "no rows yet")
        return
    y = list(range(len(names)))[::-1]
    bars = ax.barh(y, values, color=[_OK] + [_FAIL] * len(by_type))
    ax.set_yticks(y, names)
    ax.set_xscale("symlog" if max(values) > 50 * max(min(v for v in values if v) or 1, 1) else "linear")
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,}", va="center", fontsize=9)
    ax.set_xlabel("ids")
    ax.margins(x=0.15)
    if not by_type:
        ax.text(0.98, 0.05, "no failures", transform=ax.transAxes, ha="right", color=_OK, fontsize=11)


def tokens(ax: Any, s: dict[str, Any], run: dict[str, Any] | None = None) -> None:
    """Tokens by kind (each answered id once): input not cached, cached input, output, reasoning."""
    ax.set_title("Tokens by kind (each id once)", loc="left", fontweight="bold")
    t = s.get("tokens") or {}
    cached = int(t.get("cached_tokens") or 0)
    kinds = [("input (not cached)", max(int(t.get("prompt_tokens") or 0) - cached, 0), _ACCENT),
             ("input (cached)", cached, "#a8dadc"),
             ("output", int(t.get("completion_tokens") or 0), _OK),
             ("of which reasoning", int(t.get("reasoning_tokens") or 0), "#f4a261")]
    if not any(v for _, v, _ in kinds):
        _empty(ax, "no tokens yet")
        return
    y = list(range(len(kinds)))[::-1]
    bars = ax.barh(y, [v for _, v, _ in kinds], color=[c for _, _, c in kinds])
    ax.set_yticks(y, [k for k, _, _ in kinds])
    for bar, (_, v, _) in zip(bars, kinds, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {_si(v)}", va="center", fontsize=9)
    ax.set_xlabel("tokens")
    ax.margins(x=0.15)
    c = s.get("cost")
    if c:
        ax.text(0.98, 0.05, f"cost {c['total']:,.4g} (prices per million tokens)", transform=ax.transAxes,
                ha="right", fontsize=9, color=_ACCENT)


PANELS: tuple[tuple[str, Callable[[Any, dict[str, Any], dict[str, Any] | None], None]], ...] = (
    ("throughput", throughput), ("latency", latency), ("failures", failures), ("tokens", tokens))


def _title(s: dict[str, Any]) -> str:
    return (f"{s.get('output', '')}:  {s.get('ids', 0):,} ids, {s.get('ok', 0):,} ok, "
            f"{s.get('failed', 0):,} failed")


def _save(fig: Figure, fmt: str) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    return buf.getvalue()


def png(s: dict[str, Any], run: dict[str, Any] | None = None) -> bytes:
    """One PNG (1400 x 900 px) with the four panels."""
    fig = Figure(figsize=(14, 9), layout="constrained")
    fig.suptitle(_title(s), fontsize=13, fontweight="bold")
    for ax, (_, draw) in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        draw(ax, s, run)
    return _save(fig, "png")


def panel_pngs(s: dict[str, Any], run: dict[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """Each panel as its own PNG (700 x 450 px), for the HTML page: ``[(name, png bytes)]``."""
    out = []
    for name, draw in PANELS:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        draw(fig.subplots(), s, run)
        out.append((name, _save(fig, "png")))
    return out
