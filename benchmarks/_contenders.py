"""The contenders, each run in its own process by ``benchmarks.run``.

    python -m benchmarks._contenders NAME --base http://127.0.0.1:P --n N --c C \\
        --data prompts.jsonl --workdir DIR [--latency L] [--ca_bundle CA.pem] [--uvloop]

prints one line ``BENCH_RESULT {json}`` with the figures of the measured phase: completed
requests, wall seconds, req/s, CPU seconds of this process (every thread; for Ray the whole
process tree), CPU µs per request, peak RSS, p50/p99 latency (ms, send to answer).

Every contender sends the same body, ``{"model": "ep-bench", "messages": [{"role": "user",
"content": "prompt <i>"}]}``, with C requests in flight: the async ones run C worker
coroutines pulling from one shared iterator (a semaphore without N pending tasks, so memory
does not grow with N); the pipelines read the same prompts from a JSONL file.

Over HTTPS (``--base https://...``) every contender trusts the server's test CA given by
``--ca_bundle`` through its own documented option (an ``ssl.SSLContext`` with that CA, our
``--ca_bundle``, or ``SSL_CERT_FILE`` where a contender has no other); verification is never
turned off. ``--uvloop`` runs the asyncio contenders on uvloop's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._measure import LatencyHistogram, Meter, TreeSampler, peak_rss_mb

MODEL = "ep-bench"
KEY = "bench-key"


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"prompt {i}"}]}


def write_jsonl(path: str, n: int) -> None:
    """The pipelines' input: Ark batch JSONL, one request per line."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "body": body(i)}, separators=(",", ":")) + "\n")


BUDGET = [0.0]  # seconds after which the pool stops taking new requests (0 = none)


def _ssl_from(ca_bundle: str) -> Any:
    """A verifying client TLS context trusting only ``ca_bundle``'s CAs, or ``True`` (the
    library's default verifying context) without one. Workers build their own from the path:
    a context does not pickle."""
    if not ca_bundle:
        return True
    import ssl

    return ssl.create_default_context(cafile=ca_bundle)


def ssl_context(a: argparse.Namespace) -> Any:
    """The client TLS context of ``--ca_bundle`` (see :func:`_ssl_from`)."""
    return _ssl_from(a.ca_bundle)


async def _pool(n: int, c: int, one: Callable[[int], Any]) -> int:
    """Run ``one(i)`` for i in range(n) with ``c`` workers; returns how many returned True.

    With a time budget (``--budget``), workers stop taking new requests once it is spent and
    the ones in flight finish: a slow contender is measured on fewer requests, not skipped.
    """
    it: Iterator[int] = iter(range(n))
    ok = 0
    stop_at = time.perf_counter() + BUDGET[0] if BUDGET[0] > 0 else float("inf")
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal ok
        for i in it:
            if await one(i):
                ok += 1
            if perf() > stop_at:
                return

    await asyncio.gather(*(worker() for _ in range(min(c, n))))
    return ok


