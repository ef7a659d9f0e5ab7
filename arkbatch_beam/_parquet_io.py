"""One safe, bounded way to read a Parquet file through Beam's FileSystems (local, ``gs://``, ...).

Why not ``pq.read_table(FileSystems.open(path))``: with a Python file object, pyarrow's
defaults read ahead ("pre-buffer") and decode on its own thread pools, which then call back into
Python to read; now and then that left a C++ thread alive at interpreter exit and the process
aborted (``terminate called without an active exception``, exit 134). Here nothing of pyarrow
ever runs on another thread:

* a file up to :data:`WHOLE_FILE_BYTES` (every part the writer produces, most merged files) is
  read into memory in one call and parsed from a ``pyarrow.BufferReader`` (no callback into
  Python at all);
* a larger one is read from the Beam handle with ``pre_buffer=False`` and ``use_threads=False``
  (synchronous reads in the calling thread, column chunks only).

Either way rows come out in record batches (:func:`iter_batches`) so the caller holds one batch
of the columns it asked for, not the file. Every reader of the output (compaction, ``--resume``
through :func:`read_columns`, the report) goes through here.

Example:
    >>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "x.parquet")
    >>> pq.write_table(pa.table({"custom_id": ["a", "b", "c"], "n": [1, 2, 3]}), path)
    >>> [b.num_rows for b in iter_batches(path, ["custom_id"], batch_size=2)]
    [2, 1]
    >>> read_columns(path, ["n", "missing"])
    {'n': [1, 2, 3], 'missing': [None, None, None]}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

WHOLE_FILE_BYTES = 64 * 1024 * 1024
BATCH_ROWS = 65_536


def _size(path: str) -> int | None:
    try:
        return FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    except Exception:  # noqa: BLE001 - unknown size: stream it
        return None


@contextlib.contextmanager
def open_parquet(path: str, size: int | None = -1) -> Iterator[pq.ParquetFile]:
    """A :class:`pyarrow.parquet.ParquetFile` for ``path`` that never reads on another thread.

    ``size``: the file's size when the caller knows it (a listing has it), ``None`` for unknown;
    the default asks the filesystem.

    Example:
        >>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
        >>> path = os.path.join(tempfile.mkdtemp(), "x.parquet")
        >>> pq.write_table(pa.table({"a": [1]}), path)
        >>> with open_parquet(path) as pf:
        ...     pf.metadata.num_rows
        1
    """
    if size == -1:
        size = _size(path)
    with FileSystems.open(path) as f:
        if size is not None and size <= WHOLE_FILE_BYTES:
            data = f.read()
            pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False)
            try:
                yield pf
            finally:
                pf.close()
            return
        pf = pq.ParquetFile(f, pre_buffer=False)
        try:
            yield pf
        finally:
            pf.close()


def iter_batches(
    path: str,
    columns: Sequence[str] | None = None,
    *,
    batch_size: int = BATCH_ROWS,
    size: int | None = -1,
) -> Iterator[pa.RecordBatch]:
    """The rows of ``path`` in record batches of at most ``batch_size`` rows.

    ``columns``: the columns to read (``None``: all); one the file does not have (written before
    that column was added) is left out, see :func:`read_columns` for nulls instead.

    Example:
        >>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
        >>> path = os.path.join(tempfile.mkdtemp(), "x.parquet")
        >>> pq.write_table(pa.table({"a": list(range(5))}), path)
        >>> sum(b.num_rows for b in iter_batches(path, batch_size=2))
        5
    """
    with open_parquet(path, size) as pf:
        names = set(pf.schema_arrow.names)
        cols = None if columns is None else [c for c in columns if c in names]
        if pf.metadata.num_rows == 0:
            return
        yield from pf.iter_batches(batch_size=batch_size, columns=cols, use_threads=False)


def read_columns(path: str, columns: list[str], *, size: int | None = -1) -> dict[str, list[Any]]:
    """Some columns of one Parquet file as Python lists (a missing column reads as nulls).

    Example:
        >>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
        >>> path = os.path.join(tempfile.mkdtemp(), "x.parquet")
        >>> pq.write_table(pa.table({"custom_id": ["a"]}), path)
        >>> read_columns(path, ["custom_id", "status"])
        {'custom_id': ['a'], 'status': [None]}
    """
    out: dict[str, list[Any]] = {c: [] for c in columns}
    n = 0
    for batch in iter_batches(path, columns, size=size):
        have = set(batch.schema.names)
        for c in columns:
            if c in have:
                out[c].extend(batch.column(c).to_pylist())
            else:
                out[c].extend([None] * batch.num_rows)
        n += batch.num_rows
    return out
