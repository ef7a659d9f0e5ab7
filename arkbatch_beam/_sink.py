"""Parquet output: small part files written as the job runs, each made visible atomically.

Layout under the output folder (local or any Beam filesystem, e.g. ``gs://``)::

    results/part-<uuid>.parquet      rows with status "ok"
    failures/part-<uuid>.parquet     rows with status "failed"

A part is written to a hidden ``.tmp-`` name and then renamed, so a reader of
``results/*.parquet`` (or ``pyarrow.dataset``, which skips names starting with ``.``/``_``)
never sees a partial file, and a ``kill -9`` loses at most the rows still buffered (at most
``max_rows`` rows or ``max_seconds`` of answers). Parts hold the one :data:`OUTPUT_SCHEMA`.

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

import io
import logging
import threading
import time
import uuid
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ._schema import OUTPUT_SCHEMA
from ._types import DUPLICATE, STATUS_OK

log = logging.getLogger("arkbatch_beam")

RESULTS_DIR = "results"
FAILURES_DIR = "failures"


def write_parquet_atomic(rows: list[dict[str, Any]], directory: str, schema: pa.Schema) -> str:
    """Write ``rows`` as one Parquet file in ``directory``; visible only once complete."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    name = f"part-{uuid.uuid4().hex}.parquet"
    final = FileSystems.join(directory, name)
    tmp = FileSystems.join(directory, ".tmp-" + name)
    if not FileSystems.exists(directory):
        try:
            FileSystems.mkdirs(directory)
        except OSError:
            pass  # created concurrently by another worker; object stores need none
    with FileSystems.create(tmp) as f:
        f.write(buf.getvalue())
    FileSystems.rename([tmp], [final])
    return final


class _PartWriterDoFn(beam.DoFn):
    """Buffers rows and writes a part when ``max_rows`` or ``max_seconds`` is reached.

    The age limit holds even when no row arrives (a batch endpoint may hold requests for
    hours): a small daemon thread per instance writes a buffer that got too old. Part paths
    written by it are not emitted (downstream only waits for the writers to finish; the
    compaction lists the folder), and its row counts reach the metrics on the next call from
    the bundle thread, since Beam metrics can only be updated there.
    """

    def __init__(self, output: str, max_rows: int, max_seconds: float) -> None:
        self._dirs = {
            True: FileSystems.join(output, RESULTS_DIR),
            False: FileSystems.join(output, FAILURES_DIR),
        }
        self._max_rows = max_rows
        self._max_seconds = max_seconds

    def setup(self) -> None:
        self._written = {
            True: Metrics.counter("arkbatch", "rows_written_ok"),
            False: Metrics.counter("arkbatch", "rows_written_failed"),
        }
        self._lock = threading.Lock()
        self._buf: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        self._since = time.monotonic()
        self._uncounted = {True: 0, False: 0}
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._age_flusher, name="arkbatch-part-timer", daemon=True)
        self._timer.start()

    def teardown(self) -> None:
        self._stop.set()

    def start_bundle(self) -> None:
        with self._lock:
            self._since = time.monotonic()

    def process(self, row: dict[str, Any]):
        ok = row.get("status") == STATUS_OK
        with self._lock:
            buf = self._buf[ok]
            if not buf and not self._buf[not ok]:
                self._since = time.monotonic()
            buf.append(row)
            full = len(buf) >= self._max_rows or time.monotonic() - self._since >= self._max_seconds
            paths = self._flush() if full else []
        self._count()
        yield from paths

    def finish_bundle(self):
        with self._lock:
            paths = self._flush()
        self._count()
        for path in paths:
            yield WindowedValue(path, MIN_TIMESTAMP, (GlobalWindow(),))

    def _flush(self) -> list[str]:
        """Write both buffers (call with the lock held)."""
        paths = []
        for ok, rows in self._buf.items():
            if rows:
                paths.append(write_parquet_atomic(rows, self._dirs[ok], OUTPUT_SCHEMA))
                self._uncounted[ok] += len(rows)
                self._buf[ok] = []
        self._since = time.monotonic()
        return paths

    def _count(self) -> None:
        with self._lock:
            counts, self._uncounted = self._uncounted, {True: 0, False: 0}
        for ok, n in counts.items():
            if n:
                self._written[ok].inc(n)

    def _age_flusher(self) -> None:
        tick = min(1.0, self._max_seconds / 2)
        while not self._stop.wait(tick):
            with self._lock:
                if (self._buf[True] or self._buf[False]) and time.monotonic() - self._since >= self._max_seconds:
                    try:
                        self._flush()
                    except Exception:  # noqa: BLE001 - the bundle thread retries at its next flush
                        log.warning("arkbatch: writing an aged part failed; will retry", exc_info=True)