# -- 1. the Python floor --------------------------------------------------------------------
async def _bare_aiohttp(a: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import orjson

    url = a.base + "/api/v3/batch/chat/completions"
    hist = LatencyHistogram()
    perf = time.perf_counter
    connector = aiohttp.TCPConnector(limit=a.c, ssl=ssl_context(a))
    async with aiohttp.ClientSession(
        connector=connector, headers={"Content-Type": "application/json", "Authorization": "Bearer " + KEY}
    ) as session:

        async def one(i: int) -> bool:
            payload = orjson.dumps(body(i))
            t = perf()
            async with session.post(url, data=payload) as resp:
                data = await resp.read()
                status = resp.status
            hist.add((perf() - t) * 1000.0)
            return status == 200 and bool(orjson.loads(data)["choices"])

        with Meter() as m:
            ok = await _pool(a.n, a.c, one)
    return m.figures(ok, hist)


def bare_aiohttp(a: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_bare_aiohttp(a))


# -- 2. our async client --------------------------------------------------------------------
async def _our_client(a: argparse.Namespace, pacing: str = "adaptive") -> dict[str, Any]:
    from arkbatch_beam import ArkClient, ChatRequest, ClientConfig, Endpoint

    os.environ["BENCH_ARK_KEY"] = KEY
    cfg = ClientConfig(
        Endpoint(MODEL, base_url=a.base + "/api/v3", api_key_env="BENCH_ARK_KEY", ca_bundle=a.ca_bundle or None),
        max_concurrency=a.c,
        timeout=3600,
        pacing=pacing,
    )
    hist = LatencyHistogram()
    async with ArkClient(cfg) as client:

        async def one(i: int) -> bool:
            res = await client.complete(ChatRequest(f"r{i}", body(i)))
            if res.latency_ms is not None:
                hist.add(res.latency_ms)
            return res.ok

        with Meter() as m:
            ok = await _pool(a.n, a.c, one)
    return m.figures(ok, hist)


def our_client(a: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_our_client(a))


def our_client_fixed(a: argparse.Namespace) -> dict[str, Any]:
    """Our client with ``pacing="fixed"``: all C in flight at once, as Ark's Go SDK does (no
    adaptive window ramping up from 8)."""
    return asyncio.run(_our_client(a, pacing="fixed"))


# -- 3. our pipeline (JSONL -> Parquet on the DirectRunner) ---------------------------------
def _parquet_latencies(out: str, hist: LatencyHistogram) -> int:
    import pyarrow.dataset as ds

    if not os.path.isdir(os.path.join(out, "results")):
        return 0  # the pipeline wrote no answered row at all
    d = ds.dataset(os.path.join(out, "results"), format="parquet")
    rows = 0
    for batch in d.to_batches(columns=["latency_ms"]):
        col = batch.column(0).to_numpy(zero_copy_only=False)
        rows += len(col)
        hist.add_many(col)
    return rows


def _cli(a: argparse.Namespace, name: str, *extra: str) -> dict[str, Any]:
    import logging

    from pipelines.batch_chat import run

    os.environ["BENCH_ARK_KEY"] = KEY
    out = os.path.join(a.workdir, f"out-{name}-{os.getpid()}")
    argv = [
        "--input", a.data, "--output", out, "--model", MODEL,
        "--base_url", a.base + "/api/v3", "--api_key_env", "BENCH_ARK_KEY",
        "--max_concurrency", str(a.c), "--timeout", "3600",
        "--part_rows", "2000", "--no_compact", "--no_preflight", "--progress_seconds", "0", *extra,
    ]
    if a.ca_bundle:
        argv += ["--ca_bundle", a.ca_bundle]
    with Meter() as m:
        summary = run(argv)
    logging.getLogger().setLevel(logging.WARNING)
    fig = m.figures(summary["ok"])
    hist = LatencyHistogram()
    _parquet_latencies(out, hist)
    fig.update(hist.summary())
    fig["failed"] = summary["failed"]
    # First send to last answer (the pipeline's own marks): start-up, reading and the dedupe
    # shuffle before the first send are outside it, as Ray's start-up is outside its figure.
    if summary.get("sending_requests_per_second"):
        fig["sending_req_per_s"] = summary["sending_requests_per_second"]
        fig["sending_s"] = summary["sending_seconds"]
    return fig


def our_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    """``pipelines.batch_chat.run``: the real CLI (parse, dedupe by id, infer, Parquet parts)."""
    return _cli(a, "pipeline")


def our_pipeline_fused(a: argparse.Namespace) -> dict[str, Any]:
    """The CLI with ``--no_dedupe``: Read | Parse | Infer | WriteResults, all fused.

    On the DirectRunner a shuffle (dedupe's GroupByKey) holds the whole PCollection in
    memory; without one the stage streams, so this is the memory curve of our own code
    (client + DoFn + Parquet writer) rather than of the DirectRunner's shuffle.
    """
    return _cli(a, "fused", "--no_dedupe")


# -- 4. the official Ark Python SDK ---------------------------------------------------------
async def _ark_sdk(a: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from volcenginesdkarkruntime import AsyncArk

    http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=a.c, max_keepalive_connections=a.c),
        timeout=httpx.Timeout(3600.0, connect=60.0),
        verify=ssl_context(a),
    )
    client = AsyncArk(api_key=KEY, base_url=a.base + "/api/v3", timeout=3600, http_client=http)
    hist = LatencyHistogram()
    perf = time.perf_counter

    async def one(i: int) -> bool:
        t = perf()
        resp = await client.batch.chat.completions.create(model=MODEL, messages=body(i)["messages"])
        hist.add((perf() - t) * 1000.0)
        return bool(resp.choices[0].message.content)

    with Meter() as m:
        ok = await _pool(a.n, a.c, one)
    await client.close()
    return m.figures(ok, hist)


