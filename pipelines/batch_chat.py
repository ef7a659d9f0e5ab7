"""The batch chat CLI: JSONL prompts in, Parquet results and failures out.

Usage (any Beam pipeline option passes through: --runner, --direct_num_workers, ...)::

    export ARK_API_KEY=...
    python -m pipelines.batch_chat --input 'prompts/*.jsonl' --output out/ \\
        --model ep-2024... --max_concurrency 500 --timeout 86400

Options become one validated config here, at the edge; a bad option fails before the
pipeline starts, naming the option and its accepted range. The exit code is 0 when the
pipeline ran, even if some rows failed; the last line printed is a one-line summary.

Example:
    >>> from pipelines.batch_chat import build_parser
    >>> build_parser().parse_known_args(["--input", "a.jsonl", "--output", "o"])[0].max_concurrency
    500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from arkbatch_beam import (
    ARK_BASE_URL,
    ARK_BATCH_PATH,
    Backoff,
    BatchChatInference,
    ClientConfig,
    Endpoint,
    InputOptions,
    WriteResults,
    _runtime,
)
from arkbatch_beam._attempt import MissingApiKey
from arkbatch_beam._config import DEFAULT_MAX_CONCURRENCY, DEFAULT_TIMEOUT, Keepalive
from arkbatch_beam._dofn import EndpointUnusable
from arkbatch_beam._types import NAMESPACE
from arkbatch_beam._inputs import INPUT_FORMATS, parse_input, row_to_item
from arkbatch_beam._sink import FAILURES_DIR, RESULTS_DIR, CompactOutput, part_files
from arkbatch_beam._types import ChatRequest
from arkbatch_beam.report import summarize, top_reasons

log = logging.getLogger("arkbatch_beam")


class UsageError(Exception):
    """A bad option or environment, reported before the pipeline starts."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's own flags (Beam's pipeline options are parsed separately)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.batch_chat",
        description="Run chat prompts through Ark batch inference (or any OpenAI-compatible "
        "endpoint) on Apache Beam; write Parquet results and failures.",
    )
    p.add_argument("--input", required=True,
                   help="JSONL/text (also .gz) or Parquet path or glob (local or gs://)")
    p.add_argument("--output", required=True, help="output folder (local or gs://)")
    p.add_argument("--model", default=None, help="endpoint id / model for bodies without one")
    p.add_argument("--base_url", default=ARK_BASE_URL)
    p.add_argument("--path", default=ARK_BATCH_PATH, help="/batch/chat/completions or /chat/completions")
    p.add_argument("--api_key_env", default="ARK_API_KEY", help="env var holding the key ('' = none)")
    p.add_argument("--max_concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                   help="requests in flight per worker process, 1..10000")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="per-request deadline in seconds, 1..259200 (72 h)")
    p.add_argument("--attempt_timeout", type=float, default=None, help="bound on one attempt, s")
    p.add_argument("--connect_timeout", type=float, default=10.0)
    p.add_argument("--max_attempts", type=int, default=20,
                   help="most attempts that fail without the server announcing a wait (0 = until the deadline)")
    p.add_argument("--min_attempt_seconds", type=float, default=1.0,
                   help="no attempt starts with less than this much of the deadline left")
    p.add_argument("--tcp_keepalive_idle", type=int, default=60,
                   help="seconds a connection may sit idle before TCP keepalive probes start (0 = off)")
    p.add_argument("--tcp_keepalive_interval", type=int, default=15, help="seconds between keepalive probes")
    p.add_argument("--tcp_keepalive_count", type=int, default=4,
                   help="unanswered probes before the connection is dropped")
    p.add_argument("--backoff_initial", type=float, default=0.5)
    p.add_argument("--backoff_max", type=float, default=8.0)
    p.add_argument("--input_format", default="auto",
                   help="auto|batch|chat|text|parquet (auto: parquet when --input ends in .parquet, "
                   "else detected per line)")
    p.add_argument("--input_encoding", default=None,
                   help="codec of text/JSONL input: gbk, gb18030, shift_jis, latin-1, ... (default: UTF-8). A line "
                   "that does not decode, or is binary, becomes an invalid_encoding failure row, never a prompt")
    p.add_argument("--prompt_column", default="prompt",
                   help="Parquet input: the column holding the prompt (a string, or a list of messages)")
    p.add_argument("--id_column", default=None,
                   help="Parquet input: the column holding the custom_id (default: derived from the prompt)")
    p.add_argument("--system", default=None, help="system prompt for plain-text prompts")
    p.add_argument("--strict_model", action="store_true", help="reject bodies whose model differs")
    p.add_argument("--max_request_bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--include_request", action="store_true", help="keep request_json on ok rows")
    p.add_argument("--part_rows", type=int, default=500, help="rows per Parquet part, at most")
    p.add_argument("--part_seconds", type=float, default=5.0, help="part age before it is written")
    p.add_argument("--resume", action="store_true",
                   help="skip ids that already have a final row under --output (ok, or rejected by the server); "
                   "everything else is read, checked and sent again")
    p.add_argument("--retry_failed", action="store_true", help="with --resume, re-send rejected requests too")
    p.add_argument("--no_dedupe", action="store_true",
                   help="no shuffle by custom_id: flat memory on the DirectRunner for very large inputs; "
                   "a repeated id is sent again (compaction keeps one row per id and request; an answer to "
                   "another request with the same id is kept as a duplicate_custom_id row); not with --resume")
    p.add_argument("--no_compact", action="store_true", help="leave the parts; do not merge at the end")
    p.add_argument("--no_preflight", action="store_true", help="skip the endpoint reachability check")
    p.add_argument("--progress_seconds", type=float, default=30.0,
                   help="each worker process logs a progress line this often, 1..86400 (0: off)")
    p.add_argument("--max_requests_per_second", type=float, default=None,
                   help="bound on requests started per second by each worker process (per model), "
                   "0.01..100000; a fleet's share of a quota (default: no bound but the cap)")
    return p


def is_parquet(args: argparse.Namespace) -> bool:
    """Whether ``--input`` is read as Parquet (named, or auto with a ``.parquet`` suffix)."""
    return args.input_format == "parquet" or (
        args.input_format == "auto" and args.input.rstrip("*").endswith((".parquet", ".parq"))
    )


def _config_from(args: argparse.Namespace) -> tuple[ClientConfig, InputOptions]:
    try:
        formats = (*INPUT_FORMATS, "parquet")
        if args.input_format not in formats:
            raise ValueError(f"input_format must be one of {', '.join(formats)}, got {args.input_format!r}")
        if args.input_encoding and is_parquet(args):
            raise ValueError("input_encoding applies to text/JSONL input, not Parquet")
        if not args.model and (args.input_format == "text" or is_parquet(args)):
            raise ValueError(f"model is needed with {'Parquet' if is_parquet(args) else 'plain-text'} input "
                             "(its prompts carry no model): pass --model ID")
        endpoint = Endpoint(
            args.model, base_url=args.base_url, path=args.path, api_key_env=args.api_key_env
        )
        config = ClientConfig(
            endpoint,
            max_concurrency=args.max_concurrency,
            timeout=args.timeout,
            attempt_timeout=args.attempt_timeout,
            connect_timeout=args.connect_timeout,
            backoff=Backoff(initial=args.backoff_initial, max_delay=args.backoff_max),
            progress_seconds=args.progress_seconds,
            max_requests_per_second=args.max_requests_per_second,
            max_attempts=args.max_attempts,
            min_attempt_seconds=args.min_attempt_seconds,
            keepalive=None if args.tcp_keepalive_idle == 0 else Keepalive(
                idle=args.tcp_keepalive_idle, interval=args.tcp_keepalive_interval, count=args.tcp_keepalive_count),
        )
        inputs = InputOptions(
            # Parquet rows become chat-form dicts before parsing (see build_pipeline).
            input_format="chat" if is_parquet(args) else args.input_format,
            system=args.system,
            model=args.model,
            strict_model=args.strict_model,
            max_request_bytes=args.max_request_bytes,
            batch_path=endpoint.is_batch,
            input_encoding=args.input_encoding,
        )
        if not 1 <= args.part_rows <= 10_000_000:
            raise ValueError(f"part_rows must be in 1..10000000, got {args.part_rows}")
        if not 0.1 <= args.part_seconds <= 86400:
            raise ValueError(f"part_seconds must be in 0.1..86400, got {args.part_seconds}")
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("backoff."):
            msg = "--backoff_" + msg[len("backoff."):].replace("max_delay", "max", 1)
        elif msg.startswith("keepalive."):
            msg = "--tcp_keepalive_" + msg[len("keepalive."):]
        else:
            msg = "--" + msg
        raise UsageError(msg) from None
    return config, inputs


def preflight(config: ClientConfig) -> None:
    """Fail fast when the endpoint is unreachable; warn when it answers a probe oddly.

    Sends one ``GET`` (not a chat request, so nothing is billed or counted as an answer).
    Only a connection failure stops the job here: servers answer a ``GET`` on a POST-only
    path in many ways (404, 405, 401), so a wrong path or key is caught for sure by the
    workers instead, when the first answers to real requests are all 401/403/404.
    """
    ep = config.endpoint
    # No key on the probe: urllib would repeat it to wherever a redirect points.
    req = urllib.request.Request(ep.url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=config.connect_timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            log.warning("endpoint %s answered 404 to a GET probe: check --base_url and --path "
                        "if the requests fail too", ep.url)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"endpoint {ep.url} is unreachable: {reason}") from None


def check_input(args: argparse.Namespace) -> list[Any]:
    """The files ``--input`` matches (metadata); a clear error when none, or a bad column."""
    try:
        files = FileSystems.match([args.input])[0].metadata_list
    except Exception as exc:  # noqa: BLE001 - Beam raises its own error types per filesystem
        raise UsageError(f"--input {args.input}: {exc}") from None
    if not files:
        raise UsageError(f"--input {args.input} matches no file")
    if is_parquet(args):
        with FileSystems.open(files[0].path) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        for flag, col in (("--prompt_column", args.prompt_column), ("--id_column", args.id_column)):
            if col is not None and col not in names:
                raise UsageError(f"{flag} {col!r} is not a column of {files[0].path}; it has: {', '.join(names)}")
    return files


# How many lines of the first input file the launcher reads to check that requests name a model.
MODEL_CHECK_LINES = 200


def check_model(args: argparse.Namespace, files: list[Any], inputs: InputOptions) -> None:
    """Without ``--model``, fail fast when the first lines' requests name no model of their own.

    Otherwise every request would end as an ``invalid_request`` row after a whole job's run.
    Lines that are not valid requests are left to the job (they become failure rows).
    """
    if args.model or is_parquet(args) or not files:
        return
    valid = with_model = 0
    with FileSystems.open(files[0].path) as f:
        for n, line in enumerate(f):
            if n >= MODEL_CHECK_LINES:
                break
            if not line.strip():
                continue
            parsed = parse_input(line.rstrip(b"\r\n"), inputs)
            if isinstance(parsed, ChatRequest):
                valid += 1
                with_model += isinstance(parsed.body.get("model"), str) and bool(parsed.body["model"])
    if valid and not with_model:
        raise UsageError(
            f"the requests in {files[0].path} name no model (checked the first {valid}) and --model is not "
            "set: pass --model ENDPOINT_ID (an Ark endpoint id, or the model name of an OpenAI-compatible server)"
        )


def count_inputs(args: argparse.Namespace, files: list[Any]) -> int:
    """How many prompts the inputs hold: Parquet row counts, or text lines (one pass, streamed)."""
    total = 0
    for m in files:
        with FileSystems.open(m.path) as f:
            if is_parquet(args):
                total += pq.ParquetFile(f).metadata.num_rows
                continue
            last = b"\n"
            while chunk := f.read(1 << 20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
            total += last != b"\n"  # a last line without a newline
    return total


def _count_in_background(args: argparse.Namespace, files: list[Any]) -> None:
    """Give this process's progress lines a total (so they show % and an ETA), off the main thread."""

    def work() -> None:
        try:
            _runtime.set_expected_total(count_inputs(args, files))
        except Exception:  # noqa: BLE001 - progress without a total is still progress
            log.debug("could not count the inputs", exc_info=True)

    _runtime.set_expected_total(None)
    threading.Thread(target=work, name="arkbatch-count", daemon=True).start()


def _has_parts(output: str) -> bool:
    return any(part_files(FileSystems.join(output, d)) for d in (RESULTS_DIR, FAILURES_DIR))


def _job_metrics(result: Any) -> tuple[dict[str, int], float | None]:
    """The job's ``arkbatch`` counters (summed over steps) and the seconds from its first send
    to its last answer (``None`` when nothing was sent), from one metrics query."""
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners have no metrics
        return {}, None
    counters: dict[str, int] = {}
    for c in res["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(c.committed or 0)
    dists = [d for d in res["distributions"] if d.committed]
    firsts = [d.committed.min for d in dists if d.key.metric.name == "first_send_ms"]
    lasts = [d.committed.max for d in dists if d.key.metric.name == "last_answer_ms"]
    span = max(0.0, (max(lasts) - min(firsts)) / 1000.0) if firsts and lasts else None
    return counters, span


def build_pipeline(
    p: beam.Pipeline,
    args: argparse.Namespace,
    *,
    config: ClientConfig | None = None,
    inputs: InputOptions | None = None,
) -> None:
    """Add the CLI's steps to ``p`` (read -> infer -> Parquet parts -> compact) without running.

    ``args`` are the CLI's parsed flags (:func:`build_parser`); ``config``/``inputs`` default to
    the ones they describe. Nothing here touches the endpoint or the output folder, so a graph
    for any runner (e.g. Dataflow) can be built and inspected offline.
    """
    if config is None or inputs is None:
        config, inputs = _config_from(args)
    output = args.output.rstrip("/")
    if is_parquet(args):
        lines = (
            p
            | "Read" >> beam.io.ReadFromParquet(args.input)
            | "Rows" >> beam.Map(row_to_item, args.prompt_column, args.id_column, args.system)
        )
    else:
        # Bytes, not str: parse_input decodes each line strictly (--input_encoding, else UTF-8), so a
        # line that does not decode becomes an invalid_encoding failure row instead of failing the reader.
        lines = p | "Read" >> beam.io.ReadFromText(args.input, coder=beam.coders.BytesCoder())
    ok, failures = (
        lines
        | "Infer" >> BatchChatInference(
            config,
            input_options=inputs,
            include_request=args.include_request,
            dedupe=not args.no_dedupe,
            resume_from=output if args.resume else None,
            retry_failed=args.retry_failed,
        ).with_exception_handling()
    )
    # Each output straight into its writer (no Flatten in between), so the writers fuse
    # with inference and parts become durable while the job runs, on every runner.
    parts = (
        ok | "WriteResults" >> WriteResults(output, max_rows=args.part_rows, max_seconds=args.part_seconds),
        failures
        | "WriteFailures" >> WriteResults(output, max_rows=args.part_rows, max_seconds=args.part_seconds),
    ) | "AllParts" >> beam.Flatten()
    if not args.no_compact:
        _ = parts | "Compact" >> CompactOutput(output)


def run(argv: Sequence[str] | None = None, *, save_main_session: bool = False) -> dict[str, Any]:
    """Parse ``argv``, run the pipeline, print and return the summary."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, beam_args = build_parser().parse_known_args(argv)
    config, inputs = _config_from(args)
    ep = config.endpoint
    direct = not any(a.startswith("--runner") for a in beam_args) or any(
        "DirectRunner" in a or "PrismRunner" in a for a in beam_args
    )
    if ep.api_key_env and not os.environ.get(ep.api_key_env):
        if direct:
            raise UsageError(
                f"environment variable {ep.api_key_env} is not set: export the API key there "
                "(it is read in the workers, never put in the pipeline)"
            )
        log.warning("%s is not set here; the workers must have it in their environment", ep.api_key_env)
    if config.timeout < 600 and not ep.base_url.startswith(("http://127.", "http://localhost")):
        log.warning("--timeout %gs is below Ark's advised 10 minutes for batch endpoints", config.timeout)
    files = check_input(args)
    check_model(args, files, inputs)
    if not args.no_preflight:
        preflight(config)
    options = PipelineOptions(beam_args, save_main_session=save_main_session)
    output = args.output.rstrip("/")
    if args.retry_failed and not args.resume:
        raise UsageError("--retry_failed needs --resume")
    if args.no_dedupe and args.resume:
        raise UsageError("--resume needs the dedupe shuffle: drop --no_dedupe")
    if not args.resume and _has_parts(output):
        raise UsageError(
            f"--output {output} already holds results: add --resume to continue that job "
            "(only missing ids are sent), or choose an empty folder"
        )
    if direct and config.progress_seconds:
        # The DirectRunner runs the workers in this process: show their progress lines here.
        logging.getLogger("arkbatch_beam").setLevel(logging.INFO)
        _count_in_background(args, files)
    started = time.monotonic()
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, args, config=config, inputs=inputs)
    result = p.result
    wall = time.monotonic() - started
    counters, span = _job_metrics(result)
    requests = counters.get("requests", 0)
    try:  # final state per id, read back from the output (what a user will find there)
        per_id = summarize(output)
    except Exception:  # noqa: BLE001 - e.g. a runner that wrote nowhere this process can read
        log.warning("could not read %s back for the per-id counts", output, exc_info=True)
        per_id = {"ok": 0, "failed": 0, "failures_by_type": {}, "duplicate_rows": 0, "tokens": {}}
    ok, failed = per_id["ok"], per_id["failed"]
    reasons = top_reasons(per_id)
    summary = {
        # Per id (each custom_id once, by its final state), as python -m arkbatch_beam.report says.
        "ok": ok,
        "failed": failed,
        "failures_by_type": per_id["failures_by_type"],
        "duplicate_rows": per_id["duplicate_rows"],
        "tokens": per_id["tokens"],
        # Rows as written while the job ran (bundle retries and superseded failures included).
        "rows_written_ok": counters.get("rows_written_ok", 0),
        "rows_written_failed": counters.get("rows_written_failed", 0),
        "wall_seconds": round(wall, 3),
        "requests": requests,
        "requests_per_second": round(requests / wall, 1) if wall > 0 else 0.0,
        # First send to last answer: the steady rate, without start-up and compaction.
        "sending_seconds": None if span is None else round(span, 3),
        "sending_requests_per_second": round(requests / span, 1) if span else None,
        **{name: counters.get(name, 0)
           for name in ("retries", "skipped_done", "duplicates")},
        "output": output,
    }
    try:
        with FileSystems.create(FileSystems.join(output, "summary.json")) as f:
            f.write(json.dumps(summary, indent=2).encode())
    except Exception:  # noqa: BLE001 - the summary file is a convenience
        log.warning("could not write summary.json", exc_info=True)
    print(
        f"summary: ok={ok} failed={failed} " + (f"({reasons}) " if reasons else "") + f"wall={wall:.1f}s "
        f"req/s={summary['requests_per_second']}"
        + (f" (sending {span:.1f}s at {summary['sending_requests_per_second']} req/s)" if span else "")
        + f" skipped={summary['skipped_done']}"
        + (f" duplicate_rows={summary['duplicate_rows']}" if summary["duplicate_rows"] else "")
        + f" output={output}",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 when the pipeline ran, 2 on a usage error, 1 when the job failed."""
    try:
        run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the runner wraps worker errors
        text = str(exc)
        if isinstance(exc, (EndpointUnusable, MissingApiKey)):
            print(f"error: {text.splitlines()[0]}", file=sys.stderr)
            return 1
        for name in ("EndpointUnusable", "MissingApiKey"):  # runners that wrap worker errors
            line = next((ln for ln in text.splitlines() if name in ln), None)
            if line:
                print(f"error: {line.strip()}", file=sys.stderr)
                return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
