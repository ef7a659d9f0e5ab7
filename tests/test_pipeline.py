"""BatchChatInference on the DirectRunner against the fake server."""

import os
import pickle

import apache_beam as beam
import pyarrow.dataset as ds
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from arkbatch_beam import OUTPUT_SCHEMA, BatchChatInference, ClientConfig, Endpoint, WriteResults, _runtime
from arkbatch_beam.testing import Fault

from .conftest import KEY, KEY_ENV


def endpoint(server, **kw):
    return Endpoint("ep-test", base_url=server.base_url, api_key_env=KEY_ENV, **kw)


def lines(n, prefix="q"):
    return [f'{{"custom_id": "c{i}", "body": {{"messages": [{{"role": "user", "content": "{prefix} {i}"}}]}}}}'
            for i in range(n)]


def test_every_id_exactly_once_with_answers(server, monkeypatch):
    made = []
    real_acquire = _runtime.acquire
    monkeypatch.setattr(_runtime, "acquire", lambda *a, **k: made.append(real_acquire(*a, **k)) or made[-1])
    server.add_fault(Fault.rate_limited("0.2", match="q 3"))
    server.add_fault(Fault.server_error(502, match="q 4"))
    server.add_fault(Fault.reset(match="q 5"))
    infer = BatchChatInference(endpoint(server), max_concurrency=8)
    with BeamTestPipeline() as p:
        rows = p | beam.Create(lines(50)) | infer
        assert_that(rows | beam.Map(lambda r: (r["custom_id"], r["status"], r["content"])),
                    equal_to([(f"c{i}", "ok", f"echo: q {i}") for i in range(50)]))
    assert server.attempts_by_key["q 3"] == 2 and server.attempts_by_key["q 5"] == 2
    # The last teardown closed the shared runtime it used. (Only ours: a RunInference handler's
    # runtime from another test lives as long as Beam's shared model, until it is collected.)
    assert made and all(rt.config == infer.config and not rt.alive for rt in made)


def test_bad_rows_and_rejections_go_to_failures(server):
    server.add_fault(Fault.bad_request("no such thing", match="q 1"))
    inputs = lines(3) + ["{not json", '{"custom_id": "e", "body": {"messages": []}}']
    with BeamTestPipeline() as p:
        ok, failed = (p | beam.Create(inputs)
                      | BatchChatInference(endpoint(server), max_concurrency=4).with_exception_handling())
        assert_that(ok | "okids" >> beam.Map(lambda r: r["custom_id"]), equal_to(["c0", "c2"]),
                    label="ok")
        assert_that(failed | beam.Map(lambda r: (r["error_type"], r["error_message"][:13])),
                    equal_to([("rejected", "no such thing"), ("invalid_json", "invalid JSON:"),
                              ("no_messages", "'messages' is")]), label="failed")


def test_process_wide_cap_holds_across_bundle_threads(server, tmp_path):
    server.latency = 0.01
    opts = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    with beam.Pipeline(options=opts) as p:
        _ = (p | beam.Create(lines(400)) | BatchChatInference(endpoint(server), max_concurrency=5)
             | WriteResults(str(tmp_path)))
    table = ds.dataset(str(tmp_path / "results"), format="parquet").to_table()
    assert table.num_rows == 400 and len(set(table.column("custom_id").to_pylist())) == 400
    assert server.peak_in_flight <= 5
    assert server.peak_in_flight >= 2  # the window really was used


def test_global_pause_is_honoured_end_to_end(server):
    server.pause(1.0, retry_after_form="float")
    with BeamTestPipeline() as p:
        rows = p | beam.Create(lines(60)) | BatchChatInference(endpoint(server), max_concurrency=10)
        assert_that(rows | beam.Map(lambda r: r["status"]), equal_to(["ok"] * 60))
    # Only requests that were already in flight when the pause was discovered arrived in it.
    assert server.requests_during_pause <= 10
    assert server.ok_responses == 60


