"""The per-process part writer: shared by threads and bundles, bounded parts, durable at commit."""

import threading

import apache_beam as beam
import pyarrow.dataset as ds
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from arkbatch_beam import _sink
from arkbatch_beam._config import SinkConfig
from arkbatch_beam._sink import PartWriter, WriteResults, acquire_writer, part_files, release_writer


def row(i, status="ok"):
    return {"custom_id": f"r{i}", "status": status, "content": f"c{i}", "attempts": 1}


def written_rows(out):
    return ds.dataset(out, format="parquet").to_table().to_pylist()


def test_threads_and_bundles_share_one_writer_with_bounded_parts(tmp_path):
    out = str(tmp_path)
    w = PartWriter(out, SinkConfig(part_rows=50), timer=False)
    go = threading.Barrier(4)

    def bundle(t):
        go.wait()
        for b in range(5):  # five bundles of 20 rows per thread
            gens = [w.add(row(t * 1000 + b * 100 + i, "ok" if i % 4 else "failed"))[0] for i in range(20)]
            w.commit(gens[0], gens[-1])

    threads = [threading.Thread(target=bundle, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = written_rows(out)
    assert sorted(r["custom_id"] for r in got) == sorted(f"r{t * 1000 + b * 100 + i}" for t in range(4)
                                                           for b in range(5) for i in range(20))
    parts = part_files(f"{out}/results") + part_files(f"{out}/failures")
    # 400 rows: at most 8 full parts plus one per commit (20 commits), two kinds each.
    assert len(parts) <= 2 * (400 // 50 + 20)
    assert all(ds.dataset(p.path).count_rows() <= 50 for p in parts)
    w.close()


def test_commit_waits_for_the_part_another_thread_is_writing(tmp_path, monkeypatch):
    out = str(tmp_path)
    w = PartWriter(out, SinkConfig(part_rows=2), timer=False)
    release, writing, waiting = threading.Event(), threading.Event(), threading.Event()
    events = []
    real = _sink.write_parquet_atomic

    def slow_write(rows, directory, schema):
        writing.set()
        assert release.wait(10)
        path = real(rows, directory, schema)
        events.append("written")
        return path

    class Cond(type(w._cond)):
        def wait_for(self, predicate, timeout=None):
            if not predicate():
                waiting.set()
            return super().wait_for(predicate, timeout)

    w._cond = Cond()
    monkeypatch.setattr(_sink, "write_parquet_atomic", slow_write)
    gen_b, _ = w.add(row(1))  # bundle B's row ...
    filler = threading.Thread(target=w.add, args=(row(2),))  # ... fills the buffer: this thread writes it
    filler.start()
    assert writing.wait(10)

    def commit_b():
        w.commit(gen_b, gen_b)
        events.append("committed")

    b = threading.Thread(target=commit_b)
    b.start()
    assert waiting.wait(10)  # B is waiting for the part, not returning early
    assert events == []
    release.set()
    b.join(10)
    filler.join(10)
    assert events == ["written", "committed"]
    assert sorted(r["custom_id"] for r in written_rows(out)) == ["r1", "r2"]


def test_a_failed_write_fails_the_bundles_whose_rows_it_held(tmp_path, monkeypatch):
    out = str(tmp_path)
    w = PartWriter(out, SinkConfig(part_rows=1000), timer=False)
    real = _sink.write_parquet_atomic
    calls = []

    def flaky(rows, directory, schema):
        calls.append(len(rows))
        if len(calls) == 1:
            raise OSError("disk full")
        return real(rows, directory, schema)

    monkeypatch.setattr(_sink, "write_parquet_atomic", flaky)
    g, _ = w.add(row(1))
    with pytest.raises(OSError, match="disk full"):
        w.commit(g, g)  # this thread wrote it and it failed
    g2, _ = w.add(row(2))
    assert g2 > g
    assert w.commit(g2, g2)  # the next part is written
    with pytest.raises(OSError, match="bundle is retried"):
        w.commit(g, g2)  # a bundle whose rows spanned the failed part fails too
    assert [r["custom_id"] for r in written_rows(out)] == ["r2"]


def test_the_age_limit_writes_without_a_new_row(tmp_path, monkeypatch):
    out = str(tmp_path)
    written = threading.Event()
    real = _sink.write_parquet_atomic

    def write(rows, directory, schema):
        path = real(rows, directory, schema)
        written.set()
        return path

    monkeypatch.setattr(_sink, "write_parquet_atomic", write)
    w = PartWriter(out, SinkConfig(part_rows=1000, part_seconds=0.1))
    try:
        w.add(row(1))
        assert written.wait(10)  # the timer thread wrote it
        assert [r["custom_id"] for r in written_rows(out)] == ["r1"]
    finally:
        w.close()


def mine(out):
    """This test's writers still registered (the registry is the process's: a runner of another
    test may tear its DoFns down late, or never, as Beam allows)."""
    return [key for key in _sink._writers if key[1] == out.rstrip("/")]


def test_bytes_limit_and_process_registry(tmp_path):
    out = str(tmp_path)
    w = PartWriter(out, SinkConfig(part_rows=1000, part_bytes=64 * 1024), timer=False)
    big = {"custom_id": "b", "status": "ok", "content": "x" * 40_000}
    assert w.add(big)[1] == []
    assert len(w.add({**big, "custom_id": "c"})[1]) == 1  # 80 KB > 64 KiB: written
    w.close()
    a, b = acquire_writer(out, SinkConfig(part_rows=7)), acquire_writer(out, SinkConfig(part_rows=7))
    c = acquire_writer(out, SinkConfig(part_rows=8))
    assert a is b and a is not c
    for x in (a, b, c):
        release_writer(x)
    assert not mine(out)


def test_pipeline_threads_share_the_writer_and_count_rows(tmp_path):
    out = str(tmp_path)
    opts = PipelineOptions(["--direct_num_workers=3", "--direct_running_mode=multi_threading"])
    p = beam.Pipeline(options=opts)
    rows = [row(i, "ok" if i % 10 else "failed") for i in range(1000)]
    _ = p | beam.Create(rows) | beam.Reshuffle() | WriteResults(out, sink=SinkConfig(part_rows=100))
    result = p.run()
    result.wait_until_finish()
    got = written_rows(out)
    assert sorted(r["custom_id"] for r in got) == sorted(r["custom_id"] for r in rows)
    parts = part_files(f"{out}/results") + part_files(f"{out}/failures")
    assert all(ds.dataset(p.path).count_rows() <= 100 for p in parts)
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("arkbatch"))["counters"]}
    assert counters["rows_written_ok"] == 900 and counters["rows_written_failed"] == 100
    assert not mine(out)  # released at teardown


def test_old_keywords_still_work():
    t = WriteResults("o/", max_rows=7, max_seconds=2)
    assert (t.sink.part_rows, t.sink.part_seconds) == (7, 2)
    with pytest.raises(ValueError, match="part_rows"):
        WriteResults("o/", max_rows=0)
