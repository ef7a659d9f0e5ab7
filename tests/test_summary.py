"""summary.json: every field against a run with known faults and known token counts, the cost of
a resumed output counted once per id, and the launcher's running summary (as a kill leaves it)."""

import glob
import json
import logging
import os

import pyarrow.parquet as pq
import pytest

from arkbatch_beam import OUTPUT_SCHEMA, ChatResult, JobProgress
from arkbatch_beam._client import ClientStats
from arkbatch_beam._progress import Tally
from arkbatch_beam._sink import write_parquet_atomic
from arkbatch_beam.report import cost, summarize
from arkbatch_beam.testing import Fault
from pipelines import batch_chat

from .conftest import KEY, KEY_ENV, write_jsonl

# The fake server's answers to "p <i>" from model "ep-thinking-1": usage counts words.
PROMPT, COMPLETION, REASONING = 2, 3, 4  # "p 7"; "echo: p 7"; "thinking about: p 7"
PRICES = {"input": 0.4, "cached_input": 0.1, "output": 1.2}
PRICE_FLAGS = ["--price_input", "0.4", "--price_cached_input", "0.1", "--price_output", "1.2"]


def argv(server, inp, out, *extra):
    return ["--input", inp, "--output", out, "--model", "ep-thinking-1", "--base_url", server.base_url,
            "--api_key_env", KEY_ENV, "--max_concurrency", "8", "--timeout", "60", *PRICE_FLAGS, *extra]