def test_results_written_with_the_one_schema(server, tmp_path):
    with BeamTestPipeline() as p:
        _ = (p | beam.Create(lines(20) + ["{bad"]) | BatchChatInference(endpoint(server))
             | WriteResults(str(tmp_path), max_rows=7))
    res = ds.dataset(str(tmp_path / "results"), format="parquet").to_table()
    fail = ds.dataset(str(tmp_path / "failures"), format="parquet").to_table()
    assert res.schema.equals(OUTPUT_SCHEMA) and fail.schema.equals(OUTPUT_SCHEMA)
    assert res.num_rows == 20 and fail.num_rows == 1
    assert len(list((tmp_path / "results").glob("part-*.parquet"))) >= 3  # parts of <= 7 rows
    assert not list(tmp_path.rglob(".tmp-*"))
    row = [r for r in res.to_pylist() if r["custom_id"] == "c7"][0]
    assert row["prompt_tokens"] == 2 and row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["attempts"] == 1 and row["response_json"] and row["request_json"] is None


def test_key_never_in_pickled_transform_or_pipeline_proto(server):
    t = BatchChatInference(endpoint(server), max_concurrency=3)
    assert KEY.encode() not in pickle.dumps(t)
    p = beam.Pipeline()
    _ = p | beam.Create(["x"]) | t
    proto = p.to_runner_api().SerializeToString()
    assert KEY.encode() not in proto and KEY_ENV.encode() in proto  # the name, never the value
    assert KEY not in repr(t) and KEY not in str(t.display_data())


def test_plain_string_endpoint_means_ark_defaults():
    t = BatchChatInference("ep-abc")
    assert t.config.endpoint.url == "https://ark.cn-beijing.volces.com/api/v3/batch/chat/completions"
    assert t.config.endpoint.api_key_env == "ARK_API_KEY"
    with pytest.raises(ValueError, match="max_concurrency must be in 1..10000"):
        BatchChatInference("ep-abc", max_concurrency=0)


def test_missing_key_fails_the_pipeline_clearly(monkeypatch, server):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(Exception, match=f"environment variable {KEY_ENV} is not set"):
        with BeamTestPipeline() as p:
            _ = p | beam.Create(lines(2)) | BatchChatInference(endpoint(server))


def test_same_config_shares_one_runtime(server):
    cfg = ClientConfig(endpoint(server), max_concurrency=2)
    a, b = _runtime.acquire(cfg), _runtime.acquire(cfg)
    try:
        assert a is b and _runtime._registry[(os.getpid(), cfg)][1] == 2
    finally:
        _runtime.release(a)
        _runtime.release(b)
    assert (os.getpid(), cfg) not in _runtime._registry and not a.alive


@pytest.mark.parametrize("dedupe", [True, False])
def test_library_pipeline_writes_parts_while_inference_runs(server, tmp_path, dedupe):
    """ReadFromText | BatchChatInference | WriteResults: rows reach Parquet parts while later
    requests are still being sent (nothing in between holds them all until the end)."""
    from arkbatch_beam._sink import part_files

    out = str(tmp_path / "out")
    parts_seen: dict[int, int] = {}

    def look(total):  # in the server thread, as request `total` arrives
        if total in (150, 250):
            parts_seen[total] = len(part_files(f"{out}/results")) + len(part_files(f"{out}/failures"))

    server.on_request(look)
    with beam.Pipeline() as p:
        _ = (p | beam.Create([*lines(300), "{bad"])
             | BatchChatInference(endpoint(server), max_concurrency=4, max_pending=8, dedupe=dedupe)
             | WriteResults(out, max_rows=10))
    # Request 150 can only be sent once 142 answers came back (at most 8 pending), and each
    # answer is written before the DoFn asks for more: at least 14 parts of 10 are on disk.
    assert parts_seen[150] >= 14 and parts_seen[250] >= 24, parts_seen
    rows = ds.dataset(out, format="parquet").to_table().to_pylist()
    assert sorted(r["custom_id"] for r in rows if r["status"] == "ok") == sorted(f"c{i}" for i in range(300))
    assert [r["error_type"] for r in rows if r["status"] == "failed"] == ["invalid_json"]
