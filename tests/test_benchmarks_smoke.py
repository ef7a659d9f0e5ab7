"""The benchmark entry point with tiny N, so it cannot rot (figures are not asserted: timing
goals belong to ``python -m benchmarks.run``, which prints them)."""

import json

from benchmarks import run


def test_benchmark_quick_run_measures_every_core_contender(tmp_path, capsys):
    out = tmp_path / "bench.json"
    names = ["bare_aiohttp", "our_client", "our_pipeline"]
    assert run.main(["--quick", "--only", ",".join(names), "--latency", "0,0.05", "--n", "200",
                     "--memory-ns", "100,300", "--max-wait", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] and report["machine"]["apache-beam"]
    for lat, n in ((0.0, 200), (0.05, 40)):  # latency 0: --n; server-bound: 2 waves of C=20
        runs = {r["contender"]: r for r in report["runs"] if r["latency_s"] == lat}
        assert sorted(runs) == sorted(names), runs
        for r in runs.values():
            assert "error" not in r, r
            assert r["completed"] == n and r["req_per_s"] > 0 and r["peak_rss_mb"] > 0
            assert r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"]
            assert (lat == 0) == ("ratio_cl" not in r)
    mem = sorted((m["contender"], m["n_requested"], m["completed"]) for m in report["memory"])
    assert mem == sorted((c, n, n) for c in names for n in (100, 300))
    goals = {g["goal"]: g for g in report["goals"]}
    assert "our client >= 0.8 x bare aiohttp (latency 0)" in goals
    assert any(g.startswith("pipeline JSONL->Parquet") for g in goals)
    assert "== goals" in capsys.readouterr().out
