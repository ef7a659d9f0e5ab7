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
from ._types import DUPLICATE, STATUS_FAILED, STATUS_OK

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


def _conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly :data:`OUTPUT_SCHEMA`'s columns (a part written before a column was
    added gets it as nulls, so an older run's output can still be merged and resumed)."""
    names = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in names else pa.nulls(table.num_rows, f.type)
        for f in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)


def _hash_key(sha: str | None) -> int | None:
    # 64 bits of the request hash: enough to tell one id's few requests apart, in 36 bytes.
    return int(sha[:16], 16) if sha else None


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


def compact(output: str, *, rows_per_file: int = 500_000) -> dict[str, int]:
    """Merge the parts under ``output`` into a few files holding each ``custom_id`` once.

    An ``ok`` row beats any failure for the same id; among copies of the same kind the newest
    file wins (a runner's bundle retry, or a resumed run, may have written an id twice). An
    ``ok`` row whose ``request_sha256`` differs from the winner's is not a copy but the answer
    to another request with the same id (``--no_dedupe``, two inputs numbering their lines
    alike): it is kept, as a ``duplicate_custom_id`` row under ``failures/`` with its answer,
    one per (id, request hash). ``duplicate_custom_id`` rows are kept once per (id, request
    hash, request line). The merged files are made visible atomically before the parts they
    replace are deleted, so a crash here leaves duplicates for the next run (or ``--resume``)
    to merge, never a loss.

    Returns the rows kept per folder (after merging; answers moved to ``failures`` count there).

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
    kept: dict[str, int] = {}
    ok_ids: set[str] = set()
    for kind in (RESULTS_DIR, FAILURES_DIR):
        directory = FileSystems.join(output, kind)
        metas = sorted(part_files(directory), key=lambda m: m.last_updated_in_seconds, reverse=True)
        # Pass 1: ids (and request hashes) only, newest file first -> which rows to keep.
        seen: set[Any] = set()
        winner_hash: dict[str, int | None] = {}  # results: the kept row's request, per id
        others: set[tuple[str, int]] = set()  # results: (id, request) answered besides the winner
        masks: dict[str, pa.Array] = {}
        moves: dict[str, pa.Array] = {}
        dropped = moved = 0
        for meta in metas:
            if kind == RESULTS_DIR:
                got = read_columns(meta.path, ["custom_id", "request_sha256"])
                mask, move = [], []
                for cid, sha in zip(got["custom_id"], got["request_sha256"], strict=True):
                    h = _hash_key(sha)
                    keep = cid not in winner_hash
                    other = False
                    if keep:
                        winner_hash[cid] = h
                    else:
                        w = winner_hash[cid]
                        # Unknown hashes (parts written before the column existed) count as copies.
                        other = h is not None and w is not None and h != w and (cid, h) not in others
                        if other:
                            others.add((cid, h))
                            moved += 1
                        else:
                            dropped += 1
                    mask.append(keep)
                    move.append(other)
                masks[meta.path] = pa.array(mask, pa.bool_())
                moves[meta.path] = pa.array(move, pa.bool_())
                continue
            got = read_columns(meta.path, ["custom_id", "error_type", "request_sha256", "request_json"])
            mask = []
            for i, cid in enumerate(got["custom_id"]):
                dup = got["error_type"][i] == DUPLICATE
                key: Any = (cid, dup, got["request_sha256"][i], got["request_json"][i]) if dup else (cid, dup)
                keep = key not in seen and (dup or cid not in ok_ids)
                if keep:
                    seen.add(key)
                else:
                    dropped += 1
                mask.append(keep)
            masks[meta.path] = pa.array(mask, pa.bool_())
        if kind == RESULTS_DIR:
            ok_ids = set(winner_hash)
            kept[kind] = len(winner_hash)
            del winner_hash, others
        else:
            kept[kind] = len(seen)
        if not metas or (len(metas) == 1 and dropped == 0 and moved == 0):
            continue  # nothing to merge
        # Pass 2: rewrite the kept rows in a few large files, then drop the old ones.
        pending: list[pa.Table] = []
        pending_rows = 0
        written = []
        answers: list[pa.Table] = []
        for meta in metas:
            with FileSystems.open(meta.path) as f:
                table = _conform(pq.read_table(f))
            if moved and meta.path in moves:
                other_answers = table.filter(moves[meta.path])
                if other_answers.num_rows:
                    answers.append(_answers_as_duplicates(other_answers))
            table = table.filter(masks[meta.path])
            if table.num_rows:
                pending.append(table)
                pending_rows += table.num_rows
            if pending_rows >= rows_per_file:
                written.append(_write_table_atomic(pending, directory, OUTPUT_SCHEMA))
                pending, pending_rows = [], 0
        if pending:
            written.append(_write_table_atomic(pending, directory, OUTPUT_SCHEMA))
        if answers:
            # Visible under failures/ before the parts holding them go; merged just below.
            failures = FileSystems.join(output, FAILURES_DIR)
            if not FileSystems.exists(failures):
                FileSystems.mkdirs(failures)
            _write_table_atomic(answers, failures, OUTPUT_SCHEMA)
        FileSystems.delete([m.path for m in metas])
        log.info("compacted %d %s files into %d (%d duplicate rows dropped, %d answers to another request "
                 "with the same id moved to %s)", len(metas), kind, len(written), dropped, moved, FAILURES_DIR)
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
    """Some columns of one Parquet file, through Beam's FileSystems (local, gs://, ...).

    A column the file does not have (written before that column was added) reads as nulls.
    """
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in columns if c in names])
    n = table.num_rows
    return {c: table.column(c).to_pylist() if c in names else [None] * n for c in columns}


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
