"""Compaction as a bucketed Beam stage: merge rules, crash safety, hot buckets, the CLI."""

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from arkbatch_beam import OUTPUT_SCHEMA, ChatResult, _sink
from arkbatch_beam._config import SinkConfig
from arkbatch_beam._parquet_io import iter_batches, read_columns
from arkbatch_beam._sink import bucket_of, compact, part_files, plan, write_parquet_atomic
from arkbatch_beam.compact import main

H1, H2 = "1" * 64, "2" * 64


def ok(cid, content="", sha=H1):
    return ChatResult(cid, "ok", content=content, attempts=1, request_sha256=sha).to_row()


def failed(cid, etype="deadline_exceeded", sha=H1, line=None):
    return ChatResult.failure(cid, etype, "why", retryable=True, request_sha256=sha, request_json=line).to_row()


def rows(out, kind):
    path = os.path.join(out, kind)
    if not os.path.isdir(path) or not any(p.endswith(".parquet") for p in os.listdir(path)):
        return []
    return ds.dataset(path, format="parquet").to_table().to_pylist()


def aged(paths):
    """Give the files distinct modification times, oldest first (the newest file wins)."""
    now = os.path.getmtime(paths[-1])
    for i, path in enumerate(paths):
        os.utime(path, (now - 100 + i, now - 100 + i))


def write(out, kind, rs):
    return write_parquet_atomic(rs, f"{out}/{kind}", OUTPUT_SCHEMA)


def names(out, kind):
    return sorted(p.name for p in (os.scandir(os.path.join(out, kind)) if os.path.isdir(os.path.join(out, kind))
                                   else []))


@pytest.mark.parametrize("shards, spill", [(1, None), (3, None), (3, False)])
def test_bucket_merge_rules(tmp_path, shards, spill):
    out = str(tmp_path)
    old = write(out, "results", [ok("a", "a old"), ok("b", "b1"), ok("m", "m other", H2)])
    new = write(out, "results", [ok("a", "a new"), ok("m", "m winner"), ok("m", "m other again", H2)])
    f = write(out, "failures", [failed("a"), failed("c"), failed("c"), failed("d", "rejected"),
                                failed("e", "duplicate_custom_id", H1, "line 1"),
                                failed("e", "duplicate_custom_id", H1, "line 1"),
                                failed("e", "duplicate_custom_id", H1, "line 2")])
    aged([f, old, new])
    kept = compact(out, sink=SinkConfig(output_shards=shards), spill=spill)
    got = {r["custom_id"]: r for r in rows(out, "results")}
    assert {k: v["content"] for k, v in got.items()} == {"a": "a new", "b": "b1", "m": "m winner"}
    fails = sorted((r["custom_id"], r["error_type"], r["request_json"], r["content"]) for r in rows(out, "failures"))
    assert fails == [
        ("c", "deadline_exceeded", None, None),  # once, though written twice; "a" was answered
        ("d", "rejected", None, None),
        ("e", "duplicate_custom_id", "line 1", None),  # once per (id, hash, line)
        ("e", "duplicate_custom_id", "line 2", None),
        ("m", "duplicate_custom_id", None, "m other again"),  # another request's answer: kept, newest
    ]
    assert kept == {"results": 3, "failures": 5}
    assert all(n.startswith(f"data-{shards}-") for n in names(out, "results") + names(out, "failures"))
    assert not [n for n in os.listdir(out) if n.startswith(".compact-")]  # the spill folder is gone
    assert compact(out, sink=SinkConfig(output_shards=shards)) == kept  # idempotent


def test_newest_copy_wins_with_different_content_across_buckets(tmp_path):
    out = str(tmp_path)
    ids = [f"id-{i}" for i in range(200)]
    paths = [write(out, "results", [ok(c, f"{c} v{v}") for c in ids]) for v in range(3)]
    paths.append(write(out, "results", [ok(c, f"{c} v3") for c in ids[:50]]))
    aged(paths)
    assert compact(out, sink=SinkConfig(output_shards=4)) == {"results": 200, "failures": 0}
    got = {r["custom_id"]: r["content"] for r in rows(out, "results")}
    assert got == {c: f"{c} v3" if i < 50 else f"{c} v2" for i, c in enumerate(ids)}
    assert len(names(out, "results")) == 4  # one merged file per bucket


