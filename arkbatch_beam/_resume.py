"""Exactly-once bookkeeping: duplicate ids in the input, and ``--resume`` from an output folder.

Both happen in one keyed step before inference: every parsed request and every bad-input row is
keyed by ``custom_id``; with ``resume_from`` the ids that already have a *final* row in that
output folder are keyed in too. Per id:

* a final row exists -> nothing is sent (counted as ``skipped_done``);
* otherwise the first item (deterministically: a valid request before a bad line, then the
  smallest input line, so the same on every run) is sent, or its bad-input row emitted; any
  other item with the same id becomes a ``duplicate_custom_id`` failure row, never sent.

"Final" means an ``ok`` row, or a failure that is not retryable (a retryable failure, such as
``deadline_exceeded``, is sent again; ``retry_failed=True`` re-sends every failure). The ids are
read inside the pipeline through Beam's FileSystems, so the output folder may be ``gs://`` and
nothing depends on one machine's local state.

Example:
    >>> import apache_beam as beam
    >>> from arkbatch_beam._types import ChatRequest
    >>> reqs = [ChatRequest("a", {"messages": []}, "x"), ChatRequest("a", {"messages": []}, "y")]
    >>> with beam.Pipeline() as p:
    ...     out = p | beam.Create(reqs) | DedupeAndSkip(None)
    ...     _ = out.send | "s" >> beam.Map(lambda r: print("send", r.raw))
    ...     _ = out.failed | "f" >> beam.Map(lambda r: print(r["error_type"]))
    send x
    duplicate_custom_id
"""

from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from . import _runtime
from ._sink import FAILURES_DIR, RESULTS_DIR, part_files, read_columns
from ._types import DUPLICATE, STATUS_OK, ChatRequest, ChatResult

log = logging.getLogger("arkbatch_beam")

FAILED_TAG = "failed"
_DONE = 0  # sort order inside a group: done markers first, then rows/requests
_ITEM = 1


class _DoneIdsFromFile(beam.DoFn):
    def __init__(self, retry_failed: bool) -> None:
        self._retry_failed = retry_failed

    def process(self, item: tuple[str, str]):
        kind, path = item
        if kind == "results":
            cols = read_columns(path, ["custom_id", "status"])
            for cid, status in zip(cols["custom_id"], cols["status"], strict=True):
                if status == STATUS_OK:
                    yield cid
        elif not self._retry_failed:
            cols = read_columns(path, ["custom_id", "retryable", "error_type"])
            for cid, retryable, etype in zip(
                cols["custom_id"], cols["retryable"], cols["error_type"], strict=True
            ):
                # endpoint_error (401/403/404: a key or endpoint that was wrong then) is
                # fixed on the user's side, so it is never final: --resume sends it again.
                if not retryable and etype not in (DUPLICATE, "endpoint_error"):
                    yield cid


class ReadDoneIds(beam.PTransform):
    """The ids that already have a final row under ``output`` (empty if there is none)."""

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


def _sort_key(item: tuple[int, Any]) -> tuple[int, int, str]:
    # "done" first; then valid requests before bad-input rows (a broken copy of a line whose
    # id was salvaged must never win over a valid one); then the smallest line.
    kind, value = item
    if kind == _DONE:
        return (0, 0, "")
    if isinstance(value, ChatRequest):
        return (1, 0, value.raw or "")
    return (1, 1, value.get("request_json") or "")


class _Resolve(beam.DoFn):
    def __init__(self, tagged: bool = True) -> None:
        self._tagged = tagged

    def _failed(self, row: dict[str, Any]) -> Any:
        return beam.pvalue.TaggedOutput(FAILED_TAG, row) if self._tagged else row

    def setup(self) -> None:
        self._skipped = Metrics.counter("arkbatch", "skipped_done")
        self._dups = Metrics.counter("arkbatch", "duplicates")

    def process(self, group: tuple[str, Any]):
        cid, items = group
        items = sorted(items, key=_sort_key)
        if items[0][0] == _DONE:
            skipped = sum(1 for k, _ in items if k != _DONE)
            self._skipped.inc(skipped)
            _runtime.note_skipped(skipped)
            return
        first = items[0][1]
        if isinstance(first, ChatRequest):
            yield first
        else:
            yield self._failed(first)
        if len(items) > 1:
            _runtime.note_skipped(len(items) - 1)
        for _, value in items[1:]:
            self._dups.inc()
            raw = value.raw if isinstance(value, ChatRequest) else value.get("request_json")
            yield self._failed(
                ChatResult.failure(
                    cid,
                    DUPLICATE,
                    f"custom_id {cid!r} appears more than once in the input; only one copy is sent",
                    request_json=raw,
                ).to_row(),
            )


class DedupeAndSkip(beam.PTransform):
    """Requests and bad-input rows -> one request per id (``send``) and failure rows (``failed``).

    Args:
        done_ids: a PCollection of ids that already have a final row, or ``None``.
        tagged: ``False`` returns one PCollection: requests and failure rows (dicts) together.
    """

    def __init__(self, done_ids: beam.PCollection | None, *, tagged: bool = True) -> None:
        super().__init__()
        self._done = done_ids
        self._tagged = tagged

    def expand(self, items: beam.PCollection) -> Any:
        def key(x: Any) -> tuple[str, tuple[int, Any]]:
            cid = x.custom_id if isinstance(x, ChatRequest) else x["custom_id"]
            return cid, (_ITEM, x)

        keyed = items | "KeyById" >> beam.Map(key)
        if self._done is not None:
            done = self._done | "KeyDone" >> beam.Map(lambda cid: (cid, (_DONE, None)))
            keyed = (keyed, done) | "WithDone" >> beam.Flatten()
        return (
            keyed
            | "GroupById" >> beam.GroupByKey()
            | "Resolve" >> (
                beam.ParDo(_Resolve(self._tagged)).with_outputs(FAILED_TAG, main="send")
                if self._tagged
                else beam.ParDo(_Resolve(False))
            )
        )
