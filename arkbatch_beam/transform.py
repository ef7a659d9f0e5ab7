"""``BatchChatInference``: the PTransform users put between a reader and a writer.

    p | ReadFromText(...) | BatchChatInference("ep-...") | WriteResults(out)

Its ``expand()`` only composes: parse/normalise -> reshuffle -> infer (through the
per-worker shared runtime) -> rows. By default it returns one PCollection holding every row,
answered or failed (the ``status`` column tells which), so nothing is lost between steps;
``.with_exception_handling()`` returns ``(results, failures)`` instead, in the spirit of
RunInference.

Example:
    >>> import os, apache_beam as beam
    >>> from arkbatch_beam import BatchChatInference, Endpoint
    >>> from arkbatch_beam.testing import FakeArkServer
    >>> with FakeArkServer(api_key=None) as server:
    ...     ep = Endpoint("ep-demo", base_url=server.base_url, api_key_env="")
    ...     with beam.Pipeline() as p:
    ...         _ = (p | beam.Create(["hello", "{bad json"])
    ...                | BatchChatInference(ep, max_concurrency=8)
    ...                | beam.Map(lambda r: print(r["status"], r["content"] or r["error_type"])))
    failed invalid_json
    ok echo: hello
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from ._config import ClientConfig, Endpoint
from ._dofn import InferDoFn, ParseDoFn
from ._inputs import InputOptions
from ._progress import JobProgress
from ._resume import DedupeAndSkip, ReadDoneIds
from ._types import STATUS_OK

# The tag of the failure rows' output under with_exception_handling().
FAILED_TAG = "failed"


class _SplitByStatus(beam.DoFn):
    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        yield row if row["status"] == STATUS_OK else beam.pvalue.TaggedOutput(FAILED_TAG, row)


class BatchChatInference(beam.PTransform):  # type: ignore[type-arg]
    """Chat inference over a PCollection of JSONL lines (str or bytes) or dicts.

    Args:
        endpoint: an Ark endpoint id (``"ep-..."``: Ark's base URL, batch path, key from
            ``ARK_API_KEY``), an :class:`Endpoint` for any OpenAI-compatible server, or a
            complete :class:`ClientConfig`.
        input_options: how lines become requests (:class:`InputOptions`).
        dedupe: key requests by ``custom_id`` so a repeated id is sent once (the others
            become ``duplicate_custom_id`` failure rows); this shuffle also spreads the work
            across workers. Off: no shuffle at all, so read -> infer -> write stream through
            with flat memory even on the DirectRunner (whose shuffle holds the whole input in
            memory); a repeated id is then sent again (compaction keeps one row per id and
            request; an answer to another request with the same id, told apart by
            ``request_sha256``, is kept as a ``duplicate_custom_id`` row under ``failures/``).
        resume_from: an output folder of an earlier run of the same job: ids that already
            have a final row there (an ``ok`` row, or a ``rejected`` one: the server's verdict
            on a valid request) are not sent again; everything else is read, checked and sent
            again, so a fixed input or option takes effect (see ``--resume``).
        retry_failed: with ``resume_from``, re-send ``rejected`` requests too.
        include_request: keep ``request_json`` on ok rows too (failures always keep it).
        max_pending: most outstanding requests per bundle (default 2 x max_concurrency).
        progress: the job's :class:`JobProgress` (inputs expected, ids skipped) for the
            progress lines; one is made when not given.
        rate_limiter: a Beam ``apache_beam.io.components.rate_limiter.RateLimiter`` (e.g.
            ``EnvoyRateLimiter``, backed by an Envoy rate-limit service: a real fleet-wide
            quota). Every request (retries included) also waits for its ``allow()``, asked on
            a thread of its own in each worker process, never on the event loop.
        **overrides: any :class:`ClientConfig` field (``max_concurrency=200``,
            ``timeout=3600``, ``backoff=Backoff(...)``, ...), applied over ``endpoint``'s
            config (or the defaults), and any :class:`InputOptions` field (``template="Summarise:
            {text}"``, ``response_format=...``, ``thinking="enabled"``, ``keep_columns="id"``, ...),
            applied over ``input_options``.
    """

    def __init__(
        self,
        endpoint: str | Endpoint | ClientConfig,
        *,
        input_options: InputOptions | None = None,
        dedupe: bool = True,
        resume_from: str | None = None,
        retry_failed: bool = False,
        include_request: bool = False,
        max_pending: int | None = None,
        progress: JobProgress | None = None,
        rate_limiter: Any = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        fields = {f.name for f in dataclasses.fields(ClientConfig)} - {"endpoint"}
        input_fields = {f.name for f in dataclasses.fields(InputOptions)}
        unknown = sorted(set(overrides) - fields - input_fields)
        if unknown:
            raise TypeError(
                f"BatchChatInference got unknown options {unknown}; the ClientConfig fields are {sorted(fields)} "
                f"and the InputOptions fields are {sorted(input_fields)}"
            )
        input_overrides = {k: overrides.pop(k) for k in list(overrides) if k in input_fields}
        for given, derived in (("response_format", "response_format_json"), ("template_file", "messages_template")):
            if given in input_overrides:  # read again from the new value
                input_overrides.setdefault(derived, None)
        if isinstance(endpoint, ClientConfig):
            config = dataclasses.replace(endpoint, **overrides) if overrides else endpoint
        else:
            config = ClientConfig(Endpoint(endpoint) if isinstance(endpoint, str) else endpoint, **overrides)
        self.config = config
        if input_options is None:
            input_overrides = {"model": config.endpoint.model, "batch_path": config.endpoint.is_batch,
                               **input_overrides}
            input_options = InputOptions(**input_overrides)
        elif input_overrides:
            input_options = dataclasses.replace(input_options, **input_overrides)
        self.input_options = input_options
        if resume_from is not None and not dedupe:
            raise ValueError("resume_from needs dedupe=True")
        self._dedupe = dedupe
        self._resume_from = resume_from
        self._retry_failed = retry_failed
        self._include_request = include_request
        if max_pending is not None and not 1 <= max_pending <= 1_000_000:
            raise ValueError(f"max_pending must be in 1..1000000, got {max_pending}")
        self._max_pending = max_pending
        self.progress = progress or JobProgress()
        self._rate_limiter = rate_limiter
        self._exception_handling = False

    def with_exception_handling(self) -> BatchChatInference:
        """Return ``(results, failures)`` from ``expand`` instead of one PCollection."""
        self._exception_handling = True
        return self

    def display_data(self) -> dict[str, Any]:
        data = dict(self.config.describe())
        data["input_format"] = self.input_options.input_format
        data["dedupe"] = self._dedupe
        if self._resume_from:
            data["resume_from"] = self._resume_from
        return data

    def __repr__(self) -> str:
        return f"BatchChatInference({self.config.endpoint.url!r})"

    def expand(self, lines: beam.PCollection[Any]) -> Any:
        # One PCollection all the way (requests and failure rows together; InferDoFn passes
        # rows through) and no Flatten: runners that materialise a Flatten (Beam's in-process
        # FnApiRunner) would otherwise hold every result until the end instead of letting a
        # writer fused after this transform make them durable as they come.
        items = lines | "Parse" >> beam.ParDo(ParseDoFn(self.input_options, self.progress))
        if self._dedupe:
            done = None
            if self._resume_from is not None:
                done = lines.pipeline | "DoneIds" >> ReadDoneIds(
                    self._resume_from, retry_failed=self._retry_failed
                )
            # Requests cross this shuffle as their input line only and are parsed again after it.
            items = items | "Dedupe" >> DedupeAndSkip(
                done, input_options=self.input_options, progress=self.progress
            )
        rows = items | "Infer" >> beam.ParDo(
            InferDoFn(
                self.config,
                max_pending=self._max_pending,
                include_request=self._include_request,
                progress=self.progress,
                rate_limiter=self._rate_limiter,
            )
        )
        if self._exception_handling:
            split = rows | "SplitByStatus" >> beam.ParDo(_SplitByStatus()).with_outputs(FAILED_TAG, main="ok")
            return split.ok, split[FAILED_TAG]
        return rows