def ark_sdk(a: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_ark_sdk(a))


# -- 5. openai.AsyncOpenAI ------------------------------------------------------------------
async def _openai_async(a: argparse.Namespace) -> dict[str, Any]:
    import openai

    try:
        import httpx2 as hx  # openai >= 3 ships its own httpx fork
    except ImportError:  # pragma: no cover - openai 1.x/2.x
        import httpx as hx
    http = openai.DefaultAsyncHttpxClient(
        limits=hx.Limits(max_connections=a.c, max_keepalive_connections=a.c),
        timeout=hx.Timeout(3600.0, connect=60.0),
        verify=ssl_context(a),
    )
    client = openai.AsyncOpenAI(base_url=a.base + "/v1", api_key=KEY, http_client=http)
    hist = LatencyHistogram()
    perf = time.perf_counter

    async def one(i: int) -> bool:
        t = perf()
        resp = await client.chat.completions.create(model=MODEL, messages=body(i)["messages"])
        hist.add((perf() - t) * 1000.0)
        return bool(resp.choices[0].message.content)

    with Meter() as m:
        ok = await _pool(a.n, a.c, one)
    await client.close()
    return m.figures(ok, hist)


def openai_async(a: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_openai_async(a))


# -- 6. Beam's RemoteModelHandler pattern (sync client inside RunInference) ------------------
def beam_remote(a: argparse.Namespace) -> dict[str, Any]:
    """A ``RemoteModelHandler`` as Beam 2.77's Gemini/Anthropic handlers build one.

    ``create_client`` returns a synchronous SDK client (``openai.OpenAI``); ``request`` sends the
    batch's prompts one after the other (as ``anthropic_inference.message_from_string`` does),
    under RemoteModelHandler's retry decorator and ReactiveThrottler; RunInference batches with
    its defaults. Concurrency comes only from the runner's threads: ``--direct_num_workers``
    (``a.threads``) with ``--direct_running_mode=multi_threading`` behind a Reshuffle.
    """
    import apache_beam as beam
    from apache_beam.ml.inference.base import PredictionResult, RemoteModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from arkbatch_beam import WriteResults

    base_v1 = a.base + "/v1"
    ca_bundle = a.ca_bundle

    class ChatHandler(RemoteModelHandler):
        def __init__(self) -> None:
            super().__init__(namespace="BenchChatHandler", num_retries=5, throttle_delay_secs=5)

        def create_client(self) -> Any:
            import openai

            http = openai.DefaultHttpxClient(verify=_ssl_from(ca_bundle))
            return openai.OpenAI(base_url=base_v1, api_key=KEY, max_retries=0, http_client=http)

        def request(self, batch: Any, model: Any, inference_args: Any = None) -> Any:
            out = []
            for prompt in batch:
                t = time.perf_counter()
                resp = model.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
                out.append(
                    PredictionResult(
                        prompt,
                        {"content": resp.choices[0].message.content, "ms": (time.perf_counter() - t) * 1000},
                    )
                )
            return out

    def to_row(pr: Any) -> dict[str, Any]:
        return {"custom_id": pr.example, "status": "ok", "content": pr.inference["content"],
                "latency_ms": pr.inference["ms"], "attempts": 1}

    out = os.path.join(a.workdir, f"out-beamremote-{os.getpid()}")
    opts = PipelineOptions(
        direct_num_workers=a.threads, direct_running_mode="multi_threading" if a.threads > 1 else "in_memory"
    )
    with Meter() as m:
        with beam.Pipeline(options=opts) as p:
            _ = (
                p
                | beam.io.ReadFromText(a.data)
                | beam.Map(lambda line: json.loads(line)["body"]["messages"][-1]["content"])
                | beam.Reshuffle()
                | RunInference(ChatHandler())
                | beam.Map(to_row)
                | WriteResults(out)
            )
    rss = peak_rss_mb()
    hist = LatencyHistogram()
    ok = _parquet_latencies(out, hist)
    fig = m.figures(ok, hist, threads=a.threads)
    fig["peak_rss_mb"] = round(rss, 1)
    return fig


