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
import time
import uuid
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from ._schema import OUTPUT_SCHEMA
from ._types import STATUS_OK

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
    """Buffers rows and writes a part when ``max_rows`` or ``max_seconds`` is reached."""

    def __init__(self, output: str, max_rows: int, max_seconds: float) -> None:
        self._dirs = {
            True: FileSystems.join(output, RESULTS_DIR),
            False: FileSystems.join(output, FAILURES_DIR),
        }
        self._max_rows = max_rows
        self._max_seconds = max_seconds

    def start_bundle(self) -> None:
        self._buf: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        self._since = time.monotonic()

    def process(self, row: dict[str, Any]):
        ok = row.get("status") == STATUS_OK
        buf = self._buf[ok]
        if not buf and not self._buf[not ok]:
            self._since = time.monotonic()
        buf.append(row)
        if len(buf) >= self._max_rows or time.monotonic() - self._since >= self._max_seconds:
            yield from self._flush()

    def finish_bundle(self):
        for path in self._flush():
            yield WindowedValue(path, MIN_TIMESTAMP, (GlobalWindow(),))

    def _flush(self):
        for ok, rows in self._buf.items():
            if rows:
                yield write_parquet_atomic(rows, self._dirs[ok], OUTPUT_SCHEMA)
                self._buf[ok] = []
        self._since = time.monotonic()


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