def test_a_crash_between_write_and_delete_loses_nothing(tmp_path, monkeypatch):
    out = str(tmp_path)
    paths = [write(out, "results", [ok(f"x{i}", f"x{i} v{v}") for i in range(30)]) for v in range(2)]
    paths.append(write(out, "failures", [failed("x1"), failed("y")]))
    aged(paths)

    def crash(plan_, merged):
        raise RuntimeError("killed before the delete")

    monkeypatch.setattr(_sink, "finish_compaction", crash)
    with pytest.raises(Exception, match="killed before the delete"):
        compact(out, sink=SinkConfig(output_shards=2))
    assert sum(n.startswith("data-") for n in names(out, "results")) == 2  # merged files visible ...
    assert sum(n.startswith("part-") for n in names(out, "results")) == 2  # ... old parts still there
    assert len(rows(out, "results")) == 30 + 60  # duplicates, never a loss
    monkeypatch.undo()
    assert compact(out, sink=SinkConfig(output_shards=2)) == {"results": 30, "failures": 1}
    got = {r["custom_id"]: r["content"] for r in rows(out, "results")}
    assert got == {f"x{i}": f"x{i} v1" for i in range(30)}
    assert [r["custom_id"] for r in rows(out, "failures")] == ["y"]
    assert not any(n.startswith("part-") for n in names(out, "results") + names(out, "failures"))


