"""The terminal progress bar (tqdm) for a job whose workers run in this process.

A daemon thread reads the job's :class:`~arkbatch_beam._progress.JobProgress` a few times a
second (what the runtimes *published*: never an event loop's live state) and draws one bar:
done/total (the total once the background count knows it), ok/failed, req/s, in flight, waiting
to retry, time paused by the server, tokens/s and tqdm's ETA. Log records are routed through
tqdm while it runs, so a warning never tears the bar.

Example:
    >>> import io
    >>> from arkbatch_beam._progress import JobProgress
    >>> progress = JobProgress()
    >>> progress.set_total(4)
    >>> progress.add_failed(1)
    >>> out = io.StringIO()
    >>> with ProgressBar(progress, file=out, interval=60):
    ...     pass
    >>> "1/4" in out.getvalue() and "ok=0 failed=1" in out.getvalue()
    True
"""

from __future__ import annotations

import collections
import io
import logging
import os
import sys
import threading
import time
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ._progress import Counts, JobProgress

# tqdm's own {rate_fmt} and {remaining} are the req/s and the ETA.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


def _si(x: float) -> str:
    return tqdm.format_sizeof(x, divisor=1000).strip()


def describe(c: Counts, tokens_per_second: float) -> str:
    """The bar's text after the counts (the same figures as the progress line).

    Example:
        >>> describe(Counts(ok=5, failed=1, in_flight=3, waiting_to_retry=2, paused_seconds=4.2), 1500.0)
        'ok=5 failed=1 in_flight=3 waiting_to_retry=2 paused=4s tok/s=1.50k'
        >>> describe(Counts(ok=5), 0.0)
        'ok=5 failed=0 in_flight=0 tok/s=0.00'
    """
    text = f"ok={c.ok} failed={c.failed} in_flight={c.in_flight}"
    if c.queued:
        text += f" queued={c.queued}"
    if c.waiting_to_retry:
        text += f" waiting_to_retry={c.waiting_to_retry}"
    if c.paused_seconds >= 1 or c.paused_for > 0:
        text += f" paused={c.paused_seconds:.0f}s" + (f" ({c.paused_for:.0f}s left)" if c.paused_for > 0 else "")
    return text + f" tok/s={_si(tokens_per_second)}"


def _columns(file: Any) -> int:
    try:
        return os.get_terminal_size((file or sys.stderr).fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class ProgressBar:
    """A tqdm bar for one job, redrawn every ``interval`` seconds by a daemon thread.

    Use it as a context manager around the run; :meth:`stop` draws the final figures.
    """

    def __init__(self, progress: JobProgress, *, file: Any = None, interval: float = 0.25) -> None:
        self._progress = progress
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redirect: Any = None
        self._tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=max(2, int(5 / interval)))
        # A terminal that reports no size (a fresh pseudo-terminal) gets a fixed width.
        sized = _columns(file) > 0
        self._bar = tqdm(total=None, file=file, unit="req", dynamic_ncols=sized,
                         ncols=None if sized else 120, nrows=None if sized else 20, mininterval=0,
                         bar_format=BAR_FORMAT, smoothing=0.1, desc="arkbatch", leave=True)

    def __enter__(self) -> ProgressBar:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Draw now and keep redrawing (logging goes through tqdm meanwhile)."""
        self._redirect = logging_redirect_tqdm(loggers=[logging.root])
        self._redirect.__enter__()
        self.update()
        self._thread = threading.Thread(target=self._run, name="arkbatch-bar", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - a bar must never stop a job
                logging.getLogger("arkbatch_beam").debug("progress bar update failed", exc_info=True)

    def update(self) -> Counts:
        """Redraw from the job's published counters; returns them."""
        c = self._progress.counts()
        bar = self._bar
        if c.to_do is not None and bar.total != max(c.to_do, c.done):
            bar.total = max(c.to_do, c.done)
        now = time.monotonic()
        self._tokens.append((now, c.tokens["total_tokens"]))
        t0, k0 = self._tokens[0]
        tps = (c.tokens["total_tokens"] - k0) / (now - t0) if now > t0 else 0.0
        bar.set_postfix_str(describe(c, tps), refresh=False)
        if c.done > bar.n:
            bar.update(c.done - bar.n)  # tqdm's rate and ETA follow the updates
        else:
            bar.refresh()
        return c

    def stop(self) -> None:
        """Stop redrawing; draw the final figures and leave the bar on screen."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.update()
        finally:
            self._bar.close()
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
