"""Parquet output: parts written as the job runs by one writer per worker process, then merged.

Layout under the output folder (local or any Beam filesystem, e.g. ``gs://``)::

    results/part-<uuid>.parquet      rows with status "ok", written while the job runs
    failures/part-<uuid>.parquet     rows with status "failed"
    results/data-<B>-<b>-<run>-<k>.parquet, failures/data-...   after compaction: bucket b of B

**Writing** (:class:`WriteResults`): every DoFn instance and bundle thread of a worker process
hands its rows to one shared :class:`PartWriter` (per output folder and :class:`SinkConfig`),
which writes a part when its buffer holds ``part_rows`` rows or ``part_bytes`` bytes, or its
oldest row is ``part_seconds`` old (a timer thread: the age limit holds while no row arrives).
So the number of parts grows with worker processes x job time / age, not with threads x
bundles. A part is written under a hidden ``.tmp-`` name and renamed when complete, so readers
(``pyarrow.dataset``, Spark skip names starting with ``.``/``_``) never see a partial file.
Durability at bundle commit: ``finish_bundle`` returns only once every row the bundle handed
over is in a visible part (see :meth:`PartWriter.commit`), so a runner never commits a bundle
whose rows sit in a buffer; a ``kill -9`` loses the rows of uncommitted bundles (the runner
sends them again) and at most one buffer of rows nobody depends on yet.

**Compaction** (:class:`CompactOutput`, :func:`compact`, ``python -m arkbatch_beam.compact``):
a Beam stage. The parts are listed; each is read in record batches and its rows are routed to a
hash bucket of ``custom_id`` (``output_shards`` buckets, or one per ~32 MiB of parts), written
to hidden spill files (only references cross the runner's shuffle); each bucket is merged on
whichever worker gets it (memory bounded by the bucket's keys and one batch, never the job) and
written as its own merged files; only when every bucket's files are visible does one final step
delete the files they replace (and the spill files). See :func:`merge_bucket` for the rules.

Example:
    >>> import tempfile, pyarrow.parquet as pq, apache_beam as beam
    >>> out = tempfile.mkdtemp()
    >>> row = {"custom_id": "a", "status": "ok", "content": "hi", "attempts": 1}
    >>> with beam.Pipeline() as p:
    ...     _ = p | beam.Create([row]) | WriteResults(out)
    >>> pq.read_table(out + "/results").column("content").to_pylist()
    ['hi']
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ._config import SinkConfig
from ._parquet_io import iter_batches, open_parquet, read_columns
from ._schema import OUTPUT_SCHEMA
from ._types import DUPLICATE, NAMESPACE, STATUS_FAILED, STATUS_OK

__all__ = [
    "FAILURES_DIR",
    "RESULTS_DIR",
    "CompactOutput",
    "PartWriter",
    "WriteResults",
    "bucket_of",
    "merge_bucket",
    "plan",
    "compact",
    "part_files",
    "read_columns",
    "write_parquet_atomic",
]

log = logging.getLogger("arkbatch_beam")

RESULTS_DIR = "results"
FAILURES_DIR = "failures"

# Compaction: one bucket per this many bytes of input files (zstd Parquet), when not given.
BUCKET_BYTES = 32 * 1024 * 1024
# Reader: rows held before they are written to a spill file (its memory bound, besides a batch).
READER_BYTES = 32 * 1024 * 1024
_ORDER = "_order"  # helper column while merging: file rank << 32 | row (smaller = newer)
_BUCKET = "_bucket"  # helper column in the reader: the row's bucket
_DATA_NAME = re.compile(r"^data-(\d+)-(\d+)-[0-9a-f]+(?:-\d+)?\.parquet$")


def write_parquet_atomic(rows: list[dict[str, Any]], directory: str, schema: pa.Schema) -> str:
    """Write ``rows`` as one Parquet file in ``directory``; visible only once complete.

    Example:
        >>> import tempfile
        >>> write_parquet_atomic([{"custom_id": "a", "status": "ok"}], tempfile.mkdtemp(),
        ...                      OUTPUT_SCHEMA).rsplit("/", 1)[1][:5]
        'part-'
    """
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    name = f"part-{uuid.uuid4().hex}.parquet"
    final = FileSystems.join(directory, name)
    tmp = FileSystems.join(directory, ".tmp-" + name)
    _mkdirs(directory)
    with FileSystems.create(tmp) as f:
        f.write(buf.getvalue())
    FileSystems.rename([tmp], [final])
    return final


def _mkdirs(directory: str) -> None:
    if not FileSystems.exists(directory):
        try:
            FileSystems.mkdirs(directory)
        except OSError:
            pass  # created concurrently by another worker; object stores need none


def part_files(directory: str) -> list[Any]:
    """Metadata of the visible Parquet files in ``directory`` (none if it does not exist).

    Example:
        >>> import tempfile
        >>> part_files(tempfile.mkdtemp() + "/results")
        []
    """
    pattern = FileSystems.join(directory, "*.parquet")
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - some filesystems raise when nothing matches
        return []
    return [m for m in found if not m.path.rsplit("/", 1)[-1].startswith((".", "_"))]


def _row_bytes(row: dict[str, Any]) -> int:
    return 8 * len(row) + sum(len(v) for v in row.values() if isinstance(v, str))


# --- writing: one part writer per process ---------------------------------------------------------


class PartWriter:
    """The process's buffer of output rows for one output folder, written as parts.

    Thread-safe; every DoFn instance and bundle thread of the process shares it (see
    :func:`acquire_writer`). Rows are buffered in *generations*: :meth:`add` returns the
    generation a row went into; a generation is written as one part per kind (results,
    failures) when it holds ``part_rows`` rows or ``part_bytes`` bytes, when its oldest row is
    ``part_seconds`` old (a daemon timer thread), or when a bundle commits.

    Example:
        >>> import tempfile
        >>> w = PartWriter(tempfile.mkdtemp(), SinkConfig(part_rows=2))
        >>> g1, _ = w.add({"custom_id": "a", "status": "ok"})
        >>> g2, paths = w.add({"custom_id": "b", "status": "failed"})  # full: written at once
        >>> len(paths), g1 == g2
        (2, True)
        >>> w.commit(g1, g2)  # already durable: nothing to write
        []
        >>> w.close()
    """

    def __init__(self, output: str, sink: SinkConfig, *, timer: bool = True) -> None:
        self._dirs = {
            True: FileSystems.join(output, RESULTS_DIR),
            False: FileSystems.join(output, FAILURES_DIR),
        }
        self.sink = sink
        self._cond = threading.Condition()
        self._gen = 0  # the generation rows are added to now
        self._buf: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        self._rows = self._bytes = 0
        self._since = 0.0
        self._pending: set[int] = set()  # generations taken out of the buffer, being written
        self._failed: set[int] = set()  # generations whose write failed (their bundles fail)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if timer:
            self._timer = threading.Thread(target=self._age_flusher, name="arkbatch-part-timer", daemon=True)
            self._timer.start()

    def add(self, row: dict[str, Any]) -> tuple[int, list[str]]:
        """Buffer ``row``; returns its generation and the parts written now (when it filled one)."""
        ok = row.get("status") == STATUS_OK
        size = _row_bytes(row)
        with self._cond:
            gen = self._gen
            if not self._rows:
                self._since = time.monotonic()
            self._buf[ok].append(row)
            self._rows += 1
            self._bytes += size
            full = (
                self._rows >= self.sink.part_rows
                or self._bytes >= self.sink.part_bytes
                or time.monotonic() - self._since >= self.sink.part_seconds
            )
            taken = self._take() if full else None
        return gen, self._write(taken) if taken else []

    def commit(self, first: int | None, last: int | None) -> list[str]:
        """Return once generations ``first..last`` (a bundle's rows) are in visible parts.

        Rows still in the current buffer are written now, by this thread (with every other row
        buffered so far: concurrent commits share a part); a generation another thread is
        writing is waited for. Raises if one of them could not be written (the bundle fails
        and the runner retries it). Returns the parts this call wrote.
        """
        if first is None or last is None:
            return []
        paths: list[str] = []
        with self._cond:
            taken = self._take() if self._gen <= last and self._rows else None
        if taken:
            paths = self._write(taken)
        with self._cond:
            self._cond.wait_for(lambda: not any(first <= g <= last for g in self._pending))
            failed = sorted(g for g in self._failed if first <= g <= last)
        if failed:
            raise OSError(f"arkbatch: writing a Parquet part failed (generation {failed[0]}); "
                          "the bundle is retried")
        return paths

    def flush(self) -> list[str]:
        """Write whatever is buffered now; returns the parts written."""
        with self._cond:
            taken = self._take() if self._rows else None
        return self._write(taken) if taken else []

    def close(self) -> None:
        """Write what is left and stop the timer thread."""
        self._stop.set()
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - only rows of bundles that never committed are lost
            log.warning("arkbatch: writing the last part failed", exc_info=True)

    def _take(self) -> tuple[int, dict[bool, list[dict[str, Any]]]]:
        """Take the current generation out of the buffer (call with the lock held)."""
        gen, buf = self._gen, self._buf
        self._pending.add(gen)
        self._gen += 1
        self._buf = {True: [], False: []}
        self._rows = self._bytes = 0
        return gen, buf

    def _write(self, taken: tuple[int, dict[bool, list[dict[str, Any]]]]) -> list[str]:
        gen, buf = taken
        paths = []
        try:
            for ok, rows in buf.items():
                if rows:
                    paths.append(write_parquet_atomic(rows, self._dirs[ok], OUTPUT_SCHEMA))
        except BaseException:
            with self._cond:
                self._failed.add(gen)
                self._pending.discard(gen)
                self._cond.notify_all()
            raise
        with self._cond:
            self._pending.discard(gen)
            self._cond.notify_all()
        return paths

    def _age_flusher(self) -> None:
        tick = min(1.0, self.sink.part_seconds / 2)
        while not self._stop.wait(tick):
            with self._cond:
                old = self._rows and time.monotonic() - self._since >= self.sink.part_seconds
                taken = self._take() if old else None
            if taken:
                try:
                    self._write(taken)
                except Exception:  # noqa: BLE001 - the bundles holding these rows fail at commit
                    log.warning("arkbatch: writing an aged part failed; its bundles will be retried",
                                exc_info=True)


_writers: dict[tuple[int, str, SinkConfig], list[Any]] = {}
_writers_lock = threading.Lock()


def acquire_writer(output: str, sink: SinkConfig) -> PartWriter:
    """The process's :class:`PartWriter` for ``output`` and ``sink``; pair with :func:`release_writer`.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> a, b = acquire_writer(out, SinkConfig()), acquire_writer(out, SinkConfig())
        >>> a is b
        True
        >>> release_writer(a); release_writer(b)
    """
    key = (os.getpid(), output, sink)
    with _writers_lock:
        entry = _writers.get(key)
        if entry is None:
            entry = _writers[key] = [PartWriter(output, sink), 0]
        entry[1] += 1
        return entry[0]


def release_writer(writer: PartWriter) -> None:
    """Drop one reference; the last one writes what is left and stops the timer."""
    with _writers_lock:
        for key, entry in list(_writers.items()):
            if entry[0] is writer:
                entry[1] -= 1
                if entry[1] > 0:
                    return
                del _writers[key]
                break
        else:
            return
    writer.close()


class _PartWriterDoFn(beam.DoFn):
    """Hands rows to the process's :class:`PartWriter`; ``finish_bundle`` commits them.

    Rows written are counted (``rows_written_ok``/``rows_written_failed``) at commit, in the
    bundle thread, once they are durable. The paths of parts written by this bundle's thread
    are emitted (parts the timer or other bundles wrote are not: downstream only waits for the
    writers to finish, and compaction lists the folder).
    """

    def __init__(self, output: str, sink: SinkConfig) -> None:
        self._output = output
        self._sink = sink

    def setup(self) -> None:
        self._written = {
            True: Metrics.counter(NAMESPACE, "rows_written_ok"),
            False: Metrics.counter(NAMESPACE, "rows_written_failed"),
        }
        self._writer: PartWriter | None = acquire_writer(self._output, self._sink)

    def teardown(self) -> None:
        writer, self._writer = getattr(self, "_writer", None), None
        if writer is not None:
            release_writer(writer)

    def start_bundle(self) -> None:
        self._first: int | None = None
        self._last: int | None = None
        self._n = {True: 0, False: 0}

    def process(self, row: dict[str, Any]):
        assert self._writer is not None  # set in setup()
        gen, paths = self._writer.add(row)
        if self._first is None:
            self._first = gen
        self._last = gen
        self._n[row.get("status") == STATUS_OK] += 1
        yield from paths

    def finish_bundle(self):
        assert self._writer is not None
        paths = self._writer.commit(self._first, self._last)
        for ok, n in self._n.items():
            if n:
                self._written[ok].inc(n)
        self._first = self._last = None
        for path in paths:
            yield WindowedValue(path, MIN_TIMESTAMP, (GlobalWindow(),))


def _sink_from(sink: SinkConfig | None, max_rows: int | None, max_seconds: float | None) -> SinkConfig:
    sink = sink if sink is not None else SinkConfig()
    changes: dict[str, Any] = {}
    if max_rows is not None:
        changes["part_rows"] = max_rows
    if max_seconds is not None:
        changes["part_seconds"] = max_seconds
    return dataclasses.replace(sink, **changes) if changes else sink


class WriteResults(beam.PTransform):
    """Write result and failure rows as Parquet parts under ``output``.

    Args:
        output: a folder path (local, ``gs://``, or any Beam filesystem).
        sink: part limits (:class:`~arkbatch_beam._config.SinkConfig`); default ``SinkConfig()``.
        max_rows, max_seconds: shorthands for ``sink``'s ``part_rows`` and ``part_seconds``.

    Returns a PCollection of part paths written by bundle threads; it is complete once every
    row is in a visible part (use it to sequence a later step, e.g. :class:`CompactOutput`).

    Example:
        >>> WriteResults("out/", sink=SinkConfig(part_rows=100)).sink.part_rows
        100
    """

    def __init__(
        self,
        output: str,
        *,
        sink: SinkConfig | None = None,
        max_rows: int | None = None,
        max_seconds: float | None = None,
    ) -> None:
        super().__init__()
        self.sink = _sink_from(sink, max_rows, max_seconds)
        self._output = output.rstrip("/")

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteParts" >> beam.ParDo(_PartWriterDoFn(self._output, self.sink))


# --- compaction ------------------------------------------------------------------------------------


def bucket_of(custom_id: str | None, buckets: int) -> int:
    """The compaction bucket of ``custom_id`` (stable across processes and runs: CRC-32).

    Example:
        >>> bucket_of("id-1", 16), bucket_of("id-1", 1)
        (12, 0)
    """
    if buckets <= 1 or custom_id is None:
        return 0
    return zlib.crc32(custom_id.encode("utf-8", "surrogatepass")) % buckets


def _conform(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """``table`` with exactly :data:`OUTPUT_SCHEMA`'s columns (a part written before a column was
    added gets it as nulls, so an older run's output can still be merged and resumed)."""
    names = set(table.schema.names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in names else pa.nulls(table.num_rows, f.type)
        for f in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)


def _with_order(table: pa.Table, rank: int, first_row: int) -> pa.Table:
    order = np.arange(first_row, first_row + table.num_rows, dtype=np.int64) + (rank << 32)
    return table.append_column(_ORDER, pa.array(order, pa.int64()))


def _answers_as_duplicates(table: pa.Table) -> pa.Table:
    """Ok rows answering *another* request than their id's result -> ``duplicate_custom_id`` rows.

    The answer (``content``, tokens, ``response_json``, ...) is kept; only ``status``,
    ``error_type``, ``error_message`` and ``retryable`` change.
    """
    n = table.num_rows
    message = [
        f"custom_id {cid!r} was used by another request too, which was answered (that row is the "
        f"result for this id); this row keeps the answer to this request (request_sha256 {sha})"
        for cid, sha in zip(table.column("custom_id").to_pylist(),
                            table.column("request_sha256").to_pylist(), strict=True)
    ]
    changes = {
        "status": pa.array([STATUS_FAILED] * n, pa.string()),
        "error_type": pa.array([DUPLICATE] * n, pa.string()),
        "error_message": pa.array(message, pa.string()),
        "retryable": pa.array([False] * n, pa.bool_()),
    }
    for name, values in changes.items():
        table = table.set_column(table.schema.get_field_index(name), OUTPUT_SCHEMA.field(name), values)
    return table


class Listed(NamedTuple):
    """One file of the output folder, as the compaction plan lists it."""

    kind: str  # RESULTS_DIR or FAILURES_DIR
    path: str
    size: int
    rank: int  # 0 = the newest file of its kind
    bucket: int | None  # a merged file of this plan's bucket count: its bucket (not re-shuffled)


@dataclasses.dataclass
class Plan:
    """What one compaction works on: the files listed at its start and the bucket count."""

    output: str
    buckets: int
    files: list[Listed]
    run: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def empty(self) -> bool:
        return not self.files


def plan(output: str, output_shards: int = 0, *, bucket_bytes: int = BUCKET_BYTES) -> Plan:
    """List the output folder and choose the bucket count.

    ``output_shards`` buckets when given; otherwise the bucket count the merged files already
    carry (so compacting twice rewrites nothing, and merged files are never shuffled again)
    unless the folder has outgrown it (more than twice as many buckets by size); otherwise one
    bucket per ``bucket_bytes`` of files.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> _ = write_parquet_atomic([{"custom_id": "a", "status": "ok"}], out + "/results", OUTPUT_SCHEMA)
        >>> p = plan(out)
        >>> p.buckets, [(f.kind, f.rank, f.bucket) for f in p.files]
        (1, [('results', 0, None)])
    """
    output = output.rstrip("/")
    metas = {kind: part_files(FileSystems.join(output, kind)) for kind in (RESULTS_DIR, FAILURES_DIR)}
    everything = [m for ms in metas.values() for m in ms]
    names = [_DATA_NAME.match(m.path.rsplit("/", 1)[-1]) for m in everything]
    by_size = max(1, min(100_000, math.ceil(sum(m.size_in_bytes for m in everything) / bucket_bytes)))
    carried = {int(n.group(1)) for n in names if n}
    if output_shards:
        buckets = output_shards
    elif len(carried) == 1 and by_size <= 2 * min(carried):
        # Keep the merged files' bucket count: each is then read by its bucket's merge alone,
        # never shuffled again (a --resume run's compaction moves only its new parts).
        buckets = carried.pop()
    else:
        buckets = by_size
    files = []
    for kind, ms in metas.items():
        ms = sorted(ms, key=lambda m: (-m.last_updated_in_seconds, m.path))
        for rank, m in enumerate(ms):
            match = _DATA_NAME.match(m.path.rsplit("/", 1)[-1])
            bucket = int(match.group(2)) if match is not None and int(match.group(1)) == buckets else None
            mine = bucket is not None and bucket < buckets
            files.append(Listed(kind, m.path, m.size_in_bytes, rank, bucket if mine else None))
    return Plan(output, buckets, files)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


# A value of the bucket shuffle: (kind, uid, what), where what is a Spilled reference to rows
# (with the _order column), a Listed merged file of that bucket (read by the merge itself), or
# (in tests) the rows as Arrow IPC bytes.
BucketValue = tuple[str, str, Any]


class Spilled(NamedTuple):
    """Rows of one bucket and kind: record batches ``first..end`` of a reader's spill file."""

    path: str
    first: int
    end: int


def spill_dir(output: str, run: str) -> str:
    """Where a compaction run's readers leave rows for the merges (hidden; removed at the end)."""
    return FileSystems.join(output, f".compact-{run}")


class _ReadIntoBucketsDoFn(beam.DoFn):
    """``(Listed, buckets, run)`` -> ``(bucket, (kind, uid, Spilled))``.

    The rows of the parts a bundle reads are gathered per (bucket, kind); when READER_BYTES
    are held, and at the end of the bundle, they are written as one Arrow IPC *spill file*
    (one record batch per bucket and kind) under :func:`spill_dir`, and only a reference to each
    batch crosses the shuffle. The runner's shuffle then carries a few bytes per bucket and
    spill file, never the rows (the DirectRunner holds a shuffle in memory, and a Dataflow
    shuffle bills by the byte); the reader holds at most READER_BYTES plus one record batch;
    each merge reads its own batches of each spill file. A spill file is complete before its
    references are emitted; one left by a failed bundle is never referenced, and the whole
    folder goes when the compaction ends. With ``to_files=False`` each (bucket, kind) slice
    crosses the runner's shuffle itself, as Arrow IPC bytes (a cluster runner's shuffle is
    built for that; no spill files, no small reads of them).
    """

    def __init__(self, output: str, to_files: bool = True) -> None:
        self._output = output
        self._to_files = to_files

    def setup(self) -> None:
        self._rows_read = Metrics.counter(NAMESPACE, "compact_rows_read")
        self._files_read = Metrics.counter(NAMESPACE, "compact_files_read")

    def start_bundle(self) -> None:
        # Whole batches per kind, each with its rows' bucket: no small slice is held (a slice per
        # part and bucket costs ~10 KB of Arrow metadata however few rows it has).
        self._held: dict[str, list[pa.Table]] = {}
        self._total = 0
        self._run = ""

    def process(self, item: tuple[Listed, int, str]):
        listed, buckets, run = item
        if listed.bucket is not None:  # a merged file of this bucket count: the merge reads it
            yield listed.bucket, (listed.kind, uuid.uuid4().hex, listed)
            return
        if self._run and run != self._run:
            yield from self._spill()
        self._run = run
        self._files_read.inc()
        row = 0
        for batch in iter_batches(listed.path, size=listed.size or None):
            table = _with_order(_conform(batch), listed.rank, row)
            row += table.num_rows
            ids = table.column("custom_id").to_pylist()
            keys = np.fromiter((bucket_of(c, buckets) for c in ids), dtype=np.int32, count=len(ids))
            self._held.setdefault(listed.kind, []).append(table.append_column(_BUCKET, pa.array(keys)))
            self._total += table.nbytes
            self._rows_read.inc(table.num_rows)
            if self._total >= READER_BYTES:
                yield from self._spill()

    def _slices(self, held: dict[str, list[pa.Table]]) -> Iterator[tuple[int, str, pa.Table]]:
        """The held rows as one table per (bucket, kind)."""
        for kind in list(held):
            table = pa.concat_tables(held.pop(kind))
            keys = table.column(_BUCKET).to_numpy()
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            table = table.drop_columns([_BUCKET]).take(pa.array(order))
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            ends = np.r_[starts[1:], len(keys)]
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                yield int(keys[s]), kind, table.slice(s, e - s).combine_chunks()

    def _spill(self) -> list[tuple[int, BucketValue]]:
        if not self._held:
            return []
        held, self._held, self._total = self._held, {}, 0
        if not self._to_files:  # the runner's shuffle carries the rows
            return [(bucket, (kind, uuid.uuid4().hex, _ipc(table))) for bucket, kind, table in self._slices(held)]
        directory = spill_dir(self._output, self._run)
        path = FileSystems.join(directory, f"{uuid.uuid4().hex}.arrow")
        buf = pa.BufferOutputStream()
        refs = []
        n = 0
        schema = OUTPUT_SCHEMA.append(pa.field(_ORDER, pa.int64()))
        with pa.ipc.new_file(buf, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            for bucket, kind, table in self._slices(held):
                batches = table.to_batches()
                for batch in batches:
                    w.write_batch(batch)
                refs.append((bucket, kind, n, n + len(batches)))
                n += len(batches)
        _mkdirs(directory)
        with FileSystems.create(path) as f:
            f.write(buf.getvalue())
        return [(bucket, (kind, uuid.uuid4().hex, Spilled(path, first, end))) for bucket, kind, first, end in refs]

    def finish_bundle(self):
        for value in self._spill():
            yield WindowedValue(value, MIN_TIMESTAMP, (GlobalWindow(),))


def _tables(value: BucketValue) -> Iterator[pa.Table]:
    _, _, what = value
    if isinstance(what, Listed):
        row = 0
        for batch in iter_batches(what.path, size=what.size or None):
            table = _with_order(_conform(batch), what.rank, row)
            row += table.num_rows
            yield table
    elif isinstance(what, Spilled):
        # Random access to this bucket's batches only; the IPC reader never uses threads.
        with FileSystems.open(what.path) as f:
            reader = pa.ipc.open_file(f)
            for i in range(what.first, what.end):
                yield pa.Table.from_batches([reader.get_batch(i)])
    else:
        yield _from_ipc(what)


def _decide_results(cids: list[Any], shas: list[Any]) -> np.ndarray:
    """Per row (sorted by id, newest first): 1 keep, 2 move to failures, 0 drop."""
    out = np.zeros(len(cids), dtype=np.int8)
    prev: Any = object()
    winner_sha: Any = None
    others: set[str] = set()
    for i, (cid, sha) in enumerate(zip(cids, shas, strict=True)):
        if cid != prev:
            prev, winner_sha, others = cid, sha, set()
            out[i] = 1
        elif sha is not None and winner_sha is not None and sha != winner_sha and sha not in others:
            # Unknown hashes (parts written before the column existed) count as copies.
            others.add(sha)
            out[i] = 2
    return out


def _decide_failures(cids: list[Any], dups: list[bool], shas: list[Any], lines: list[Any],
                     answered: list[bool]) -> np.ndarray:
    """Per row (sorted by id, newest first): True keep."""
    out = np.zeros(len(cids), dtype=bool)
    prev: Any = object()
    seen_final = False
    seen_dups: set[tuple[Any, Any]] = set()
    for i, cid in enumerate(cids):
        if cid != prev:
            prev, seen_final, seen_dups = cid, False, set()
        if dups[i]:
            key = (shas[i], lines[i])
            if key not in seen_dups:
                seen_dups.add(key)
                out[i] = True
        elif not seen_final and not answered[i]:
            seen_final = True
            out[i] = True
    return out


def _groups(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by id: (the row starts its id's group, the id has more than one row)."""
    ids = pc.fill_null(table.column("custom_id"), "").combine_chunks()
    n = len(ids)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    group = np.cumsum(first) - 1
    return first, np.bincount(group)[group] > 1


def _sorted_by_id(table: pa.Table) -> np.ndarray:
    return pc.sort_indices(table, sort_keys=[("custom_id", "ascending"), (_ORDER, "ascending")]).to_numpy()


class _FileWriter:
    """Merged rows of one bucket and kind -> ``data-<B>-<b>-<run>-<k>.parquet`` files.

    Each is written under a ``.tmp-`` name; all are renamed by :meth:`close`, once the bucket is
    complete, so a failed attempt makes nothing visible (:meth:`abort` removes its files). The
    names are the same on a retry of the bucket, so the runner's retry of a merge overwrites
    what an earlier attempt may have made visible instead of adding a second copy.
    """

    def __init__(self, directory: str, buckets: int, bucket: int, rows_per_file: int, run: str = "0") -> None:
        self._dir = directory
        self._prefix = f"data-{buckets}-{bucket}-{run}-"
        self._rows_per_file = rows_per_file
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._names: list[tuple[str, str]] = []  # (tmp, final) per file
        self.paths: list[str] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                _mkdirs(self._dir)
                name = f"{self._prefix}{len(self._names)}.parquet"
                self._names.append((FileSystems.join(self._dir, ".tmp-" + name), FileSystems.join(self._dir, name)))
                self._file = FileSystems.create(self._names[-1][0])
                self._writer = pq.ParquetWriter(self._file, OUTPUT_SCHEMA, compression="zstd")
                self._rows = 0
            take = min(table.num_rows, self._rows_per_file - self._rows)
            self._writer.write_table(table.slice(0, take), row_group_size=65_536)
            self._rows += take
            self.rows += take
            table = table.slice(take)
            if self._rows >= self._rows_per_file:
                self._end_file()

    def _end_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None

    def close(self) -> None:
        """Make every file visible (each rename is atomic)."""
        self._end_file()
        for tmp, final in self._names:
            FileSystems.rename([tmp], [final])
            self.paths.append(final)
        self._names = []

    def abort(self) -> None:
        """Drop the files written so far (a failed merge makes nothing visible)."""
        try:
            self._end_file()
        except Exception:  # noqa: BLE001 - the file is dropped anyway
            pass
        tmps = [tmp for tmp, _ in self._names]
        self._names = []
        try:
            if tmps:
                FileSystems.delete(tmps)
        except Exception:  # noqa: BLE001 - hidden .tmp- files are all that can be left
            log.warning("arkbatch: could not remove %d unfinished merged files", len(tmps), exc_info=True)


def merge_bucket(
    output: str,
    buckets: int,
    bucket: int,
    values: Iterable[BucketValue],
    *,
    rows_per_file: int = 500_000,
    run: str = "0",
) -> tuple[dict[str, int], list[str]]:
    """Merge one bucket's rows into its own merged files; returns (rows kept per kind, kept paths).

    The rules: an ``ok`` row beats any failure for the same id; among copies of the same kind
    the newest file wins (then the first row in it). An ``ok`` row whose ``request_sha256``
    differs from the winner's is not a copy but the answer to another request with the same id
    (``--no_dedupe``, two inputs numbering their lines alike): it is kept, as a
    ``duplicate_custom_id`` row under ``failures/`` with its answer, once per (id, request
    hash); a row with no hash (written before the column existed) counts as a copy.
    ``duplicate_custom_id`` rows are kept once per (id, request hash, request line).

    ``values`` is read more than once (a Beam grouped iterable can be): once for the keys
    (id, request hash, order), once to write the kept rows; memory is the bucket's keys plus
    one slice. Nothing is deleted here. A bucket whose only input is at most one merged file
    per kind (from an earlier compaction with the same bucket count) is left as it is: its
    paths are returned as kept.

    Example:
        >>> import tempfile
        >>> from ._types import ChatResult
        >>> out = tempfile.mkdtemp()
        >>> rows = [ChatResult("a", "ok", content=c).to_row() for c in ("new", "old")]
        >>> t = _with_order(_conform(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)), 0, 0)
        >>> merge_bucket(out, 1, 0, [("results", "u1", _ipc(t))])[0]
        {'results': 1, 'failures': 0}
    """
    if not isinstance(values, list) and iter(values) is values:  # a one-shot iterator: keep it
        values = list(values)
    vids: dict[str, int] = {}
    refs: list[Listed] = []
    for _, uid, what in values:
        vids[uid] = len(vids)
        if isinstance(what, Listed):
            refs.append(what)
    kinds = [r.kind for r in refs]
    if len(refs) == len(vids) and len(set(kinds)) == len(kinds):
        counts = {RESULTS_DIR: 0, FAILURES_DIR: 0}
        for listed in refs:
            counts[listed.kind] += _num_rows(listed)
        return counts, [listed.path for listed in refs]

    # Pass 1: the keys of every row, with where the row is (value id, row in it).
    res_keys: list[pa.Table] = []
    fail_keys: list[pa.Table] = []
    for value in values:
        kind, vid, offset = value[0], vids[value[1]], 0
        for table in _tables(value):
            n = table.num_rows
            where = {"vid": pa.array(np.full(n, vid, dtype=np.int32)),
                     "row": pa.array(np.arange(offset, offset + n, dtype=np.int64))}
            offset += n
            if kind == RESULTS_DIR:
                res_keys.append(pa.table({"custom_id": table.column("custom_id"),
                                          "request_sha256": table.column("request_sha256"),
                                          _ORDER: table.column(_ORDER), **where}))
            else:
                dup = pc.fill_null(pc.equal(table.column("error_type"), DUPLICATE), False)
                line = pc.if_else(dup, table.column("request_json"), pa.nulls(n, pa.string()))
                fail_keys.append(pa.table({
                    "custom_id": table.column("custom_id"), "request_sha256": table.column("request_sha256"),
                    "request_json": line, "dup": dup, _ORDER: table.column(_ORDER), **where,
                }))
    keep: dict[int, dict[str, np.ndarray]] = {}  # value id -> {"keep"|"moved": sorted row numbers}

    def mark(table: pa.Table, chosen: np.ndarray, what: str) -> None:
        vid = table.column("vid").to_numpy()[chosen]
        row = table.column("row").to_numpy()[chosen]
        order = np.lexsort((row, vid))
        vid, row = vid[order], row[order]
        if not len(vid):
            return
        starts = np.flatnonzero(np.r_[True, vid[1:] != vid[:-1]])
        for s, e in zip(starts.tolist(), np.r_[starts[1:], len(vid)].tolist(), strict=True):
            keep.setdefault(int(vid[s]), {})[what] = row[s:e]

    answered_ids = pa.array([], pa.string())
    moved_keys = None
    if res_keys:
        res = pa.concat_tables(res_keys)
        del res_keys
        res = res.take(pa.array(_sorted_by_id(res)))
        first, multi = _groups(res)
        decision = first.astype(np.int8)  # an id written once: kept (most ids; no Python per row)
        many = np.flatnonzero(multi)
        if len(many):
            sub = res.take(pa.array(many))
            decision[many] = _decide_results(sub.column("custom_id").to_pylist(),
                                             sub.column("request_sha256").to_pylist())
        mark(res, decision == 1, "keep")
        answered_ids = pc.unique(res.column("custom_id"))
        moved = res.filter(pa.array(decision == 2))
        del res
        if moved.num_rows:
            moved_keys = _moved_keys(moved, values, vids)
    fail_parts = fail_keys + ([moved_keys] if moved_keys is not None else [])
    del fail_keys
    if fail_parts:
        fail = pa.concat_tables(fail_parts)
        del fail_parts
        fail = fail.take(pa.array(_sorted_by_id(fail)))
        answered = pc.fill_null(pc.is_in(fail.column("custom_id"), value_set=answered_ids), False).to_numpy(
            zero_copy_only=False)
        dup = fail.column("dup").to_numpy(zero_copy_only=False)
        _, multi = _groups(fail)
        decision = dup | ~answered  # an id with one failure row: kept unless answered
        many = np.flatnonzero(multi)
        if len(many):
            sub = fail.take(pa.array(many))
            decision[many] = _decide_failures(
                sub.column("custom_id").to_pylist(), dup[many].tolist(),
                sub.column("request_sha256").to_pylist(), sub.column("request_json").to_pylist(),
                answered[many].tolist(),
            )
        is_moved = fail.column(_ORDER).to_numpy() == -1
        mark(fail, decision & ~is_moved, "keep")
        mark(fail, decision & is_moved, "moved")
        del fail

    # Pass 2: write the kept rows, each bucket and kind to its own files.
    writers = {
        kind: _FileWriter(FileSystems.join(output, kind), buckets, bucket, rows_per_file, run)
        for kind in (RESULTS_DIR, FAILURES_DIR)
    }
    try:
        for value in values:
            chosen = keep.get(vids[value[1]])
            if not chosen:
                continue
            offset = 0
            for table in _tables(value):
                n = table.num_rows
                table = table.drop_columns([_ORDER])
                for name, rows in chosen.items():
                    lo, hi = np.searchsorted(rows, [offset, offset + n])
                    if lo == hi:
                        continue
                    picked = table.take(pa.array(rows[lo:hi] - offset))
                    if name == "keep":
                        writers[value[0]].write(picked)
                    else:
                        writers[FAILURES_DIR].write(_answers_as_duplicates(picked))
                offset += n
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return {k: w.rows for k, w in writers.items()}, []


def _moved_keys(moved: pa.Table, values: Iterable[BucketValue], vids: dict[str, int]) -> pa.Table:
    """Failure-side keys of the answers to move (their request lines read back: moves are rare)."""
    wanted: dict[int, np.ndarray] = {}
    vid_col, row_col = moved.column("vid").to_numpy(), moved.column("row").to_numpy()
    for v in np.unique(vid_col).tolist():
        wanted[v] = np.sort(row_col[vid_col == v])
    got_vid, got_row, got_line = [], [], []
    for value in values:
        vid = vids[value[1]]
        rows = wanted.get(vid)
        if rows is None:
            continue
        offset = 0
        for table in _tables(value):
            n = table.num_rows
            lo, hi = np.searchsorted(rows, [offset, offset + n])
            if lo < hi:
                got_vid.append(np.full(hi - lo, vid, dtype=np.int32))
                got_row.append(rows[lo:hi])
                got_line.append(table.column("request_json").take(pa.array(rows[lo:hi] - offset)))
            offset += n
    lines = pa.table({"vid": pa.array(np.concatenate(got_vid)), "row": pa.array(np.concatenate(got_row)),
                      "request_json": pa.chunked_array(got_line, pa.string())})
    joined = moved.join(lines, keys=["vid", "row"])
    n = joined.num_rows
    return pa.table({
        "custom_id": joined.column("custom_id"), "request_sha256": joined.column("request_sha256"),
        "request_json": joined.column("request_json"), "dup": pa.array([True] * n),
        _ORDER: pa.array(np.full(n, -1, dtype=np.int64)),  # newer than any file under failures/
        "vid": joined.column("vid"), "row": joined.column("row"),
    })


def _num_rows(listed: Listed) -> int:
    with open_parquet(listed.path, listed.size or None) as pf:
        return pf.metadata.num_rows


class _MergeBucketDoFn(beam.DoFn):
    def __init__(self, output: str, rows_per_file: int) -> None:
        self._output = output
        self._rows_per_file = rows_per_file

    def setup(self) -> None:
        self._merged = Metrics.counter(NAMESPACE, "compact_buckets_merged")

    def process(self, group: tuple[int, Iterable[BucketValue]], shape: tuple[int, str]):
        bucket, values = group
        buckets, run = shape  # (not the whole plan: its file list would load in every worker)
        counts, kept = merge_bucket(self._output, buckets, bucket, values, rows_per_file=self._rows_per_file,
                                    run=run)
        self._merged.inc()
        yield counts, kept


def finish_compaction(plan: Plan, merged: Iterable[tuple[dict[str, int], list[str]]]) -> dict[str, int]:
    """Delete the files the plan listed (all but those a bucket kept); returns the rows kept.

    Runs once, after every bucket's merged files are visible: a crash before or during it leaves
    duplicates (the next compaction or ``--resume`` merges them), never a loss.
    """
    counts = {RESULTS_DIR: 0, FAILURES_DIR: 0}
    kept: set[str] = set()
    for c, paths in merged:
        for k, v in c.items():
            counts[k] += v
        kept.update(paths)
    # Parts first, then older merged files: each old merged file goes after its replacement.
    doomed = sorted((f.path for f in plan.files if f.path not in kept), key=lambda p: "/data-" in p)
    for i in range(0, len(doomed), 1000):
        FileSystems.delete(doomed[i:i + 1000])
    _remove_spill(spill_dir(plan.output, plan.run))
    if doomed:
        log.info("compacted %d files of %s into %d buckets: %d result rows, %d failure rows kept",
                 len(doomed), plan.output, plan.buckets, counts[RESULTS_DIR], counts[FAILURES_DIR])
    return counts


def _remove_spill(directory: str) -> None:
    try:
        spilled = [m.path for m in FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list]
    except Exception:  # noqa: BLE001 - nothing was spilled
        spilled = []
    try:
        if spilled:
            FileSystems.delete(spilled)
        if FileSystems.exists(directory):
            FileSystems.delete([directory])
    except Exception:  # noqa: BLE001 - a hidden folder is all that is left
        log.warning("arkbatch: could not remove %s", directory, exc_info=True)


class _Finish(beam.DoFn):
    def setup(self) -> None:
        self._kept = {k: Metrics.counter(NAMESPACE, f"compact_rows_kept_{k}") for k in (RESULTS_DIR, FAILURES_DIR)}

    def process(self, merged: list[tuple[dict[str, int], list[str]]], plan: Plan):
        counts = finish_compaction(plan, merged)
        for k, v in counts.items():
            self._kept[k].inc(v)
        yield counts


_LOCAL_RUNNERS = {"direct", "switchingdirect", "bundlebaseddirect", "fnapi", "prism"}


def is_local_runner(runner: Any) -> bool:
    """Whether ``runner`` (a runner, its class name, a ``--runner`` value, or ``None``: Beam's
    default, the DirectRunner) runs the workers in or beside this process. Names are read as
    Beam reads ``--runner``: any case, with or without ``Runner``, or a dotted class path.

    Example:
        >>> [is_local_runner(r) for r in (None, "direct", "PrismRunner", "DataflowRunner", "x.y.FlinkRunner")]
        [True, True, True, False, False]
    """
    if runner is None:
        return True
    name = runner if isinstance(runner, str) else type(runner).__name__
    name = name.rsplit(".", 1)[-1].lower()
    return name.removesuffix("runner") in _LOCAL_RUNNERS


class CompactOutput(beam.PTransform):
    """Compact the output folder once the input PCollection is complete (e.g. the writers' output).

    A parallel stage: list -> read parts into ``custom_id`` hash buckets -> group by bucket ->
    merge each bucket (:func:`merge_bucket`) -> one final step deletes the replaced files
    (:func:`finish_compaction`). Returns a one-element PCollection: the rows kept per folder.

    Args:
        output: the output folder.
        sink: its ``output_shards`` is the bucket count (0: one bucket per ~32 MiB of parts).
        rows_per_file: a bucket's merged rows are split into files of at most this many rows.
        spill: rows cross from the readers to the merges through hidden spill files under the
            output folder (only references cross the runner's shuffle), or (``False``) through
            the runner's shuffle. ``None``: spill files on a local runner (Direct, Prism: they
            hold a shuffle in memory), the runner's shuffle elsewhere (Dataflow, Flink).

    Example:
        >>> import tempfile, apache_beam as beam
        >>> from ._types import ChatResult
        >>> out = tempfile.mkdtemp()
        >>> _ = [write_parquet_atomic([ChatResult("a", "ok").to_row()], out + "/results", OUTPUT_SCHEMA)
        ...      for _ in range(3)]
        >>> with beam.Pipeline() as p:
        ...     _ = p | beam.Create([1]) | CompactOutput(out) | beam.Map(print)
        {'results': 1, 'failures': 0}
    """

    def __init__(
        self,
        output: str,
        *,
        sink: SinkConfig | None = None,
        rows_per_file: int = 500_000,
        spill: bool | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rows_per_file <= 100_000_000:
            raise ValueError(f"rows_per_file must be in 1..100000000, got {rows_per_file}")
        self._output = output.rstrip("/")
        self.sink = sink if sink is not None else SinkConfig()
        self._rows_per_file = rows_per_file
        self._spill = spill

    def expand(self, done: beam.PCollection) -> beam.PCollection:
        output, shards = self._output, self.sink.output_shards
        spill = self._spill
        if spill is None:  # a local runner holds its shuffle in memory: rows go through files
            spill = is_local_runner(done.pipeline.runner)
        plans = (
            done
            | "WaitForWriters" >> beam.combiners.Count.Globally()
            | "Plan" >> beam.Map(lambda _: plan(output, shards))
        )
        the_plan = beam.pvalue.AsSingleton(plans)
        merged = (
            plans
            | "ListFiles" >> beam.FlatMap(lambda p: [(f, p.buckets, p.run) for f in p.files])
            | "Spread" >> beam.Reshuffle()
            | "ReadIntoBuckets" >> beam.ParDo(_ReadIntoBucketsDoFn(output, spill))
            | "GroupByBucket" >> beam.GroupByKey()
            | "MergeBuckets" >> beam.ParDo(
                _MergeBucketDoFn(output, self._rows_per_file),
                beam.pvalue.AsSingleton(plans | "Shape" >> beam.Map(lambda p: (p.buckets, p.run))),
            )
        )
        return (
            merged
            | "AllBuckets" >> beam.combiners.ToList()
            | "DeleteReplaced" >> beam.ParDo(_Finish(), the_plan)
        )


def compact(
    output: str,
    *,
    rows_per_file: int = 500_000,
    sink: SinkConfig | None = None,
    options: Any = None,
    spill: bool | None = None,
) -> dict[str, int]:
    """Merge the parts under ``output`` into merged files holding each ``custom_id`` once.

    Runs :class:`CompactOutput` in a pipeline of its own (``options``: Beam
    ``PipelineOptions``; default the DirectRunner in this process; ``spill``: see there) and
    returns the rows kept per
    folder (answers moved to ``failures`` count there). Rules: :func:`merge_bucket`. The merged
    files are visible before the files they replace are deleted, so a crash here leaves
    duplicates for the next run (or ``--resume``) to merge, never a loss.

    Example:
        >>> import tempfile
        >>> from ._types import ChatResult
        >>> out = tempfile.mkdtemp()
        >>> rows = [ChatResult("a", "ok", content=c, request_sha256=h).to_row()
        ...         for c, h in (("one", "aa" * 32), ("one again", "aa" * 32), ("two", "bb" * 32))]
        >>> _ = write_parquet_atomic(rows, out + "/results", OUTPUT_SCHEMA)
        >>> compact(out)
        {'results': 1, 'failures': 1}
    """
    from apache_beam.metrics.metric import MetricsFilter

    output = output.rstrip("/")
    p = beam.Pipeline(options=options)
    _ = p | "Start" >> beam.Create([None]) | "Compact" >> CompactOutput(
        output, sink=sink, rows_per_file=rows_per_file, spill=spill)
    result = p.run()
    result.wait_until_finish()
    counts = {RESULTS_DIR: 0, FAILURES_DIR: 0}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for c in query["counters"]:
        for k in counts:
            if c.key.metric.name == f"compact_rows_kept_{k}":
                counts[k] += c.committed or 0
    return counts
