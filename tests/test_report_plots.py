"""The report's figures: one real PNG of sensible size with four panels, and one self-contained
HTML page that a real headless browser (Debian's chromium) opens with its figures decoded."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from arkbatch_beam import OUTPUT_SCHEMA, ChatResult
from arkbatch_beam._sink import write_parquet_atomic
from arkbatch_beam.report import main


def make_output(tmp_path):
    out = str(tmp_path / "out")
    rng = np.random.default_rng(7)
    ok = [ChatResult(f"a{i}", "ok", prompt_tokens=100, completion_tokens=40, total_tokens=140, cached_tokens=30,
                     reasoning_tokens=10, attempts=1 + (i % 7 == 0),
                     latency_ms=float(rng.lognormal(6, 0.6))).to_row() for i in range(400)]
    write_parquet_atomic(ok, out + "/results", OUTPUT_SCHEMA)
    bad = ([ChatResult.failure(f"b{i}", "rejected", "policy", http_status=400).to_row() for i in range(12)]
           + [ChatResult.failure(f"c{i}", "deadline_exceeded", "late", retryable=True).to_row() for i in range(5)])
    write_parquet_atomic(bad, out + "/failures", OUTPUT_SCHEMA)
    # What the launcher recorded while the job ran: rows done over time.
    timeline = [[t, min(417, int(t * 40 + 3 * np.sin(t))), 0, 0, 0] for t in range(12)]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"state": "done", "wall_seconds": 11.0, "requests": 417, "requests_per_second": 37.9,
                   "tokens_per_second": 5090.9, "retries": 58, "paused_seconds": 0, "timeline": timeline,
                   "cost": {"prices_per_million": {"input": 0.4, "cached_input": 0.08, "output": 1.0}},
                   "config": {"model": "ep-x"}, "versions": {"python": "3.11"}}, f)
    return out


def test_the_text_report_has_cost_and_the_slowest_requests(tmp_path, capsys):
    out = make_output(tmp_path)
    assert main([out, "--top", "3"]) == 0
    text = capsys.readouterr().out
    # The prices summary.json recorded: 400 x (70 input, 30 cached, 40 output) tokens.
    total = 400 * (70 * 0.4 + 30 * 0.08 + 40 * 1.0) / 1e6
    assert f"total {total:,.4f}" in text and "whole output, each id once" in text
    assert "slowest requests:" in text and len(re.findall(r" ms  \d attempt\(s\)  a\d+", text)) == 3
    assert "run:      done, wall 11.0 s" in text
    assert main([out, "--json", "--price_input", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["cost"]["total"] == pytest.approx(400 * 100 / 1e6) and got["run"]["retries"] == 58


def test_the_png_is_a_real_image_with_four_panels(tmp_path):
    out = make_output(tmp_path)
    png = str(tmp_path / "report.png")
    assert main([out, "--plot", png]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1400, 900)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    # Every quarter holds a drawn panel: many non-white pixels, several colours.
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    for qy in (0, 1):
        for qx in (0, 1):
            quarter = pixels[qy * h:(qy + 1) * h, qx * w:(qx + 1) * w]
            ink = (quarter.sum(axis=2) < 600).mean()
            colours = len(np.unique(quarter.reshape(-1, 3), axis=0))
            assert ink > 0.02 and colours > 20, (qy, qx, ink, colours)


def test_the_html_page_is_self_contained(tmp_path):
    out = make_output(tmp_path)
    page = str(tmp_path / "report.html")
    assert main([out, "--html", page]) == 0
    with open(page, encoding="utf-8") as f:
        text = f.read()
    assert len(re.findall(r'<img class="figure" id="fig-\w+" alt="\w+" src="data:image/png;base64,', text)) == 4
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from a network
    assert "Slowest requests" in text and "deadline_exceeded" in text


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (scripts/test.sh installs Debian's)")
def test_the_html_page_renders_in_a_headless_browser(tmp_path):
    out = make_output(tmp_path)
    page = tmp_path / "report.html"
    assert main([out, "--html", str(page)]) == 0
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The page's load handler counts the figures the browser decoded.
    assert 'data-figures-loaded="4"' in dom, proc.stderr[-2000:]
    assert "arkbatch report" in dom and "Tokens by kind" not in dom  # (a figure's text is in its pixels)
