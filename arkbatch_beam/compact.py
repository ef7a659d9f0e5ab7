"""Compact a job's output folder on its own, on any Beam runner.

For an output written with ``--no_compact``, or after a crash during the end-of-job compaction
(which leaves duplicates, never a loss: running this merges them). The same parallel stage as
the end of the job (:class:`~arkbatch_beam._sink.CompactOutput`): rows are read into hash
buckets of ``custom_id``, each bucket is merged on whichever worker gets it, and the old files
are deleted once every bucket's merged files are visible.

Usage::

    python -m arkbatch_beam.compact OUT                                  # DirectRunner
    python -m arkbatch_beam.compact OUT --direct_num_workers 4 --direct_running_mode multi_processing
    python -m arkbatch_beam.compact gs://b/out --output_shards 400 --runner DataflowRunner \\
        --project p --region r --temp_location gs://b/tmp --setup_file ./setup.py

Every option this module does not know is a Beam pipeline option. Exit status 0 when done, 2
for a bad option or a folder with no Parquet files under ``results/`` or ``failures/``.

Example:
    >>> import tempfile
    >>> from arkbatch_beam import OUTPUT_SCHEMA, ChatResult
    >>> from arkbatch_beam._sink import write_parquet_atomic
    >>> out = tempfile.mkdtemp()
    >>> for _ in range(2):
    ...     _ = write_parquet_atomic([ChatResult("a", "ok").to_row()], out + "/results", OUTPUT_SCHEMA)
    >>> main([out])  # doctest: +ELLIPSIS
    compacted ...: 1 result rows, 0 failure rows kept (...)
    0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from ._sink import compact, plan


def beam_options(beam_args: Sequence[str]) -> PipelineOptions:
    """``beam_args`` as Beam options; ``ValueError`` naming any option Beam does not know.

    Example:
        >>> beam_options(["--direct_num_workers", "2"]).get_all_options()["direct_num_workers"]
        2
        >>> beam_options(["--no_such_flag"])
        Traceback (most recent call last):
        ...
        ValueError: not a Beam pipeline option: --no_such_flag
    """
    options = PipelineOptions(list(beam_args))
    quiet = logging.getLogger("apache_beam.options.pipeline_options")
    level, errors = quiet.level, io.StringIO()
    quiet.setLevel(logging.ERROR)  # no "Discarding unparseable args" warning: we say it below
    try:
        with contextlib.redirect_stderr(errors):  # Beam's parser prints its whole usage
            known = set(options.get_all_options())
            every = options.get_all_options(retain_unknown_options=True)
    except SystemExit as e:  # Beam's parser exits on a bad value of a known option
        said = [line for line in errors.getvalue().splitlines() if "error:" in line]
        raise ValueError(said[-1].split("error:", 1)[1].strip() if said else f"bad Beam option in {beam_args}") from e
    finally:
        quiet.setLevel(level)
    unknown = sorted(f"--{k}" for k in every if k not in known)
    if unknown:
        raise ValueError(f"not a Beam pipeline option: {', '.join(unknown)}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arkbatch_beam.compact OUT [--output_shards N] [--rows_per_file N] [Beam options]``."""
    ap = argparse.ArgumentParser(
        prog="python -m arkbatch_beam.compact",
        description=__doc__.split("\n")[0],
        epilog="Any other option is passed to Beam (e.g. --runner, --direct_num_workers).",
    )
    ap.add_argument("output", help="the job's --output folder (local, gs://, ...)")
    ap.add_argument("--output_shards", type=int, default=0,
                    help="hash buckets of custom_id, merged in parallel (0: one per ~32 MiB of files)")
    ap.add_argument("--rows_per_file", type=int, default=500_000, help="rows per merged file, at most")
    ap.add_argument("--spill", choices=("auto", "files", "shuffle"), default="auto",
                    help="how rows reach the bucket merges: hidden spill files under OUT (only references "
                    "cross the runner's shuffle) or the runner's shuffle; auto: files on the Direct/Prism "
                    "runners, which hold a shuffle in memory, the shuffle elsewhere")
    args, beam_args = ap.parse_known_args(argv)
    if not 0 <= args.output_shards <= 100_000:
        ap.error(f"--output_shards must be in 0..100000, got {args.output_shards}")
    if not 1 <= args.rows_per_file <= 100_000_000:
        ap.error(f"--rows_per_file must be in 1..100000000, got {args.rows_per_file}")
    try:
        options = beam_options(beam_args)
    except ValueError as e:
        ap.error(str(e))
    output = args.output.rstrip("/")
    if plan(output, args.output_shards).empty:
        print(f"error: no Parquet files under {output}/{{results,failures}}", file=sys.stderr)
        return 2
    from ._config import SinkConfig

    started = time.monotonic()
    spill = {"auto": None, "files": True, "shuffle": False}[args.spill]
    kept = compact(output, rows_per_file=args.rows_per_file,
                   sink=SinkConfig(output_shards=args.output_shards), options=options, spill=spill)
    print(f"compacted {output}: {kept['results']} result rows, {kept['failures']} failure rows kept "
          f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
