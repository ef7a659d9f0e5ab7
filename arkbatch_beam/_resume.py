"""Exactly-once bookkeeping: duplicate ids in the input, and ``--resume`` from an output folder.

Both happen in one keyed step before inference: every parsed request and every bad-input row is
keyed by ``custom_id``; with ``resume_from`` the ids that already have a *final* row in that
output folder are keyed in too. Per id:

* a final row exists -> nothing is sent (counted as ``skipped_done``);
* otherwise the first item (deterministically: a valid request before a bad line, then the
  smallest input line, so the same on every run) is sent, or its bad-input row emitted; any
  other item with the same id becomes a ``duplicate_custom_id`` failure row, never sent.

"Final" is decided by one table, :data:`~arkbatch_beam._errors.ERROR_TYPES` (see
:func:`~arkbatch_beam._errors.final_on_resume`): an ``ok`` row, or the server's own verdict on
a valid request (``rejected``). Whatever the input or the options decided (a bad line, no
model, a duplicate id, a wrong key) and every retryable failure is decided afresh on the next
run, so fixing the input or an option and re-running with ``--resume`` sends what it fixed;
``retry_failed=True`` re-sends ``rejected`` ones too. The ids are read inside the pipeline
through Beam's FileSystems, so the output folder may be ``gs://`` and nothing depends on one
machine's local state.

What crosses the shuffle is kept small: a request travels as its input line only (a ``str``;
with ``input_options`` it is parsed again after the shuffle, and only the copy that is sent
needs that), a bad-input row as a tuple of its values, a final id as ``None``. Per id, the
grouped values are read twice as a stream (once to find the winner, once to emit the other
copies' rows), never sorted into one list, so an id repeated a million times (identical
prompts whose ids are derived, a constant id column) needs no memory per copy here.

Example:
    >>> import apache_beam as beam
    >>> from arkbatch_beam._types import ChatRequest
    >>> reqs = [ChatRequest("a", {"messages": []}, "x"), ChatRequest("a", {"messages": []}, "y")]
    >>> with beam.Pipeline() as p:
    ...     out = p | beam.Create(reqs) | DedupeAndSkip(None)
    ...     _ = out | beam.Map(lambda x: print("send", x.raw) if isinstance(x, ChatRequest) else print(x["error_type"]))
    send x
    duplicate_custom_id
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from ._errors import DUPLICATE, InternalError, final_on_resume
from ._inputs import InputOptions, parse_input
from ._parquet_io import iter_batches
from ._progress import JobProgress
from ._sink import FAILURES_DIR, RESULTS_DIR, part_files
from ._types import NAMESPACE, RESULT_FIELDS, STATUS_FAILED, ChatRequest, ChatResult, request_hash

log = logging.getLogger("arkbatch_beam")

_REQUEST_JSON = RESULT_FIELDS.index("request_json")
_REQUEST_SHA = RESULT_FIELDS.index("request_sha256")

# The shuffle's value types (plain values: Beam's default coder writes them compactly):
#   None         the id already has a final row (resume)
#   str          a request, as its input line (re-parsed after the shuffle)
#   ChatRequest  a request without a line to rebuild it from (or no InputOptions): as is
#   tuple        a bad-input row: its values in RESULT_FIELDS order
Shuffled = str | ChatRequest | tuple | None


class _DoneIdsFromFile(beam.DoFn):
    def __init__(self, retry_failed: bool) -> None:
        self._retry_failed = retry_failed

    def process(self, item: tuple[str, str]):
        kind, path = item
        if kind != RESULTS_DIR and self._retry_failed:
            return
        columns = ["custom_id", "status"] if kind == RESULTS_DIR else ["custom_id", "retryable", "error_type"]
        # In record batches: a merged file of 500,000 rows is never one list of Python values.
        for batch in iter_batches(path, columns):
            names = batch.schema.names
            cols = {c: batch.column(c).to_pylist() if c in names else [None] * batch.num_rows for c in columns}
            if kind == RESULTS_DIR:
                for cid, status in zip(cols["custom_id"], cols["status"], strict=True):
                    if final_on_resume(status, None, None):
                        yield cid
                continue
            for cid, retryable, etype in zip(cols["custom_id"], cols["retryable"], cols["error_type"], strict=True):
                if final_on_resume(STATUS_FAILED, etype, retryable):
                    yield cid


class ReadDoneIds(beam.PTransform):
    """The ids that already have a final row under ``output`` (empty if there is none).

    Final: an ``ok`` row, or a failure that :func:`~arkbatch_beam._types.final_on_resume`
    calls final (``rejected``); with ``retry_failed`` only ``ok`` rows.

    Example:
        >>> import tempfile
        >>> from ._schema import OUTPUT_SCHEMA
        >>> from ._sink import write_parquet_atomic
        >>> out = tempfile.mkdtemp()
        >>> _ = write_parquet_atomic([ChatResult.failure("a", "rejected", "no").to_row(),
        ...                           ChatResult.failure("b", "no_messages", "none").to_row()],
        ...                          out + "/failures", OUTPUT_SCHEMA)
        >>> with beam.Pipeline() as p:
        ...     _ = p | ReadDoneIds(out) | beam.Map(print)
        a
    """

    def __init__(self, output: str, *, retry_failed: bool = False) -> None:
        super().__init__()
        self._output = output.rstrip("/")
        self._retry_failed = retry_failed

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        def list_files(output: str):
            for kind in (RESULTS_DIR, FAILURES_DIR):
                for meta in part_files(FileSystems.join(output, kind)):
                    yield kind, meta.path

        return (
            pbegin
            | "Output" >> beam.Create([self._output])
            | "ListParts" >> beam.FlatMap(list_files)
            | "Spread" >> beam.Reshuffle()
            | "Ids" >> beam.ParDo(_DoneIdsFromFile(self._retry_failed))
        )


def shuffle_value(item: ChatRequest | dict[str, Any], *, rebuildable: bool = True) -> tuple[str, Shuffled]:
    """``(custom_id, value)`` as it crosses the dedupe shuffle (see the module docstring).

    Args:
        item: a parsed request, or a bad-input row.
        rebuildable: a request may travel as its input line alone (it is parsed again after
            the shuffle, with the same :class:`InputOptions`).

    Example:
        >>> shuffle_value(ChatRequest("a", {"messages": [{"role": "user", "content": "hi"}]}, "hi"))
        ('a', 'hi')
        >>> shuffle_value({"custom_id": "b", "status": "failed"})[1][:3]
        ('b', 'failed', None)
    """
    if isinstance(item, ChatRequest):
        if rebuildable and item.raw is not None:
            return item.custom_id, item.raw
        return item.custom_id, item
    return item["custom_id"], tuple(item.get(f) for f in RESULT_FIELDS)


def _sort_key(value: Shuffled) -> tuple[int, str]:
    # Valid requests before bad-input rows (a broken copy of a line whose id was salvaged must
    # never win over a valid one); then the smallest line.
    if isinstance(value, str):
        return (0, value)
    if isinstance(value, ChatRequest):
        return (0, value.raw or "")
    return (1, value[_REQUEST_JSON] or "")  # type: ignore[index]


class _Resolve(beam.DoFn):
    def __init__(self, options: InputOptions | None, progress: JobProgress | None) -> None:
        self._options = options
        self._progress = progress

    def _skip(self, n: int) -> None:
        if self._progress is not None:
            self._progress.add_skipped(n)

    def _duplicates(self, n: int) -> None:
        if self._progress is not None:
            self._progress.add_failed(n)

    def setup(self) -> None:
        self._skipped = Metrics.counter(NAMESPACE, "skipped_done")
        self._dups = Metrics.counter(NAMESPACE, "duplicates")
        self._last_line: tuple[str, str | None] | None = None

    def process(self, group: tuple[str, Iterable[Shuffled]]):
        cid, values = group
        if iter(values) is values:  # a one-shot iterator (runners give re-iterables): keep it
            values = list(values)
        # Pass 1: a final row? the winner? (A stream: no list of the group is ever built.)
        done = False
        n = 0
        best: Shuffled = None
        best_key: tuple[int, str] | None = None
        for value in values:
            if value is None:
                done = True
                continue
            n += 1
            if done:
                continue  # only counted from here on
            key = _sort_key(value)
            if best_key is None or key < best_key:
                best, best_key = value, key
        if done:
            self._skipped.inc(n)
            self._skip(n)
            return
        if best_key is None:
            return
        yield self._winner(cid, best)
        if n == 1:
            return
        self._duplicates(n - 1)
        # Pass 2: every other copy becomes a duplicate_custom_id row, emitted as it is read.
        passed_winner = False
        for value in values:
            if value is None:
                continue
            if not passed_winner and value == best:
                passed_winner = True  # (identical copies: any one of them is "the" winner)
                continue
            self._dups.inc()
            raw, sha = self._line_and_hash(value)
            yield (
                ChatResult.failure(
                    cid,
                    DUPLICATE,
                    f"custom_id {cid!r} appears more than once in the input; only one copy is sent",
                    request_json=raw,
                    request_sha256=sha,
                ).to_row()
            )

    def _parse(self, line: str) -> ChatRequest | None:
        parsed = parse_input(line, self._options) if self._options is not None else None
        return parsed if isinstance(parsed, ChatRequest) else None

    def _winner(self, cid: str, value: Shuffled) -> Any:
        if isinstance(value, ChatRequest):
            return value
        if isinstance(value, tuple):
            return dict(zip(RESULT_FIELDS, value, strict=True))
        assert isinstance(value, str)
        request = self._parse(value)
        if request is not None and request.custom_id == cid:
            return request
        # The parser read this line as a valid request with this id before the shuffle: a
        # different verdict now is a fault here (never a reason to fail the job).
        return (
            ChatResult.failure(
                cid, InternalError.error_type, "the request could not be rebuilt from its input line after the dedupe "
                "shuffle (parsed differently the second time)", request_json=value,
            ).to_row()
        )

    def _line_and_hash(self, value: Shuffled) -> tuple[str | None, str | None]:
        """A duplicate's ``request_json`` and ``request_sha256``."""
        if isinstance(value, ChatRequest):
            return value.raw, request_hash(value.body)
        if isinstance(value, tuple):
            return value[_REQUEST_JSON], value[_REQUEST_SHA]
        assert isinstance(value, str)
        last = self._last_line  # a hot id is often one line repeated: parse it once
        if last is None or last[0] != value:
            request = self._parse(value)
            last = self._last_line = (value, request_hash(request.body) if request is not None else None)
        return value, last[1]