class WriteResults(beam.PTransform):
    """Write result and failure rows as Parquet parts under ``output``.

    Args:
        output: a folder path (local, ``gs://``, or any Beam filesystem).
        max_rows: rows per part at most (a crash loses at most this many buffered rows).
        max_seconds: a part is also written when its oldest row is this old.

    Returns a PCollection of the part paths written.
    """

    def __init__(self, output: str, *, max_rows: int = 2000, max_seconds: float = 10.0) -> None:
        super().__init__()
        if not 1 <= max_rows <= 10_000_000:
            raise ValueError(f"max_rows must be in 1..10000000, got {max_rows}")
        if not 0.1 <= max_seconds <= 86400:
            raise ValueError(f"max_seconds must be in 0.1..86400, got {max_seconds}")
        self._output = output.rstrip("/")
        self._max_rows = max_rows
        self._max_seconds = max_seconds

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return rows | "WriteParts" >> beam.ParDo(
            _PartWriterDoFn(self._output, self._max_rows, self._max_seconds)
        )


def _write_table_atomic(tables: list[pa.Table], directory: str, schema: pa.Schema) -> str:
    name = f"data-{uuid.uuid4().hex}.parquet"
    final = FileSystems.join(directory, name)
    tmp = FileSystems.join(directory, ".tmp-" + name)
    with FileSystems.create(tmp) as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for t in tables:
                writer.write_table(t)
    FileSystems.rename([tmp], [final])
    return final


def compact(output: str, *, rows_per_file: int = 500_000) -> dict[str, int]:
    """Merge the parts under ``output`` into a few files holding each ``custom_id`` once.

    An ``ok`` row beats any failure for the same id; among copies of the same kind the newest
    file wins (a runner's bundle retry, or a resumed run, may have written an id twice). The
    merged files are made visible atomically before the parts they replace are deleted, so a
    crash here leaves duplicates for the next run (or ``--resume``) to merge, never a loss.

    Returns the rows kept per folder.
    """
    kept: dict[str, int] = {}
    ok_ids: set[str] = set()
    for kind in (RESULTS_DIR, FAILURES_DIR):
        directory = FileSystems.join(output, kind)
        metas = sorted(part_files(directory), key=lambda m: m.last_updated_in_seconds, reverse=True)
        # Pass 1: ids only, newest file first -> which rows to keep.
        seen: set[Any] = set()
        masks: dict[str, pa.Array] = {}
        dropped = 0
        for meta in metas:
            cols = ["custom_id"] if kind == RESULTS_DIR else ["custom_id", "error_type", "request_json"]
            got = read_columns(meta.path, cols)
            mask = []
            for i, cid in enumerate(got["custom_id"]):
                if kind == RESULTS_DIR:
                    key: Any = cid
                    keep = key not in seen
                else:
                    dup = got["error_type"][i] == DUPLICATE
                    key = (cid, dup, got["request_json"][i] if dup else None)
                    keep = key not in seen and (dup or cid not in ok_ids)
                if keep:
                    seen.add(key)
                else:
                    dropped += 1
                mask.append(keep)
            masks[meta.path] = pa.array(mask, pa.bool_())
        if kind == RESULTS_DIR:
            ok_ids = seen
        kept[kind] = len(seen)
        if not metas or (len(metas) == 1 and dropped == 0):
            continue  # nothing to merge
        # Pass 2: rewrite the kept rows in a few large files, then drop the old ones.
        pending: list[pa.Table] = []
        pending_rows = 0
        written = []
        for meta in metas:
            with FileSystems.open(meta.path) as f:
                table = pq.read_table(f).cast(OUTPUT_SCHEMA).filter(masks[meta.path])
            if table.num_rows:
                pending.append(table)
                pending_rows += table.num_rows
            if pending_rows >= rows_per_file:
                written.append(_write_table_atomic(pending, directory, OUTPUT_SCHEMA))
                pending, pending_rows = [], 0
        if pending:
            written.append(_write_table_atomic(pending, directory, OUTPUT_SCHEMA))
        FileSystems.delete([m.path for m in metas])
        log.info("compacted %d %s files into %d (%d duplicate rows dropped)",
                 len(metas), kind, len(written), dropped)
    return kept


def part_files(directory: str) -> list[Any]:
    """Metadata of the visible Parquet files in ``directory`` (none if it does not exist)."""
    pattern = FileSystems.join(directory, "*.parquet")
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - some filesystems raise when nothing matches
        return []
    return [m for m in found if not m.path.rsplit("/", 1)[-1].startswith((".", "_"))]


def read_columns(path: str, columns: list[str]) -> dict[str, list[Any]]:
    """Some columns of one Parquet file, through Beam's FileSystems (local, gs://, ...)."""
    with FileSystems.open(path) as f:
        table = pq.read_table(f, columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}


class _CompactDoFn(beam.DoFn):
    def __init__(self, output: str, rows_per_file: int) -> None:
        self._output = output
        self._rows_per_file = rows_per_file

    def process(self, _parts_written: int):
        yield compact(self._output, rows_per_file=self._rows_per_file)


class CompactOutput(beam.PTransform):
    """Run :func:`compact` once, after every part in the input PCollection was written."""

    def __init__(self, output: str, *, rows_per_file: int = 500_000) -> None:
        super().__init__()
        self._output = output.rstrip("/")
        self._rows_per_file = rows_per_file

    def expand(self, part_paths: beam.PCollection) -> beam.PCollection:
        return (
            part_paths
            | "CountParts" >> beam.combiners.Count.Globally()
            | "Compact" >> beam.ParDo(_CompactDoFn(self._output, self._rows_per_file))
        )
