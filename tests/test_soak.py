"""The reliability soak, short: the CLI through every fault the fake server can script, and a
server restart. ``python -m benchmarks.soak --n 20000`` is the long one (prints figures)."""

import pytest

from benchmarks.soak import run_soak

pytestmark = pytest.mark.timeout(240)


def test_soak_every_fault_every_id_once_no_key_no_storm(tmp_path, capsys):
    figures = run_soak(3000, workdir=str(tmp_path), cap=64, seed=1)
    print(figures)
    assert figures["broken"] == [], figures
    assert figures["peak_in_flight"] <= 64 and len(figures["arrivals_during_pauses"]) == 2
    assert figures["attempts"] > 3000  # the faults were really hit, and retried
    assert figures["rss_end_mib"] - figures["rss_start_mib"] < 1024


def test_server_killed_and_restarted_on_the_same_port_loses_and_duplicates_nothing(tmp_path):
    figures = run_soak(1500, workdir=str(tmp_path), cap=32, restart=10.0)
    assert figures["broken"] == [], figures