def load(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def tokens(n):
    return {"prompt_tokens": n * PROMPT, "completion_tokens": n * COMPLETION,
            "total_tokens": n * (PROMPT + COMPLETION), "cached_tokens": 0, "reasoning_tokens": n * REASONING}


def test_summary_json_holds_every_figure_true_to_the_rows(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="arkbatch_beam")
    server.add_fault(Fault.rate_limited("0.05", match="p 2"))  # one 429, then answered: 2 attempts
    server.add_fault(Fault.bad_request("refused by policy", match="p 4"))  # a 400: failed, 1 attempt
    inp = write_jsonl(tmp_path / "in.jsonl", 20, extra=["{broken"])  # a bad line: failed, never sent
    out = str(tmp_path / "out")
    assert batch_chat.main(argv(server, inp, out)) == 0
    s = load(out)
    assert (s["state"], s["written_by"]) == ("done", "launcher")
    # Per id, read back from the rows.
    assert (s["ids"], s["ok"], s["failed"]) == (21, 19, 2)
    assert s["failures_by_type"] == {"rejected": 1, "invalid_json": 1}
    assert s["failures_by_http_status"] == {"400": 1}
    assert s["tokens"] == tokens(19)
    assert s["attempts"] == {"1": 18, "2": 1}
    assert set(s["latency_ms"]) == {"p50", "p90", "p99", "max"} and s["latency_ms"]["max"] >= s["latency_ms"]["p50"]
    assert s["slowest"][0]["custom_id"] == "id-2" and s["slowest"][0]["attempts"] == 2  # it waited for a retry
    # This run, from the counters the progress line and the bar show.
    run = s["run"]
    assert (run["rows"], run["ok"], run["failed"], run["requests"], run["failed_before_send"]) == (21, 19, 2, 20, 1)
    assert run["http_status"] == {"200": 19, "400": 1}
    assert run["attempts"] == {"1": 19, "2": 1} and run["retries"] == 1 == s["retries"]
    assert run["failures_by_type"] == {"rejected": 1, "not_sent": 1}
    assert run["tokens"] == s["tokens"]
    lat = run["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] * 1.05  # (buckets: within 4.4 %)
    final = [r.getMessage() for r in caplog.records if "arkbatch progress" in r.getMessage()][-1]
    assert f"done={run['rows']} ok={run['ok']} failed={run['failed']} " in final
    # Rates and pacing.
    assert s["wall_seconds"] > 0 and s["requests_per_second"] == pytest.approx(20 / s["wall_seconds"], abs=0.1)
    assert s["tokens_per_second"] == pytest.approx(19 * (PROMPT + COMPLETION) / s["wall_seconds"], rel=0.02)
    assert s["requests"] == 20 and s["paused_seconds"] == 0  # a lone 400 pauses nothing
    # Cost: this run's and the whole output's (the same here: one run).
    expected = cost(tokens(19), PRICES)
    assert expected is not None and expected["total"] == round((38 * 0.4 + 57 * 1.2) / 1e6, 6)
    assert s["cost"] == {"prices_per_million": PRICES, "output": expected, "this_run": expected}
    # Configuration, versions, input, timeline; never the key.
    assert s["config"]["model"] == "ep-thinking-1" and s["options"]["price_output"] == 1.2
    assert s["options"]["runner"] == "DirectRunner" and s["config"]["max_concurrency"] == 8
    assert set(s["versions"]) == {"arkbatch-beam", "apache-beam", "aiohttp", "pyarrow", "python"}
    assert s["input"]["lines"] == 21 and s["resume"] == {"resumed": False, "retry_failed": False, "skipped_done": 0}
    assert s["timeline"][0][1] == 0 and s["timeline"][-1][1:4] == [21, 19, 2]
    with open(os.path.join(out, "summary.json"), "rb") as f:
        assert KEY.encode() not in f.read()
    assert not glob.glob(os.path.join(out, ".tmp-*"))
    # The report reads the same per-id figures.
    r = summarize(out)
    assert (r["ok"], r["failed"], r["tokens"]) == (s["ok"], s["failed"], s["tokens"])


def test_tokens_and_cost_across_a_kill_and_resume_count_each_id_once(server, tmp_path):
    out = str(tmp_path / "out")
    # A first run that got through 10 of the 20 prompts (then was killed: its parts stay).
    first = write_jsonl(tmp_path / "first.jsonl", 10)
    assert batch_chat.main(argv(server, first, out, "--no_compact")) == 0
    # A kill during a bundle retry leaves a second copy of some rows in another part.
    part = sorted(glob.glob(os.path.join(out, "results", "*.parquet")))[0]
    copies = pq.read_table(part).slice(0, 3).to_pylist()
    write_parquet_atomic(copies, os.path.join(out, "results"), OUTPUT_SCHEMA)
    assert summarize(out)["rows_written"]["results"] == 13

    both = write_jsonl(tmp_path / "all.jsonl", 20)
    assert batch_chat.main(argv(server, both, out, "--resume")) == 0
    s = load(out)
    assert (s["ok"], s["failed"], s["skipped_done"], s["resume"]["skipped_done"]) == (20, 0, 10, 10)
    assert s["tokens"] == tokens(20)  # each id once, whichever run (or copy) wrote it
    assert s["run"]["tokens"] == tokens(10)  # this run sent the other 10 only
    assert s["cost"]["output"] == cost(tokens(20), PRICES)
    assert s["cost"]["this_run"] == cost(tokens(10), PRICES)
    assert len(s["previous_runs"]) == 1 and s["previous_runs"][0]["tokens"] == tokens(10)
    assert s["previous_runs"][0]["cost"] == pytest.approx(cost(tokens(10), PRICES)["total"])
    assert sum(s["attempts"].values()) == 20


def test_the_running_summary_is_what_a_killed_job_leaves(server, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    inp = write_jsonl(tmp_path / "in.jsonl", 3)
    args, beam_args = batch_chat.build_parser().parse_known_args(argv(server, inp, out))
    job = batch_chat.configure(args, beam_args)
    progress = JobProgress()
    progress.set_total(3)
    live = batch_chat.LiveSummary(job, progress)
    live.sample()
    tally = Tally()
    for i in range(2):
        tally.add(ChatResult(f"id-{i}", "ok", prompt_tokens=PROMPT, completion_tokens=COMPLETION,
                             total_tokens=PROMPT + COMPLETION, attempts=1, latency_ms=12.0))
    # What a runtime publishes a few times a second (the bar reads the same).
    progress.publish(1, ClientStats(ok=2, attempts=3, in_flight=1), tally)
    live.sample()
    batch_chat.save_summary(live.running())
    s = load(out)
    assert (s["state"], s["ok"], s["failed"], s["requests"]) == ("running", 2, 0, 2)
    assert s["run"]["in_flight"] == 1 and s["run"]["rows_to_do"] == 3
    assert s["tokens"]["total_tokens"] == 10 and s["cost"]["this_run"] == cost(s["run"]["tokens"], PRICES)
    assert [p[1] for p in s["timeline"]] == [0, 2]
    assert s["latency_ms"]["p50"] == pytest.approx(12.0, rel=0.05)
