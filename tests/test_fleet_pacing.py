"""Pacing a fleet: Beam's throttling counter, a fleet-wide RateLimiter shared by processes,
and the token budget against the fake server."""

import fcntl
import json
import os
import threading

import apache_beam as beam
from apache_beam.io.components.rate_limiter import RateLimiter
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from arkbatch_beam import NAMESPACE, BatchChatInference, ChatRequest, ClientConfig, Endpoint, _runtime
from arkbatch_beam.testing import Fault

from .conftest import KEY_ENV


def endpoint(server):
    return Endpoint("ep-fleet", base_url=server.base_url, api_key_env=KEY_ENV)


def lines(n, prefix="q"):
    body = {"messages": [{"role": "user", "content": ""}]}
    out = []
    for i in range(n):
        body["messages"][0]["content"] = f"{prefix} {i}"
        out.append(json.dumps({"custom_id": f"{prefix}-{i}", "body": body}))
    return out


def counters(result):
    got = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    out = {}
    for c in got:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + c.committed
    return out


def test_time_paused_by_the_server_reaches_beams_cumulative_throttling_seconds(server):
    # 503s with Retry-After: 2 (overloaded: everyone waits) to the first requests pause the
    # process for 2 s; that time is reported on the counter Dataflow's autoscaler reads.
    server.add_fault(Fault.server_error(503, times=4, headers={"Retry-After": "2"}))
    with beam.Pipeline() as p:
        rows = p | beam.Create(lines(20)) | BatchChatInference(endpoint(server), max_concurrency=4)
        _ = rows | beam.Map(lambda r: None)
    got = counters(p.result)
    assert got["throttled_seconds"] == got["cumulativeThrottlingSeconds"] > 0 and got["paused_seconds"] > 0
    assert got["ok"] == 20


class FileRateLimiter(RateLimiter):
    """A tiny fleet-wide limiter: a permit count in a file, shared by every process that opens it.

    ``allow()`` takes one permit under an exclusive lock and records which process asked. (A real
    fleet would use Beam's EnvoyRateLimiter and an Envoy rate-limit service.)
    """

    def __init__(self, path):
        super().__init__(namespace="test_limiter")
        self.path = path
        self.denied = threading.Event()  # (in this process only: a test's hook)

    def allow(self, **kwargs):
        with open(self.path, "r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            state = json.load(f)
            if state["left"] <= 0:
                self.denied.set()
                return False
            state["left"] -= 1
            state["by_pid"][str(os.getpid())] = state["by_pid"].get(str(os.getpid()), 0) + 1
            f.seek(0)
            f.truncate()
            json.dump(state, f)
            return True


def test_a_rate_limiter_shared_by_worker_processes_is_asked_for_every_request(server, tmp_path):
    path = tmp_path / "permits.json"
    path.write_text(json.dumps({"left": 1000, "by_pid": {}}))
    server.add_fault(Fault.server_error(500, match="q 3"))  # one retry: it asks for a permit too
    options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    with beam.Pipeline(options=options) as p:
        rows = (p | beam.Create(lines(40))
                | BatchChatInference(endpoint(server), max_concurrency=4, rate_limiter=FileRateLimiter(str(path))))
        _ = rows | beam.Map(lambda r: None)
    state = json.loads(path.read_text())
    assert server.total_requests == 41  # 40 requests and one retry
    # Every attempt took a permit first; a process may have asked for one more while its last
    # request waited (a permit is fetched while another caller is refused).
    assert server.total_requests <= 1000 - state["left"] <= server.total_requests + 2
    assert os.getpid() not in map(int, state["by_pid"])  # asked in the worker processes


def test_a_rate_limiter_that_denies_holds_sends_until_it_allows(server, tmp_path):
    # No permits at first: nothing is sent; permits come: everything goes, once each.
    path = tmp_path / "permits.json"
    path.write_text(json.dumps({"left": 0, "by_pid": {}}))
    limiter = FileRateLimiter(str(path))
    cfg = ClientConfig(endpoint(server), max_concurrency=4, progress_seconds=0)
    rt = _runtime.acquire(cfg, limiter)
    try:
        futures = [rt.submit(ChatRequest(f"id-{i}", {"messages": [{"role": "user", "content": f"x {i}"}]}))
                   for i in range(5)]
        assert limiter.denied.wait(30) and server.total_requests == 0  # asked, denied: none sent
        path.write_text(json.dumps({"left": 5, "by_pid": {}}))
        assert all(f.result(30).ok for f in futures)
    finally:
        _runtime.release(rt)
    assert server.total_requests == 5 and json.loads(path.read_text())["left"] == 0


def test_tokens_per_minute_budget_spreads_requests_and_is_corrected_from_usage(server):
    # A budget of 6,000 tokens/min (a bucket of 1,000) and requests estimated at ~530 tokens
    # each: only two go at once; the rest wait for the bucket, and the answers' usage (a few
    # tokens each) gives most of the estimate back, so they do not wait long.
    cfg = ClientConfig(endpoint(server), max_concurrency=8, max_tokens_per_minute=6000, progress_seconds=0)
    rt = _runtime.acquire(cfg)
    try:
        futures = [rt.submit(ChatRequest(f"id-{i}", {"messages": [{"role": "user", "content": f"x {i}"}]}))
                   for i in range(6)]
        assert all(f.result(60).ok for f in futures)
        gate = rt.client.gate("ep-fleet")
        assert gate.budget_waits >= 1  # some had to wait for the budget
        assert server.peak_in_flight <= 2  # the bucket's 1,000 tokens let two ~530-token requests go
    finally:
        _runtime.release(rt)