def beam_async_wrapper(a: argparse.Namespace) -> dict[str, Any]:
    """Beam's ``AsyncWrapper`` (transforms/async_dofn.py) around a sync-client DoFn."""
    import apache_beam as beam
    from apache_beam.transforms.async_dofn import AsyncWrapper

    from arkbatch_beam import WriteResults

    base_v1 = a.base + "/v1"
    ca_bundle = a.ca_bundle

    class SyncChat(beam.DoFn):
        def setup(self) -> None:
            import openai

            http = openai.DefaultHttpxClient(verify=_ssl_from(ca_bundle))
            self.client = openai.OpenAI(base_url=base_v1, api_key=KEY, max_retries=2, http_client=http)

        def process(self, kv: Any):
            key, prompt = kv
            t = time.perf_counter()
            resp = self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
            yield {"custom_id": key, "status": "ok", "content": resp.choices[0].message.content,
                   "latency_ms": (time.perf_counter() - t) * 1000, "attempts": 1}

    out = os.path.join(a.workdir, f"out-asyncwrapper-{os.getpid()}")
    with Meter() as m:
        with beam.Pipeline() as p:
            _ = (
                p
                | beam.io.ReadFromText(a.data)
                | beam.Map(json.loads)
                | beam.Map(lambda d: (d["custom_id"], d["body"]["messages"][-1]["content"]))
                | beam.ParDo(AsyncWrapper(SyncChat(), parallelism=a.c, callback_frequency=1))
                | WriteResults(out)
            )
    rss = peak_rss_mb()
    hist = LatencyHistogram()
    ok = _parquet_latencies(out, hist)
    fig = m.figures(ok, hist)
    fig["peak_rss_mb"] = round(rss, 1)
    if ok < a.n:
        fig["lost_rows"] = a.n - ok
    return fig


