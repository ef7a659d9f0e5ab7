"""The batch chat CLI: JSONL prompts in, Parquet results and failures out.

Usage (any Beam pipeline option passes through: --runner, --direct_num_workers, ...)::

    export ARK_API_KEY=...
    python -m pipelines.batch_chat --input 'prompts/*.jsonl' --output out/ \\
        --model ep-2024... --max_concurrency 500 --timeout 86400

The story of a job, one named step each (:func:`run`): parse the flags into validated configs
(a bad option fails here, naming the flag and its accepted range; a flag that neither this CLI
nor Beam knows fails with a "did you mean"), check the environment, the input and the output
folder, probe the endpoint, run the pipeline, read the output back and print the summary. The
exit code is 0 when the pipeline ran, even if some rows failed; the last line printed is the
summary. Every flag comes from one config field's definition (``arkbatch_beam._config``).

Example:
    >>> from pipelines.batch_chat import build_parser
    >>> build_parser().parse_known_args(["--input", "a.jsonl", "--output", "o"])[0].max_concurrency
    500
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import platform
import ssl
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
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, _BeamArgumentParser

from arkbatch_beam import (
    FAILURES_DIR,
    NAMESPACE,
    RESULTS_DIR,
    BatchChatInference,
    ChatRequest,
    ClientConfig,
    CompactOutput,
    InputOptions,
    JobProgress,
    MissingApiKey,
    OptionError,
    SinkConfig,
    WriteResults,
    add_flags,
    flags,
    from_flags,
    is_loopback,
    job_error_in,
    option,
    parse_input,
    part_files,
    raise_open_file_limit,
    read_secret,
    row_to_item,
    tls_context,
    validate,
)
from arkbatch_beam._bar import ProgressBar
from arkbatch_beam._progress import TOKEN_KINDS, Counts
from arkbatch_beam._sink import is_local_runner
from arkbatch_beam.report import cost, load_run_summary, summarize, top_reasons

log = logging.getLogger("arkbatch_beam")


class UsageError(Exception):
    """A bad option or environment, reported before the pipeline starts."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """The CLI's own options (the client's, the input's and the output's are config classes)."""

    input: str = option(help="JSONL/text (also .gz) or Parquet path or glob (local or gs://)")
    output: str = option(help="output folder (local or gs://)")
    input_format: str = option("auto", choices=("auto", "batch", "chat", "text", "parquet"),
                               help="how a line is read (auto: Parquet when --input ends in .parquet, else "
                               "detected per line)")
    prompt_column: str = option("prompt", help="Parquet input: the column holding the prompt (a string, or a "
                                "list of messages)")
    id_column: str | None = option(None, help="Parquet input: the column holding the custom_id (none: derived "
                                   "from the prompt)")
    include_request: bool = option(False, kind=bool, help="keep request_json on ok rows too")
    resume: bool = option(False, kind=bool, help="skip ids that already have a final row under --output (ok, or "
                          "rejected by the server); everything else is read, checked and sent again")
    retry_failed: bool = option(False, kind=bool, help="with --resume, re-send rejected requests too")
    no_dedupe: bool = option(False, kind=bool, help="no shuffle by custom_id: flat memory on the DirectRunner for "
                             "very large inputs; a repeated id is sent again; not with --resume")
    no_compact: bool = option(False, kind=bool, help="leave the parts; do not merge them at the end")
    no_preflight: bool = option(False, kind=bool, help="skip the endpoint reachability check")
    quiet: bool = option(False, kind=bool, help="no progress bar and no progress lines from the workers that run "
                         "in this process (summary.json is still written)")
    log_level: str = option("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                            help="level of the arkbatch_beam logger (progress lines are INFO)")
    price_input: float | None = option(None, kind=float, lo=0.0, hi=1e6,
                                       help="price of a million input tokens, not cached (any currency; Ark's "
                                       "batch price is half the online one): summary.json then holds the cost")
    price_cached_input: float | None = option(None, kind=float, lo=0.0, hi=1e6,
                                              help="price of a million cached input tokens (none: --price_input)")
    price_output: float | None = option(None, kind=float, lo=0.0, hi=1e6,
                                        help="price of a million output tokens (reasoning tokens included)")

    @property
    def prices(self) -> dict[str, float | None]:
        """The prices per million tokens, by kind (``report.cost`` takes them)."""
        return {"input": self.price_input, "cached_input": self.price_cached_input, "output": self.price_output}

    def __post_init__(self) -> None:
        validate(self)


class FlinkJavaOptions(PipelineOptions):
    """Options of Beam's Java Flink runner that the Python SDK declares no flag for.

    They are *pipeline* options (not the job server's): declared here, they travel with the
    pipeline to the job server, which drops undeclared ones. ``execution_mode_for_batch`` acts
    on Flink 1.x's batch (DataSet) translation only; ``load_balance_bundles`` is a portable
    option read for any portable job.
    """

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument(
            "--execution_mode_for_batch", default=None, choices=("PIPELINED", "BATCH_FORCED"),
            help="Flink 1.x batch: BATCH_FORCED makes every exchange blocking, so a stage starts when its "
            "inputs are complete (PIPELINED, the default, starts every stage at once)")
        parser.add_argument(
            "--load_balance_bundles", default=None, action="store_true",
            help="portable runners: at most as many open bundles as SDK workers across stages (can "
            "deadlock a batch job whose stages all start at once; see the README)")


# Every config class whose fields are flags, in the order --help and the README show them.
CONFIG_CLASSES: tuple[type, ...] = (JobOptions, ClientConfig, InputOptions, SinkConfig)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, generated from the config fields (Beam's options are parsed separately)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.batch_chat",
        description="Run chat prompts through Ark batch inference (or any OpenAI-compatible "
        "endpoint) on Apache Beam; write Parquet results and failures. Any Beam pipeline option "
        "(--runner, --direct_num_workers, ...) passes through.",
        allow_abbrev=False,
    )
    add_flags(p, *CONFIG_CLASSES)
    return p


def our_flags() -> list[str]:
    """Every flag of this CLI, without ``--``."""
    return [f.name for cls in CONFIG_CLASSES for f in flags(cls)]


def _beam_flags() -> set[str]:
    """Every flag Beam's own pipeline option classes declare, without ``--``."""
    parser = _BeamArgumentParser(add_help=False, allow_abbrev=False, conflict_handler="resolve")
    seen: set[type[PipelineOptions]] = set()
    todo: list[type[PipelineOptions]] = [PipelineOptions]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
                try:
                    sub._add_argparse_args(parser)
                except Exception:  # noqa: BLE001 - a user's options class we cannot read
                    log.debug("could not read the options of %s", sub, exc_info=True)
    return {s[2:] for s in parser._option_string_actions if s.startswith("--")}


def check_unknown_flags(beam_args: Sequence[str]) -> None:
    """Fail fast on a ``--flag`` that neither this CLI nor Beam's options know, with a "did you mean".

    Beam would only warn ("Discarding unparseable args") and the job would run at the default.
    """
    known = _beam_flags()
    launched_by_template = any(a.startswith("--template_location") for a in beam_args)
    for arg in beam_args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in known or (name.startswith("no_") and name[3:] in known):
            continue
        close = difflib.get_close_matches(name, [*our_flags(), *known], n=1, cutoff=0.75)
        hint = f": did you mean --{close[0]}?" if close else " (python -m pipelines.batch_chat --help lists ours)"
        if launched_by_template:  # a Flex Template launcher may add options of its own: do not block it
            log.warning("unknown option --%s%s", name, hint)
            continue
        raise UsageError(f"unknown option --{name}{hint}")


def is_parquet(args: argparse.Namespace) -> bool:
    """Whether ``--input`` is read as Parquet (named, or auto with a ``.parquet`` suffix)."""
    return args.input_format == "parquet" or (
        args.input_format == "auto" and args.input.rstrip("*").endswith((".parquet", ".parq"))
    )


@dataclasses.dataclass(frozen=True)
class Job:
    """One job's validated configuration, built from the flags once."""

    args: argparse.Namespace
    options: JobOptions
    config: ClientConfig
    inputs: InputOptions
    sink: SinkConfig
    beam_args: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        return self.options.output.rstrip("/")


def configure(args: argparse.Namespace, beam_args: Sequence[str] = ()) -> Job:
    """The flags -> validated configs; a bad value is a :class:`UsageError` naming its flag."""
    values = vars(args)
    try:
        options = from_flags(JobOptions, values)
        parquet = is_parquet(args)
        if args.input_encoding and parquet:
            raise OptionError("--input_encoding", "applies to text/JSONL input, not Parquet")
        if not args.model and (args.input_format == "text" or parquet):
            raise OptionError("--model", f"is needed with {'Parquet' if parquet else 'plain-text'} input "
                              "(its prompts carry no model): pass --model ID")
        config = from_flags(ClientConfig, values)
        inputs = from_flags(
            InputOptions, values,
            # Parquet rows become chat-form dicts before parsing (see build_pipeline).
            input_format="chat" if parquet else args.input_format,
            model=args.model,
            batch_path=config.endpoint.is_batch,
        )
        sink = from_flags(SinkConfig, values)
    except OptionError as exc:
        raise UsageError(str(exc)) from None
    if options.retry_failed and not options.resume:
        raise UsageError("--retry_failed needs --resume")
    if options.no_dedupe and options.resume:
        raise UsageError("--resume needs the dedupe shuffle: drop --no_dedupe")
    return Job(args, options, config, inputs, sink, tuple(beam_args))


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
    # The same trust as the workers: --ca_bundle, else the system's store (SSL_CERT_FILE honoured).
    context = tls_context(config) if ep.url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=config.connect_timeout, context=context):
            return
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            log.warning("endpoint %s answered 404 to a GET probe: check --base_url and --path "
                        "if the requests fail too", ep.url)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        hint = (" (trust its CA with --ca_bundle PATH or SSL_CERT_FILE)"
                if isinstance(reason, ssl.SSLCertVerificationError) else "")
        raise UsageError(f"endpoint {ep.url} is unreachable: {reason}{hint}") from None


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
        templated = bool(getattr(args, "template", None) or getattr(args, "template_file", None))
        # With a template the prompt is built from the columns it names (a missing one is a
        # missing_column row), so --prompt_column need not exist.
        prompt_column = None if templated else args.prompt_column
        for flag, col in (("--prompt_column", prompt_column), ("--id_column", args.id_column)):
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