class DedupeAndSkip(beam.PTransform):
    """Requests and bad-input rows -> one request per id, and failure rows (dicts), in one PCollection.

    Args:
        done_ids: a PCollection of ids that already have a final row, or ``None``.
        progress: counts the ids that need no request (done, duplicates) for the progress line.
        input_options: the options the requests were parsed with. Given, a request crosses
            the shuffle as its input line alone and is parsed again after it (about half the
            bytes); ``None`` carries the parsed request (its body and its line).

    Example:
        >>> opts = InputOptions()
        >>> items = [parse_input(line, opts) for line in ("hi", " hi")]  # one derived id
        >>> with beam.Pipeline() as p:
        ...     out = p | beam.Create(items) | DedupeAndSkip(None, input_options=opts)
        ...     _ = out | beam.Map(lambda x: print(repr(x.raw) if isinstance(x, ChatRequest) else x["error_type"]))
        ' hi'
        duplicate_custom_id
    """

    def __init__(
        self,
        done_ids: beam.PCollection | None,
        *,
        input_options: InputOptions | None = None,
        progress: JobProgress | None = None,
    ) -> None:
        super().__init__()
        self._done = done_ids
        self._options = input_options
        self._progress = progress

    def expand(self, items: beam.PCollection) -> Any:
        rebuildable = self._options is not None
        keyed = items | "KeyById" >> beam.Map(shuffle_value, rebuildable=rebuildable).with_output_types(
            typehints.Tuple[str, typehints.Any]
        )
        if self._done is not None:
            done = self._done | "KeyDone" >> beam.Map(lambda cid: (cid, None))
            keyed = (keyed, done) | "WithDone" >> beam.Flatten()
        return (
            keyed
            | "GroupById" >> beam.GroupByKey()
            | "Resolve" >> beam.ParDo(_Resolve(self._options, self._progress))
        )