# -- 8. Ray Data LLM's HTTP request processor -----------------------------------------------
def _ray(a: argparse.Namespace, tuned: bool) -> dict[str, Any]:
    """``HttpRequestProcessorConfig`` + ``build_processor``: JSONL in, Parquet out.

    Docs form: ``HttpRequestProcessorConfig(url=..., headers=..., concurrency=1)`` (batch_size
    64). Tuned: as many actors as fit (``concurrency=a.ray_actors``, fractional CPUs), smaller
    batches, more tasks in flight per actor, and a session whose pool allows C connections.
    """
    sampler = TreeSampler().start()
    t_start = time.perf_counter()
    if a.ca_bundle:  # the docs' config takes no TLS option: its aiohttp default context reads this
        os.environ["SSL_CERT_FILE"] = a.ca_bundle
    import ray
    from ray.data.llm import HttpRequestProcessorConfig

    try:
        from ray.data.llm import build_llm_processor as build
    except ImportError:
        from ray.data.llm import build_processor as build

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    url = a.base + "/v1/chat/completions"
    headers = {"Authorization": "Bearer " + KEY}
    if not tuned:
        cfg = HttpRequestProcessorConfig(url=url, headers=headers, concurrency=1)
    else:
        import aiohttp

        limit = a.c
        ca_bundle = a.ca_bundle

        def session_factory() -> Any:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ssl=_ssl_from(ca_bundle)))

        ctx.max_tasks_in_flight_per_actor = a.ray_in_flight
        cfg = HttpRequestProcessorConfig(
            url=url,
            headers=headers,
            concurrency=a.ray_actors,
            batch_size=a.ray_batch,
            session_factory=session_factory,
            http_request_stage={"num_cpus": 0.01},
        )
    processor = build(
        cfg,
        preprocess=lambda row: {"payload": dict(row["body"]), "custom_id": row["custom_id"]},
        postprocess=lambda row: {
            "custom_id": row["custom_id"],
            "content": row["http_response"]["choices"][0]["message"]["content"],
        },
    )
    # Start-up (ray.init, first actor) is reported apart: warm up on a tiny dataset first.
    warm = processor(ray.data.from_items([{"custom_id": "w", "body": body(0)}]))
    warm.take_all()
    startup = time.perf_counter() - t_start
    sampler.mark()
    out = os.path.join(a.workdir, f"out-ray{'-tuned' if tuned else ''}-{os.getpid()}")
    with Meter() as m:
        ds = processor(ray.data.read_json(a.data))
        ds.write_parquet(out)
    tree_cpu = sampler.stop()
    import pyarrow.dataset as pads

    ok = pads.dataset(out, format="parquet").count_rows()
    fig = m.figures(ok)
    fig.update(
        startup_s=round(startup, 2),
        driver_cpu_s=fig["cpu_s"],
        cpu_s=round(tree_cpu, 3),
        cpu_us_per_req=round(tree_cpu / ok * 1e6, 1) if ok else None,
        req_per_cpu_s=round(ok / tree_cpu, 1) if tree_cpu > 0 else None,
        driver_peak_rss_mb=fig["peak_rss_mb"],
        peak_rss_mb=round(sampler.peak_rss_mb, 1),
        p50_ms=None,
        p99_ms=None,
        note="CPU and RSS of the whole Ray process tree (driver, raylet, GCS, workers); "
        "latency not observable per request",
    )
    if tuned:
        fig.update(actors=a.ray_actors, batch_size=a.ray_batch, in_flight_per_actor=a.ray_in_flight)
    ray.shutdown()
    return fig


def ray_docs(a: argparse.Namespace) -> dict[str, Any]:
    return _ray(a, tuned=False)


def ray_tuned(a: argparse.Namespace) -> dict[str, Any]:
    return _ray(a, tuned=True)


CONTENDERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "bare_aiohttp": bare_aiohttp,
    "our_client": our_client,
    "our_client_fixed": our_client_fixed,
    "our_pipeline": our_pipeline,
    "our_pipeline_fused": our_pipeline_fused,
    "ark_sdk": ark_sdk,
    "openai_async": openai_async,
    "beam_remote": beam_remote,
    "beam_async_wrapper": beam_async_wrapper,
    "ray_docs": ray_docs,
    "ray_tuned": ray_tuned,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._contenders")
    p.add_argument("name", choices=sorted(CONTENDERS))
    p.add_argument("--base", required=True, help="fake server root, http://127.0.0.1:PORT")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--c", type=int, required=True)
    p.add_argument("--data", default="", help="JSONL prompts (pipelines)")
    p.add_argument("--workdir", default=".")
    p.add_argument("--threads", type=int, default=1, help="beam_remote: DirectRunner worker threads")
    p.add_argument("--ray_actors", type=int, default=8)
    p.add_argument("--ray_batch", type=int, default=16)
    p.add_argument("--ray_in_flight", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.0, help="async pools: stop taking work after S s")
    p.add_argument("--ca_bundle", default="", help="PEM of the CA to trust for an https:// --base")
    p.add_argument("--uvloop", action="store_true", help="run asyncio contenders on uvloop's loop")
    a = p.parse_args(argv)
    BUDGET[0] = a.budget
    if a.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # every asyncio.run / new_event_loop
    fig = CONTENDERS[a.name](a)
    fig["contender"] = a.name
    print("BENCH_RESULT " + json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