def count_in_background(args: argparse.Namespace, files: list[Any], progress: JobProgress) -> None:
    """Give the progress lines a total (so they show % and an ETA), counted off the main thread."""

    def work() -> None:
        try:
            progress.set_total(count_inputs(args, files))
        except Exception:  # noqa: BLE001 - progress without a total is still progress
            log.debug("could not count the inputs", exc_info=True)

    threading.Thread(target=work, name="arkbatch-count", daemon=True).start()


def _has_parts(output: str) -> bool:
    return any(part_files(FileSystems.join(output, d)) for d in (RESULTS_DIR, FAILURES_DIR))


def _job_metrics(result: Any, *, attempted: bool = False) -> tuple[dict[str, int], float | None]:
    """The job's ``arkbatch`` counters (summed over steps) and the seconds from its first send
    to its last answer (``None`` when nothing was sent), from one metrics query (``attempted``:
    the values so far, for a job still running; else the committed ones)."""
    try:
        res = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners have no metrics
        return {}, None

    def value(m: Any) -> Any:
        return m.attempted if attempted else m.committed

    counters: dict[str, int] = {}
    for c in res["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value(c) or 0)
    dists = [(d.key.metric.name, value(d)) for d in res["distributions"] if value(d)]
    firsts = [v.min for name, v in dists if name == "first_send_ms"]
    lasts = [v.max for name, v in dists if name == "last_answer_ms"]
    span = max(0.0, (max(lasts) - min(firsts)) / 1000.0) if firsts and lasts else None
    return counters, span


def build_pipeline(p: beam.Pipeline, args: argparse.Namespace, *, job: Job | None = None,
                   progress: JobProgress | None = None) -> None:
    """Add the CLI's steps to ``p`` (read -> infer -> Parquet parts -> compact) without running.

    ``args`` are the CLI's parsed flags (:func:`build_parser`). Nothing here touches the endpoint
    or the output folder, so a graph for any runner (e.g. Dataflow) can be built and inspected
    offline.
    """
    job = job or configure(args)
    opts, output = job.options, job.output
    if is_parquet(args):
        lines = (
            p
            | "Read" >> beam.io.ReadFromParquet(opts.input)
            | "Rows" >> beam.Map(row_to_item, opts.prompt_column, opts.id_column, job.inputs.system,
                                 templated=job.inputs.has_template, keep=job.inputs.kept_columns)
        )
    else:
        # Bytes, not str: parse_input decodes each line strictly (--input_encoding, else UTF-8), so a
        # line that does not decode becomes an invalid_encoding failure row instead of failing the reader.
        lines = p | "Read" >> beam.io.ReadFromText(opts.input, coder=beam.coders.BytesCoder())
    # Answers and failures go to one writer, which files each row by its status: inference and
    # writing fuse (no Flatten of rows in between), so parts become durable while the job runs.
    parts = (
        lines
        | "Infer" >> BatchChatInference(
            job.config,
            input_options=job.inputs,
            include_request=opts.include_request,
            dedupe=not opts.no_dedupe,
            resume_from=output if opts.resume else None,
            retry_failed=opts.retry_failed,
            progress=progress,
        )
        | "WriteResults" >> WriteResults(output, sink=job.sink)
    )
    done = (parts | "Compact" >> CompactOutput(output, sink=job.sink)) if not opts.no_compact else (
        parts | "CountParts" >> beam.combiners.Count.Globally())
    # The job writes its own summary.json once its output is final, so a detached launcher
    # (--no_wait_until_finish, a Flex Template, a closed laptop) still gets one; a launcher that
    # waits then rewrites it with the job's counters.
    _ = done | "Summary" >> beam.ParDo(_SummaryDoFn(output, job.config.describe(), opts.prices, job_options(job)))


def check_environment(job: Job) -> None:
    """The key can be read where the workers run: its variable is set (here, on an in-process
    runner), or its Secret Manager version can be read (checked from here when it can be)."""
    ep = job.config.endpoint
    if ep.api_key_secret:
        try:
            read_secret(ep.api_key_secret)
        except MissingApiKey as exc:
            if runs_here(job):
                raise UsageError(str(exc)) from None
            log.warning("%s; checked from the launcher only: the workers read it with their own service "
                        "account", exc)
    elif ep.api_key_env and not os.environ.get(ep.api_key_env):
        if runs_here(job):
            raise UsageError(
                f"environment variable {ep.api_key_env} is not set: export the API key there "
                "(it is read in the workers, never put in the pipeline)"
            )
        log.warning("%s is not set here; the workers must have it in their environment", ep.api_key_env)
    if runs_here(job):  # the workers' sockets come from this machine's open-file limit
        try:
            raise_open_file_limit(job.config.max_concurrency)
        except OptionError as exc:
            raise UsageError(f"--{exc}") from None
    if ep.ca_bundle and runs_here(job):
        try:
            tls_context(job.config)
        except OSError as exc:
            raise UsageError(f"--ca_bundle: {exc}") from None
    if job.config.timeout < 600 and not is_loopback(ep.base_url):
        log.warning("--timeout %gs is below Ark's advised 10 minutes for batch endpoints", job.config.timeout)


def runs_here(job: Job) -> bool:
    """Whether the runner runs the workers on this machine (the DirectRunner, Prism)."""
    return is_local_runner(PipelineOptions(job.beam_args).view_as(StandardOptions).runner)


def check_output(job: Job) -> None:
    """A fresh job needs an empty output folder; ``--resume`` continues one."""
    if not job.options.resume and _has_parts(job.output):
        raise UsageError(
            f"--output {job.output} already holds results: add --resume to continue that job "
            "(only missing ids are sent), or choose an empty folder"
        )


# How often the launcher rewrites OUTPUT/summary.json while it waits for the job, and samples
# the timeline (rows done over time: the report's throughput figure) it holds.
SUMMARY_SECONDS = 5.0
SAMPLE_SECONDS = 1.0
MAX_TIMELINE_POINTS = 1500  # then every other point goes and the sampling interval doubles


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def package_versions() -> dict[str, str]:
    """The versions that made an output (recorded in ``summary.json``).

    Example:
        >>> sorted(package_versions())
        ['aiohttp', 'apache-beam', 'arkbatch-beam', 'pyarrow', 'python']
    """
    from importlib import metadata

    out = {}
    for name in ("arkbatch-beam", "apache-beam", "aiohttp", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def job_options(job: Job) -> dict[str, Any]:
    """The job's own, input and output options as plain values (no key is ever among them; the
    client's are :meth:`ClientConfig.describe`)."""
    from apache_beam.options.pipeline_options import StandardOptions

    out: dict[str, Any] = {}
    for obj in (job.options, job.inputs, job.sink):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None or isinstance(v, (str, int, float, bool)):
                out.setdefault(f.name, v)
    out["runner"] = PipelineOptions(list(job.beam_args)).view_as(StandardOptions).runner or "DirectRunner"
    return out


def counts_from_metrics(counters: dict[str, int], to_do: int | None = None) -> Counts:
    """The job's Beam counters as :class:`Counts` (for runners whose workers run elsewhere).

    Example:
        >>> c = counts_from_metrics({"ok": 5, "failed": 1, "bad_input": 1, "failed_type_rejected": 1,
        ...                          "http_400": 1, "attempts_2": 1, "retries": 1, "requests": 6})
        >>> c.done, c.failures_by_type, c.attempts_histogram, c.by_http_status
        (7, {'rejected': 1}, {'1': 5, '2': 1}, {'200': 5, '400': 1})
    """
    before = counters.get("bad_input", 0) + counters.get("duplicates", 0)
    ok, failed = counters.get("ok", 0), counters.get("failed", 0)
    attempts = {int(k[len("attempts_"):]): v for k, v in counters.items()
                if k.startswith("attempts_") and k[len("attempts_"):].isdigit()}
    if ok + failed - sum(attempts.values()) > 0:
        attempts[1] = ok + failed - sum(attempts.values())
    status = {"200": ok} if ok else {}
    status.update({k[len("http_"):]: v for k, v in counters.items() if k.startswith("http_")})
    return Counts(
        ok=ok, failed=failed + before, failed_before_send=before,
        attempts=counters.get("requests", 0) + counters.get("retries", 0),
        paused_seconds=counters.get("paused_seconds", 0), throttled_seconds=counters.get("throttled_seconds", 0),
        cuts=counters.get("window_cuts", 0), budget_waits=counters.get("budget_waits", 0), to_do=to_do,
        tokens={k: counters.get(k, 0) for k in TOKEN_KINDS},
        failures_by_type=dict(sorted(((k[len("failed_type_"):], v) for k, v in counters.items()
                                      if k.startswith("failed_type_")), key=lambda kv: (-kv[1], kv[0]))),
        by_http_status=dict(sorted(status.items(), key=lambda kv: -kv[1])),
        attempts_histogram={str(k): v for k, v in sorted(attempts.items())},
    )


def run_figures(c: Counts, wall: float, source: str) -> dict[str, Any]:
    """This run's figures from its counters (what it sent and was billed for, bundle retries
    included), as ``summary.json["run"]`` holds them."""
    return {
        "source": source,
        "rows": c.done, "requests": c.requests, "ok": c.ok, "failed": c.failed,
        "failed_before_send": c.failed_before_send,
        # Failure rows written without a request (bad input lines, duplicate ids) are "not_sent"
        # here; the per-id figures name their types.
        "failures_by_type": {**c.failures_by_type, **({"not_sent": c.failed_before_send}
                                                      if c.failed_before_send else {})},
        "http_status": dict(c.by_http_status),
        "attempts": dict(c.attempts_histogram), "attempts_total": c.attempts, "retries": c.retries,
        "in_flight": c.in_flight, "queued": c.queued, "waiting_to_retry": c.waiting_to_retry,
        "latency_ms": c.latency_ms(),
        "tokens": dict(c.tokens),
        "paused_seconds": round(c.paused_seconds, 1), "throttled_seconds": round(c.throttled_seconds, 1),
        "window_cuts": c.cuts, "budget_waits": c.budget_waits,
        "rows_to_do": c.to_do,
        "requests_per_second": round(c.requests / wall, 1) if wall > 0 else 0.0,
        "tokens_per_second": round(c.tokens["total_tokens"] / wall, 1) if wall > 0 else 0.0,
    }


class LiveSummary:
    """The launcher's ``summary.json`` while it waits: a daemon thread samples the job's counters
    every ``SAMPLE_SECONDS`` (the timeline) and rewrites the file atomically every
    ``SUMMARY_SECONDS`` with ``"state": "running"``; :func:`job_summary` writes the final one."""

    def __init__(self, job: Job, progress: JobProgress) -> None:
        self.job = job
        self.progress = progress
        self.result: Any = None  # set once the runner returns (a remote job: its metrics so far)
        self.started = time.monotonic()
        self.started_at = _now_iso()
        self.timeline: list[list[float]] = []
        self._every = SAMPLE_SECONDS
        self._last_sample = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.previous_runs = self._previous() if job.options.resume else []

    def _previous(self) -> list[dict[str, Any]]:
        old = load_run_summary(self.job.output)
        if not old or not isinstance(old.get("run"), dict):
            return list((old or {}).get("previous_runs") or [])
        run = old["run"]
        this_cost = ((old.get("cost") or {}).get("this_run") or {}).get("total")
        return [*(old.get("previous_runs") or []), {
            "started_at": old.get("started_at"), "state": old.get("state"), "wall_seconds": old.get("wall_seconds"),
            "requests": run.get("requests"), "ok": run.get("ok"), "failed": run.get("failed"),
            "tokens": run.get("tokens"), "cost": this_cost}]

    def counts(self) -> tuple[Counts, str]:
        """The run's counters now, and where they come from."""
        c = self.progress.counts()
        if c.runtimes or self.result is None or runs_here(self.job):
            return c, "counters of the workers in this process"
        counters, _ = _job_metrics(self.result, attempted=True)
        return counts_from_metrics(counters, c.to_do), "the runner's metrics"

    def sample(self, c: Counts | None = None) -> None:
        """Add a timeline point: [seconds, rows done, ok, failed, total tokens]."""
        c = c or self.counts()[0]
        t = time.monotonic() - self.started
        with self._lock:
            self.timeline.append([round(t, 2), c.done, c.ok, c.failed, c.tokens["total_tokens"]])
            if len(self.timeline) > MAX_TIMELINE_POINTS:
                self.timeline = self.timeline[:-1:2] + self.timeline[-1:]
                self._every *= 2

    def base(self, wall: float) -> dict[str, Any]:
        """What every summary.json the launcher writes holds besides the counts."""
        job = self.job
        with self._lock:
            timeline = [list(p) for p in self.timeline]
        return {
            "started_at": self.started_at, "updated_at": _now_iso(), "wall_seconds": round(wall, 3),
            "input": {"lines": self.progress.total()},
            "resume": {"resumed": job.options.resume, "retry_failed": job.options.retry_failed},
            "timeline_columns": ["seconds", "rows_done", "ok", "failed", "total_tokens"],
            "timeline": timeline,
            "previous_runs": self.previous_runs,
            "config": job.config.describe(), "options": job_options(job), "versions": package_versions(),
            "output": job.output,
        }

    def running(self) -> dict[str, Any]:
        """summary.json while the job runs: the run's counters (per-id counts come at the end)."""
        c, source = self.counts()
        wall = time.monotonic() - self.started
        fig = run_figures(c, wall, source)
        summary = {
            "state": "running", "written_by": "launcher",
            "counts_from": "counters (the job is running: per-id counts from the output come when it ends)",
            "ok": c.ok, "failed": c.failed, "failures_by_type": dict(c.failures_by_type),
            "tokens": dict(c.tokens), "latency_ms": c.latency_ms(), "attempts": dict(c.attempts_histogram),
            "requests": c.requests, "retries": c.retries, "paused_seconds": fig["paused_seconds"],
            "throttled_seconds": fig["throttled_seconds"],
            "requests_per_second": fig["requests_per_second"], "tokens_per_second": fig["tokens_per_second"],
            "run": fig, **self.base(wall),
        }
        this_run = cost(c.tokens, self.job.options.prices)
        if this_run is not None:
            summary["cost"] = {"prices_per_million": self.job.options.prices, "this_run": this_run}
        return summary

    def start(self) -> None:
        self.sample()  # the timeline starts at 0
        self._thread = threading.Thread(target=self._run, name="arkbatch-summary", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_write = time.monotonic()
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                now = time.monotonic()
                if now - self._last_sample >= self._every - 1e-3:
                    self._last_sample = now
                    self.sample()
                if now - last_write >= SUMMARY_SECONDS:
                    last_write = now
                    save_summary(self.running())
            except Exception:  # noqa: BLE001 - a summary that fails must not stop the job
                log.debug("could not write the running summary.json", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def execute(
    job: Job, files: list[Any], *, save_main_session: bool = False, live: LiveSummary | None = None
) -> tuple[Any, float]:
    """Run the pipeline; the runner's result and the wall time.

    ``files``: the input's files, as :func:`check_input` found them. When the workers run in
    this process, the input is counted in the background (a total for
    the progress and summary.json), and the progress shows as a bar on a terminal (stderr), else
    as the runtimes' plain lines; ``--quiet`` shows neither. ``live`` (a :class:`LiveSummary`)
    rewrites summary.json while the job runs.
    """
    progress = live.progress if live is not None else JobProgress()
    bar: ProgressBar | None = None
    if runs_here(job):
        count_in_background(job.args, files, progress)
        show = not job.options.quiet and bool(job.config.progress_seconds)
        tty = show and _stderr_is_tty()
        if not show or tty:  # the bar replaces the runtimes' plain lines
            job = dataclasses.replace(job, config=dataclasses.replace(job.config, progress_seconds=0))
        if tty:
            bar = ProgressBar(progress)
    options = PipelineOptions(list(job.beam_args), save_main_session=save_main_session)
    p = beam.Pipeline(options=options)
    build_pipeline(p, job.args, job=job, progress=progress)
    started = time.monotonic()
    if live is not None:
        live.start()
    if bar is not None:
        bar.start()
    try:
        result = p.run()  # in-process runners: returns when the job is done
        if live is not None:
            live.result = result
        if not options.view_as(StandardOptions).no_wait_until_finish:
            result.wait_until_finish()
    finally:
        if bar is not None:
            bar.stop()
        if live is not None:
            live.stop()
    return result, time.monotonic() - started


def output_summary(output: str, prices: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Per-id figures read back from the output (each custom_id once, by its final state), as
    ``python -m arkbatch_beam.report`` says: what a user will find there; with ``prices``, the
    cost of the whole output so far (each id's tokens once, however many runs wrote it)."""
    try:
        per_id = summarize(output)
    except Exception:  # noqa: BLE001 - e.g. a runner that wrote nowhere this process can read
        log.warning("could not read %s back for the per-id counts", output, exc_info=True)
        per_id = {"ok": 0, "failed": 0, "failures_by_type": {}, "duplicate_rows": 0, "tokens": {}}
    out = {**per_id, "output": output}
    whole = cost(out["tokens"], prices)
    if whole is not None:
        out["cost"] = {"prices_per_million": prices, "output": whole}
    return out


def save_summary(summary: dict[str, Any]) -> None:
    """``OUTPUT/summary.json``, made visible whole (a temporary name of its own, then a rename
    over the old one: on a local disk an atomic replace, so a reader never finds it missing)."""
    output = summary["output"]
    final = FileSystems.join(output, "summary.json")
    tmp = FileSystems.join(output, f".tmp-summary-{os.getpid()}-{threading.get_ident()}.json")
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(summary, indent=2).encode())
    if "://" not in output:
        os.replace(tmp, final)
        return
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([tmp], [final])


class _SummaryDoFn(beam.DoFn):
    """The job's last step: summary.json from the final output (no launcher needed)."""

    def __init__(self, output: str, config: dict[str, Any], prices: dict[str, float | None] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self._output = output
        self._config = config
        self._prices = prices
        self._options = options or {}

    def process(self, _done: Any) -> Any:
        summary = {"state": "done", **output_summary(self._output, self._prices), "written_by": "pipeline",
                   "updated_at": _now_iso(), "config": self._config, "options": self._options,
                   "versions": package_versions()}
        save_summary(summary)
        yield summary


def job_summary(job: Job, result: Any, wall: float, live: LiveSummary | None = None) -> dict[str, Any]:
    """The job's summary: per-id figures read back from the output (and the cost of the whole
    output), plus this run's: the job's counters (in-process ones when the workers ran here,
    else the runner's metrics), rates, the timeline, configuration and versions."""
    counters, span = _job_metrics(result)
    live = live or LiveSummary(job, JobProgress())
    c, source = live.progress.counts(), "counters of the workers in this process"
    if not c.runtimes:
        c, source = counts_from_metrics(counters, c.to_do), "the runner's metrics"
    live.sample(c)
    requests = counters.get("requests", c.requests)
    out = output_summary(job.output, job.options.prices)
    fig = run_figures(c, wall, source)
    summary = {
        "state": "done",
        **out,
        # Rows as written while the job ran (bundle retries and superseded failures included).
        "rows_written_ok": counters.get("rows_written_ok", 0),
        "rows_written_failed": counters.get("rows_written_failed", 0),
        "requests": requests,
        "requests_per_second": round(requests / wall, 1) if wall > 0 else 0.0,
        "tokens_per_second": fig["tokens_per_second"],
        # First send to last answer: the steady rate, without start-up and compaction.
        "sending_seconds": None if span is None else round(span, 3),
        "sending_requests_per_second": round(requests / span, 1) if span else None,
        "retries": counters.get("retries", c.retries),
        **{name: counters.get(name, 0) for name in ("skipped_done", "duplicates")},
        # Pacing: seconds paused by the server, throttled (paused, waiting for a budget or a
        # permit, or held below the cap by the adaptive window), window cuts, budget waits.
        **{name: counters.get(name, 0)
           for name in ("paused_seconds", "throttled_seconds", "window_cuts", "budget_waits")},
        "run": fig,
        "written_by": "launcher",
        **live.base(wall),
    }
    summary["resume"]["skipped_done"] = summary["skipped_done"]
    this_run = cost(c.tokens, job.options.prices)
    if this_run is not None:
        summary["cost"] = {**summary.get("cost", {}), "prices_per_million": job.options.prices,
                           "this_run": this_run}
    return summary


def write_summary(summary: dict[str, Any]) -> None:
    """``OUTPUT/summary.json``, and the one-line summary on stdout."""
    output = summary["output"]
    try:
        save_summary(summary)
    except Exception:  # noqa: BLE001 - the pipeline wrote one already; this adds the counters
        log.warning("could not write summary.json", exc_info=True)
    reasons = top_reasons(summary)
    span = summary["sending_seconds"]
    total_cost = (summary.get("cost") or {}).get("this_run", {}).get("total")
    print(
        f"summary: ok={summary['ok']} failed={summary['failed']} " + (f"({reasons}) " if reasons else "")
        + f"wall={summary['wall_seconds']:.1f}s req/s={summary['requests_per_second']}"
        + (f" (sending {span:.1f}s at {summary['sending_requests_per_second']} req/s)" if span else "")
        + f" tokens={summary['run']['tokens']['total_tokens']}"
        + (f" cost={total_cost:g}" if total_cost is not None else "")
        + f" skipped={summary['skipped_done']}"
        + (f" duplicate_rows={summary['duplicate_rows']}" if summary["duplicate_rows"] else "")
        + f" output={output}",
        flush=True,
    )


def run(argv: Sequence[str] | None = None, *, save_main_session: bool = False) -> dict[str, Any]:
    """Parse ``argv``, check, run the pipeline, print and return the summary."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, beam_args = build_parser().parse_known_args(argv)
    check_unknown_flags(beam_args)
    job = configure(args, beam_args)
    logging.getLogger("arkbatch_beam").setLevel(job.options.log_level)
    check_environment(job)
    files = check_input(args)
    check_model(args, files, job.inputs)
    if not job.options.no_preflight:
        preflight(job.config)
    check_output(job)
    live = None if detached(job) else LiveSummary(job, JobProgress())
    result, wall = execute(job, files, save_main_session=save_main_session, live=live)
    if detached(job):
        # The job goes on without us (--no_wait_until_finish, a Flex Template): its last step
        # writes OUTPUT/summary.json; nothing here waits for it.
        print(f"submitted: the job writes {job.output}/summary.json when it ends "
              f"(python -m arkbatch_beam.report {job.output} reads the output at any time)", flush=True)
        return {"output": job.output, "written_by": "pipeline", "submitted": True}
    summary = job_summary(job, result, wall, live)
    write_summary(summary)
    return summary


def detached(job: Job) -> bool:
    """Whether the launcher only submits or stages the job: ``--no_wait_until_finish``, or a
    Flex Template launch (the launcher passes ``--template_location``: Beam writes the job file
    and the run "finishes" at once, before the job has started)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    options = PipelineOptions(list(job.beam_args))
    return bool(options.view_as(StandardOptions).no_wait_until_finish
                or options.view_as(GoogleCloudOptions).template_location)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 when the pipeline ran, 2 on a usage error, 1 when the job was stopped."""
    try:
        run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        stopped = job_error_in(exc)  # however the runner wrapped it (another process: its text)
        if stopped is None:
            raise
        print(f"error: {stopped.message.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