def test_a_crash_halfway_through_the_delete_loses_nothing(tmp_path, monkeypatch):
    out = str(tmp_path)
    for _ in range(4):
        write(out, "results", [ok(f"x{i}", "same") for i in range(20)])
    real = _sink.FileSystems.delete

    def delete_half(paths):
        real(paths[: len(paths) // 2])
        raise OSError("killed while deleting")

    monkeypatch.setattr(_sink.FileSystems, "delete", staticmethod(delete_half))
    with pytest.raises(Exception, match="killed while deleting"):
        compact(out, sink=SinkConfig(output_shards=3))
    monkeypatch.undo()
    assert compact(out, sink=SinkConfig(output_shards=3)) == {"results": 20, "failures": 0}
    assert sorted(r["custom_id"] for r in rows(out, "results")) == sorted(f"x{i}" for i in range(20))


def test_a_hot_bucket_many_slices_and_one_id_many_times(tmp_path, monkeypatch):
    monkeypatch.setattr(_sink, "READER_BYTES", 4096)  # many spill files, many values per bucket
    out = str(tmp_path)
    hot = [c for c in (f"h{i}" for i in range(20_000)) if bucket_of(c, 4) == 0][:3000]
    write(out, "results", [ok(c, c) for c in hot] + [ok("cold", "cold")])
    write(out, "results", [ok("same", f"copy {i}", H1) for i in range(2000)])  # one id, 2000 copies
    write(out, "failures", [failed(c) for c in hot[:100]] + [failed("f")])
    kept = compact(out, sink=SinkConfig(output_shards=4))
    assert kept == {"results": len(hot) + 2, "failures": 1}
    got = rows(out, "results")
    assert len(got) == len({r["custom_id"] for r in got}) == len(hot) + 2
    assert [r["content"] for r in got if r["custom_id"] == "same"] == ["copy 0"]  # the first row of the file
    assert [r["custom_id"] for r in rows(out, "failures")] == ["f"]


def test_compacting_again_rewrites_nothing_and_new_parts_merge_in(tmp_path):
    out = str(tmp_path)
    write(out, "results", [ok(f"x{i}") for i in range(10)])
    write(out, "results", [ok(f"x{i}") for i in range(5)])
    compact(out, sink=SinkConfig(output_shards=2))
    merged = names(out, "results")
    assert plan(out).buckets == 2  # the merged files' own bucket count
    assert compact(out) == {"results": 10, "failures": 0}
    assert names(out, "results") == merged  # nothing rewritten
    write(out, "results", [ok("x0", "newer"), ok("x99")])  # a --resume run adds parts
    assert compact(out) == {"results": 11, "failures": 0}
    got = {r["custom_id"]: r["content"] for r in rows(out, "results")}
    assert got["x0"] == "newer" and len(names(out, "results")) == 2


def test_rows_per_file_splits_a_bucket(tmp_path):
    out = str(tmp_path)
    write(out, "results", [ok(f"x{i}") for i in range(25)])
    assert compact(out, rows_per_file=10) == {"results": 25, "failures": 0}
    assert [ds.dataset(f"{out}/results/{n}").count_rows() for n in names(out, "results")].count(10) == 2


def test_legacy_parts_without_new_columns_merge(tmp_path):
    out = str(tmp_path)
    legacy = pa.schema([f for f in OUTPUT_SCHEMA if f.name not in ("request_sha256", "cached_tokens")])
    write_parquet_atomic([{k: v for k, v in ok("y", "old").items() if k in legacy.names}],
                         f"{out}/results", legacy)
    write(out, "results", [ok("y", "new", H2)])
    assert compact(out) == {"results": 1, "failures": 0}  # an unknown hash is a copy, never another request
    assert len(rows(out, "failures")) == 0


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "out")
    write(out, "results", [ok("a")])
    write(out, "results", [ok("a"), ok("b")])
    assert main([out, "--output_shards", "2"]) == 0
    assert "2 result rows, 0 failure rows kept" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no Parquet files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([out, "--no_such_beam_flag"])
    assert e.value.code == 2 and "not a Beam pipeline option: --no_such_beam_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([out, "--output_shards", "-1"])
    assert e.value.code == 2


def test_read_path_is_batched_and_tolerates_missing_columns(tmp_path):
    out = str(tmp_path)
    path = write(out, "results", [ok(f"x{i}") for i in range(10)])
    assert [b.num_rows for b in iter_batches(path, ["custom_id"], batch_size=4)] == [4, 4, 2]
    assert read_columns(path, ["custom_id", "nope"])["nope"] == [None] * 10
    assert [m.path for m in part_files(f"{out}/results")] == [path]


def _value(rows_, uid="u", kind="results", rank=0):
    t = _sink._with_order(_sink._conform(pa.Table.from_pylist(rows_, schema=OUTPUT_SCHEMA)), rank, 0)
    return (kind, uid, _sink._ipc(t))


def test_a_retried_bucket_overwrites_its_files_and_a_failed_one_shows_nothing(tmp_path):
    out = str(tmp_path)
    values = [_value([ok(f"x{i}") for i in range(5)], "u1"), _value([ok("x0"), ok("y")], "u2", rank=1)]
    for _ in range(2):  # the runner retries the bucket: same names, so no second copy
        counts, _ = _sink.merge_bucket(out, 3, 1, values, rows_per_file=2, run="abc")
        assert counts == {"results": 6, "failures": 0}
    assert names(out, "results") == [f"data-3-1-abc-{k}.parquet" for k in range(3)]
    assert len(rows(out, "results")) == 6

    class Breaks(list):  # the third read of the values (the write pass) fails halfway
        reads = 0

        def __iter__(self):
            Breaks.reads += 1
            for i, v in enumerate(list.__iter__(self)):
                if Breaks.reads == 3 and i == 1:
                    raise RuntimeError("worker lost")
                yield v

    out2 = str(tmp_path / "o2")
    with pytest.raises(RuntimeError, match="worker lost"):
        _sink.merge_bucket(out2, 1, 0, Breaks(values), rows_per_file=2, run="abc")
    assert names(out2, "results") == []  # neither a partial file nor a .tmp- one
