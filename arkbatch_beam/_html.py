"""The report as one self-contained HTML page: the figures embedded as base64 PNGs, the tables
inline, no script or style fetched from anywhere (it opens offline, from a mail attachment or a
bucket).

Example:
    >>> s = {"output": "out", "ids": 1, "ok": 1, "failed": 0, "failures_by_type": {}, "tokens": {},
    ...      "latency_ms": {}, "attempts": {"1": 1}, "rows_written": {"results": 1, "failures": 0}}
    >>> html = page(s, None, figures=[("latency", b"\\x89PNG")])
    >>> html.count('<img class="figure"'), "http://" in html or "https://" in html
    (1, False)
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1480px;
color:#1d2733;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea}
.sub{color:#5c6b7a;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #dde3ea;border-radius:8px;padding:10px 16px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#5c6b7a;font-size:12px}
.ok b{color:#2a9d8f}.bad b{color:#e76f51}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:16px}
.figure{width:100%;height:auto;border:1px solid #dde3ea;border-radius:8px}
table{border-collapse:collapse;margin:4px 0}td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top}
th{color:#5c6b7a;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;word-break:break-all}
"""

# Marks how many embedded figures the browser decoded (the page's test reads it; harmless elsewhere).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), n = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) n++; }
  document.body.setAttribute('data-figures-loaded', String(n));
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return _e("" if x is None else x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.6g}" if abs(x) < 1e6 else f"{x:,.0f}"
    return _e(x)


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_num(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _card(label: str, value: Any, cls: str = "") -> str:
    return f'<div class="card {cls}"><b>{_num(value)}</b><span>{_e(label)}</span></div>'


def page(s: dict[str, Any], run: dict[str, Any] | None, figures: list[tuple[str, bytes]] | None = None) -> str:
    """The page for :func:`~arkbatch_beam.report.summarize`'s figures ``s`` and the job's
    ``summary.json`` ``run`` (or ``None``); ``figures`` default to the four panels as PNGs."""
    if figures is None:
        from ._plots import panel_pngs

        figures = panel_pngs(s, run)
    run = run or {}
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
             f"<title>arkbatch report: {_e(s.get('output', ''))}</title><style>{_CSS}</style>"
             f"<script>{_SCRIPT}</script></head><body>"]
    made = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<h1>arkbatch report</h1><div class=\"sub\"><code>{_e(s.get('output', ''))}</code> &middot; "
                 f"{_e(s.get('files', 0))} files &middot; made {made}"
                 + (f" &middot; job state: {_e(run['state'])}" if run.get("state") else "") + "</div>")
    tok = s.get("tokens") or {}
    cards = [_card("ids", s.get("ids", 0)), _card("ok", s.get("ok", 0), "ok"),
             _card("failed", s.get("failed", 0), "bad" if s.get("failed") else ""),
             _card("total tokens", tok.get("total_tokens", 0))]
    if s.get("cost"):
        cards.append(_card("cost (whole output)", round(s["cost"]["total"], 4)))
    if run.get("wall_seconds"):
        cards += [_card("wall seconds", round(run["wall_seconds"], 1)),
                  _card("requests / s", run.get("requests_per_second", 0)),
                  _card("tokens / s", run.get("tokens_per_second", 0))]
    parts.append('<div class="cards">' + "".join(cards) + "</div>")

    parts.append('<h2>Figures</h2><div class="figs">')
    for name, data in figures:
        b64 = base64.b64encode(data).decode()
        parts.append(f'<img class="figure" id="fig-{_e(name)}" alt="{_e(name)}" src="data:image/png;base64,{b64}">')
    parts.append("</div>")

    lat = s.get("latency_ms") or {}
    parts.append("<h2>Per id (each custom_id once, by its final state)</h2>")
    parts.append(_table([
        ("ok", s.get("ok", 0)), ("failed", s.get("failed", 0)),
        ("failed, retryable (re-run with --resume)", s.get("failed_retryable", 0)),
        ("duplicate_custom_id rows", s.get("duplicate_rows", 0)),
        ("rows written: results", (s.get("rows_written") or {}).get("results", 0)),
        ("rows written: failures", (s.get("rows_written") or {}).get("failures", 0)),
        *((f"latency {k} (ms)", v) for k, v in lat.items() if v is not None),
        *((f"tokens: {k.replace('_tokens', '')}", v) for k, v in tok.items()),
    ]))
    if s.get("attempts"):
        parts.append("<h2>Attempts per answered id</h2>"
                     + _table([(f"{k} attempt(s)", v) for k, v in s["attempts"].items()], ("attempts", "ids")))
    if s.get("cost"):
        prices = s.get("prices_per_million") or {}
        this_run = (run.get("cost") or {}).get("this_run") or {}
        parts.append("<h2>Cost</h2>" + _table(
            [(k, prices.get(k, ""), v, this_run.get(k, "")) for k, v in s["cost"].items()],
            ("part", "price per million tokens", "whole output (each id once)", "this run")))
    if s.get("failures_by_type"):
        parts.append("<h2>Failures</h2>" + _table(list(s["failures_by_type"].items()), ("error_type", "ids")))
        if s.get("failures_by_http_status"):
            parts.append(_table(list(s["failures_by_http_status"].items()), ("HTTP status", "ids")))
        if s.get("top_failure_messages"):
            parts.append(_table([(m["count"], m["error_type"], m["message"]) for m in s["top_failure_messages"]],
                                ("count", "error_type", "message")))
    if s.get("slowest"):
        parts.append("<h2>Slowest requests</h2>" + _table(
            [(r["custom_id"], r["latency_ms"], r["attempts"]) for r in s["slowest"]],
            ("custom_id", "latency (ms)", "attempts")))
    if run:
        keys = ("state", "wall_seconds", "requests", "requests_per_second", "tokens_per_second", "retries",
                "paused_seconds", "throttled_seconds", "skipped_done", "started_at", "updated_at")
        parts.append("<h2>The run (summary.json)</h2>" + _table([(k, run[k]) for k in keys if k in run]))
        if run.get("config"):
            parts.append("<h2>Configuration</h2>" + _table(
                [(k, v if isinstance(v, (int, float, str)) else json.dumps(v)) for k, v in
                 {**run.get("options", {}), **run["config"]}.items()]))
        if run.get("versions"):
            parts.append("<h2>Versions</h2>" + _table(list(run["versions"].items())))
    parts.append("</body></html>")
    return "\n".join(parts)
