"""What a job's progress lines know beyond the client's own counts: how many inputs the job
has, how many need no row (blank lines, ids done on an earlier run), and how many failure rows
were written without a request (bad lines, duplicate ids), so the line's ``failed=`` counts what
the summary counts.

One explicit object per job (no module-level totals): :class:`~arkbatch_beam.BatchChatInference`
passes it to the steps that skip ids and to the runtime that logs the progress line; the CLI
sets its total from a background count of the inputs. It pickles by name: a DoFn running in the
process that made it gets that very object back; in another worker process it gets a fresh one
of the same name (which knows no total, so those progress lines show rates only).

Example:
    >>> import pickle
    >>> progress = JobProgress()
    >>> progress.set_total(20)
    >>> progress.add_skipped(2)
    >>> progress.add_failed(1)
    >>> pickle.loads(pickle.dumps(progress)) is progress
    True
    >>> progress.to_do(), progress.failed_before_send
    (18, 1)
"""

from __future__ import annotations

import threading
import uuid
import weakref


class JobProgress:
    """Inputs expected and ids skipped, for one job's progress lines (thread-safe)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or uuid.uuid4().hex
        self._lock = threading.Lock()
        self._total: int | None = None
        self._skipped = 0
        self.failed_before_send = 0
        with _by_name_lock:
            _by_name.setdefault(self.name, self)

    def set_total(self, lines: int | None) -> None:
        """How many inputs the whole job has (``None``: unknown)."""
        with self._lock:
            self._total = None if lines is None else int(lines)

    def add_skipped(self, n: int) -> None:
        """``n`` inputs that need no row (blank lines, ids already done): off the total."""
        with self._lock:
            self._skipped += n

    def add_failed(self, n: int) -> None:
        """``n`` failure rows written without a request (a bad line, a duplicate id)."""
        with self._lock:
            self.failed_before_send += n

    def to_do(self) -> int | None:
        """Inputs that end in a row (``None`` when the total is not known here)."""
        with self._lock:
            return None if self._total is None else max(self._total - self._skipped, 0)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_named, (self.name,))

    def __repr__(self) -> str:
        return f"JobProgress({self.name!r})"


_by_name: weakref.WeakValueDictionary[str, JobProgress] = weakref.WeakValueDictionary()
_by_name_lock = threading.Lock()


def _named(name: str) -> JobProgress:
    """The process's :class:`JobProgress` called ``name`` (made on first use)."""
    with _by_name_lock:
        progress = _by_name.get(name)
    if progress is None:
        made = JobProgress(name)  # registers itself, unless another thread just did
        with _by_name_lock:
            progress = _by_name.get(name, made)
    return progress
