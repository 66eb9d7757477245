"""shard: hash-based splits, the rolling Parquet writer, and the stage through run_stage."""
from __future__ import annotations

import hashlib
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.records import RECORD_SCHEMA, make_record, records_table
from corpus2model.tasks import shard
from corpus2model.tasks.shard import (STATISTICS_COLUMNS, RollingParquetWriter, assign_split, read_webdataset,
                         split_bucket, split_key)
from corpus2model.tasks.stage import StageError, run_stage

SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def synthetic(n: int, seed: int = 0, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["data", "model", "shard", "token", "Straße", "数据", "alpha", "beta", "gamma", "delta"]
    out = []
    for i in range(start, start + n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
        if i % 3:
            out.append(make_record(f"question {i}: {text[:30]}", f"answer {i}: {text}", task_type="instruction",
                                   domain="demo", source="synthetic", source_line=i))
        else:
            out.append(make_record("", f"document {i}. {text}", task_type="text", domain="demo", source="synthetic"))
    return out


def augmented_of(record: dict, k: int = 0) -> dict:
    aug = make_record(record["input"] + " (reworded)", record["target"], task_type="instruction",
                      parent_id=record["id"], aug_method="word_swap")
    aug["id"] = f"{record['id']}#aug{k}"
    return aug


# ---------------------------------------------------------------------------------------------
# assign_split
# ---------------------------------------------------------------------------------------------
def test_bucket_is_the_documented_sha256_prefix():
    key = "abc123"
    expected = int(hashlib.sha256(b"7:abc123").hexdigest()[:15], 16) / 16**15
    assert split_bucket(key, 7) == expected
    assert 0.0 <= expected < 1.0


def test_assign_split_uses_cumulative_fractions_in_dict_order():
    keys = [f"k{i}" for i in range(2000)]
    for k in keys[:200]:
        b = split_bucket(k, 0)
        want = "train" if b < 0.8 else ("validation" if b < 0.9 else "test")
        assert assign_split(k, SPLITS, 0) == want
    # Reordering the dict moves the intervals: "test" now owns [0, 0.1).
    reordered = {"test": 0.1, "validation": 0.1, "train": 0.8}
    low = [k for k in keys if split_bucket(k, 0) < 0.1]
    assert low and all(assign_split(k, reordered, 0) == "test" for k in low)


def test_assign_split_fractions_and_seed():
    keys = [f"record-{i}" for i in range(20_000)]
    counts = {s: 0 for s in SPLITS}
    for k in keys:
        counts[assign_split(k, SPLITS, 0)] += 1
    for s, frac in SPLITS.items():
        assert abs(counts[s] / len(keys) - frac) < 0.01, counts
    moved = sum(assign_split(k, SPLITS, 0) != assign_split(k, SPLITS, 1) for k in keys[:2000])
    assert moved > 200  # another seed is another split, not the same one
    assert all(assign_split(k, SPLITS, 0) == assign_split(k, SPLITS, 0) for k in keys[:500])


def test_zero_fraction_split_gets_nothing_and_rounding_falls_to_last():
    splits = {"train": 0.7, "validation": 0.0, "test": 0.3}
    got = {assign_split(f"x{i}", splits, 3) for i in range(3000)}
    assert got == {"train", "test"}
    # Fractions that sum to just under 1: a bucket above the sum still lands in the last split.
    assert assign_split("any", {"train": 1e-12, "test": 1e-12}, 0) == "test"


def test_augmented_records_follow_their_parent():
    parents = synthetic(300)
    for p in parents:
        aug = augmented_of(p)
        assert split_key(aug) == p["id"]
        assert assign_split(split_key(aug), SPLITS, 0) == assign_split(split_key(p), SPLITS, 0)
    # Its own id would often land elsewhere: the parent rule is what keeps them together.
    differ = sum(assign_split(augmented_of(p)["id"], SPLITS, 0) != assign_split(p["id"], SPLITS, 0) for p in parents)
    assert differ > 10


def test_split_codes_for_a_batch_equal_assign_split_per_record():
    """The batch path (numpy buckets) is the per-record rule, parent ids (set, empty, absent) included."""
    records = synthetic(3000, seed=21)
    for i, r in enumerate(records):
        if i % 5 == 0:
            r["metadata"]["parent_id"] = f"parent-{i // 10}"
        elif i % 5 == 1:
            r["metadata"]["parent_id"] = ""  # no parent: bucketed by its own id, as split_key does
    table = records_table(records)
    for splits in (SPLITS, {"train": 0.0, "validation": 0.25, "test": 0.75}, {"train": 1e-12, "test": 1e-12}):
        for seed in (0, 7):
            want = [list(splits).index(assign_split(split_key(r), splits, seed)) for r in records]
            assert shard.split_codes(table, splits, seed).tolist() == want
    with pytest.raises(StageError, match="no split with a positive fraction"):
        shard.split_codes(table, {"train": 0.0, "test": 0.0}, 0)
    no_id = table.set_column(0, "id", pa.array([None] + table.column("id").to_pylist()[1:], pa.string()))
    with pytest.raises(StageError, match="without an id"):
        shard.split_codes(no_id, SPLITS, 0)


def test_prefetch_keeps_order_raises_the_producers_error_and_stops_early():
    import threading

    assert list(shard.prefetch(iter(range(100)), depth=2)) == list(range(100))

    def failing():
        yield 1
        raise StageError("part 3 is damaged")

    with pytest.raises(StageError, match="part 3 is damaged"):
        list(shard.prefetch(failing()))

    produced, closed = [], threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    it = shard.prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: the producer thread ends and the generator is closed
    assert closed.is_set() and len(produced) <= 3 + 2 + 1


def test_prefetch_bounded_by_bytes_holds_at_most_max_bytes_ahead():
    """With max_bytes the producer runs ahead by bytes (the shard stage: about one row group), never more,
    and an item larger than the bound still passes (alone)."""
    import time

    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    it = shard.prefetch(items(), max_bytes=30, size=lambda i: 10 if i != 5 else 100)
    assert next(it) == 0
    time.sleep(0.3)  # let the producer fill what it may
    assert len(produced) <= 1 + 3 + 1  # the consumed item, 30 bytes waiting, one blocked in put
    assert list(it) == list(range(1, 20))


def test_stage_reads_in_one_thread_while_it_writes_in_another(make_cfg, ctx, records_manifest, monkeypatch):
    """What lets a cold shard run use two cores: Parquet reading (decompression), the split index and the
    small splits' writers run in the prefetch thread; compressing and writing the largest split (most of
    the bytes) in the stage's own."""
    import threading

    readers, writers, indexers = set(), {}, set()
    iter_batches, write, index_unit = pq.ParquetFile.iter_batches, RollingParquetWriter.write, shard._index_unit

    def spy_iter_batches(self, *a, **kw):
        if "columns" not in kw:  # the index reads id + parent id only
            readers.add(threading.current_thread().name)
        return iter_batches(self, *a, **kw)

    def spy_write(self, data):
        writers.setdefault(self.folder.name, set()).add(threading.current_thread().name)
        return write(self, data)

    def spy_index_unit(args):
        indexers.add(threading.current_thread().name)
        return index_unit(args)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_iter_batches)
    monkeypatch.setattr(RollingParquetWriter, "write", spy_write)
    monkeypatch.setattr(shard, "_index_unit", spy_index_unit)
    run_stage(shard, [records_manifest(synthetic(400, seed=22), stage="validate", parts=2)], make_cfg(), ctx)
    me = threading.current_thread().name
    assert readers == {"c2m-prefetch"}
    assert writers == {"train": {me}, "validation": {"c2m-prefetch"}, "test": {"c2m-prefetch"}}
    # a cold pass indexes the first part before it starts (to know it is cold), the others as it reads them
    assert indexers == {me, "c2m-prefetch"}


def test_cold_pass_writes_what_a_pass_after_a_full_index_writes(make_cfg, ctx, records_manifest):
    """The cold pass indexes parts while it writes; a rerun with the index cached (a new shard config)
    indexes nothing and walks the complete index first. Same records, same files, byte for byte."""
    up = records_manifest(synthetic(900, seed=23), stage="validate", parts=3)
    cfg = make_cfg({"shard": {"target_bytes": 20_000, "row_groups_per_shard": 4}})
    cold = run_stage(shard, [up], cfg, ctx)
    index_dir = ctx.store.unit_dir("shard-index", "-").parent
    assert len(list(index_dir.iterdir())) == 3  # written by the cold pass, for the next run
    # Same shards, other unit keys (a tar beside each): the index is reused, the pass is not cold.
    other = make_cfg({"shard": {"target_bytes": 20_000, "row_groups_per_shard": 4, "formats": ["parquet", "webdataset"]}})
    warm = run_stage(shard, [up], other, ctx)
    assert warm.stats["units_reused"] == 0 and len(list(index_dir.iterdir())) == 3
    assert cold.stats["shards"]["train"] and len(cold.stats["shards"]["train"]) >= 3
    for s in cold.stats["shards"]:
        assert [(e["path"], e["sha256"], e["records"]) for e in cold.stats["shards"][s]] == \
            [(e["path"], e["sha256"], e["records"]) for e in warm.stats["shards"][s]]


# ---------------------------------------------------------------------------------------------
# RollingParquetWriter
# ---------------------------------------------------------------------------------------------
def _write(folder, records, target, batch=777, **kw):
    w = RollingParquetWriter(folder, "part", target, RECORD_SCHEMA, "zstd", write_statistics=STATISTICS_COLUMNS, **kw)
    table = records_table(records)
    for i in range(0, len(records), batch):  # batches that do not line up with row groups
        w.write(table.slice(i, batch))
    return w.close()


def test_rolling_writer_within_10_percent_and_bit_identical_roundtrip(tmp_path):
    records = synthetic(12000, seed=1)
    target = 150_000
    files = _write(tmp_path / "out", records, target, row_groups_per_file=16)
    assert len(files) >= 4
    assert [f["path"].name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    for f in files[:-1]:
        size = f["path"].stat().st_size
        assert size == f["bytes"] and f["closed_by"] == "size"
        assert abs(size - target) <= 0.10 * target, (size, target)
        md = pq.ParquetFile(f["path"]).metadata
        # Row groups sized by bytes: about target / 16 each, none a whole file, none of a few rows.
        assert 8 <= md.num_row_groups <= 24
        assert md.row_group(0).column(0).compression == "ZSTD"
    assert files[-1]["closed_by"] == "end" and files[-1]["bytes"] <= 1.1 * target
    assert sum(f["records"] for f in files) == len(records)
    assert [pq.ParquetFile(f["path"]).metadata.num_rows for f in files] == [f["records"] for f in files]

    back = pa.concat_tables([pq.read_table(f["path"]) for f in files])
    assert back.schema.equals(RECORD_SCHEMA)
    assert back.to_pylist() == records


def test_rolling_writer_cuts_do_not_depend_on_input_batches(tmp_path):
    records = synthetic(3000, seed=5)
    a = _write(tmp_path / "a", records, 60_000, batch=97, row_groups_per_file=8)
    b = _write(tmp_path / "b", records, 60_000, batch=3000, row_groups_per_file=8)
    assert [f["path"].read_bytes() for f in a] == [f["path"].read_bytes() for f in b]


def test_rolling_writer_row_group_caps(tmp_path):
    files = _write(tmp_path / "rows", synthetic(2000, seed=6), 10_000_000, max_row_group_rows=300)
    md = pq.ParquetFile(files[0]["path"]).metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [300] * 6 + [200]
    files = _write(tmp_path / "bytes", synthetic(2000, seed=6), 10_000_000, max_row_group_bytes=20_000)
    md = pq.ParquetFile(files[0]["path"]).metadata
    assert md.num_row_groups >= 5
    assert all(md.row_group(g).total_byte_size < 60_000 for g in range(md.num_row_groups))


def test_rolling_writer_writes_nothing_without_rows(tmp_path):
    w = RollingParquetWriter(tmp_path / "empty", "part", 1000)
    w.write(records_table([]))
    assert w.close() == []
    assert not (tmp_path / "empty").exists()


def test_webdataset_tars_are_reproducible_and_read_back(tmp_path):
    records = synthetic(1500, seed=8)
    a = _write(tmp_path / "a", records, 40_000, tar_sample_bytes=4096)
    b = _write(tmp_path / "b", records, 40_000, batch=50, tar_sample_bytes=4096)
    tars = [f["tar"] for f in a]
    assert len(tars) >= 2 and all(t.suffix == ".tar" for t in tars)
    assert [t.read_bytes() for t in tars] == [f["tar"].read_bytes() for f in b]
    with tarfile.open(tars[0]) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and names[0] == "000000.jsonl"
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert sum(m.size for m in members) / len(members) >= 4096  # documents batched per sample
    assert read_webdataset(tars) == records
    # One tar per Parquet shard, the same rows.
    assert [len(read_webdataset([f["tar"]])) for f in a] == [f["records"] for f in a]


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _read_split(m, split) -> list[dict]:
    paths = [m.dir / s["path"] for s in m.stats["shards"][split]]
    return pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist() if paths else []


def test_stage_splits_counts_index_and_cache(make_cfg, ctx, records_manifest):
    base = synthetic(600, seed=2)
    augs = [augmented_of(r) for r in base[::7]]
    records = base + augs
    up = records_manifest(records, stage="validate", parts=3)
    cfg = make_cfg({"shard": {"target_bytes": 16_000, "row_groups_per_shard": 4,
                              "splits": {"train": 0.7, "validation": 0.0, "test": 0.3}}})
    m = run_stage(shard, [up], cfg, ctx)
    assert m.stats["cache"] == "computed"
    assert m.counters == {"in": len(records), "out": len(records), "rejected": {}, "duplicates": 0}

    # Empty split: no file, zero stats.
    assert m.stats["splits"]["validation"] == {"records": 0, "bytes": 0, "shards": 0}
    assert m.stats["shards"]["validation"] == []
    assert not (m.dir / "validation").exists()

    by_split = {s: _read_split(m, s) for s in ("train", "test")}
    assert sum(len(v) for v in by_split.values()) == len(records)
    want = {"train": 0.7, "validation": 0.0, "test": 0.3}
    for split, rows in by_split.items():
        # Input order kept within the split, and every record where its hash says.
        assert rows == [r for r in records if assign_split(split_key(r), want, 0) == split]
        s = m.stats["splits"][split]
        assert s["records"] == len(rows) and s["shards"] == len(m.stats["shards"][split]) >= 2
        assert s["bytes"] == sum((m.dir / e["path"]).stat().st_size for e in m.stats["shards"][split])
        # The shard index: checksums, sizes and counts per shard, all but the last shard full.
        for e in m.stats["shards"][split]:
            assert e["sha256"] == hashlib.sha256((m.dir / e["path"]).read_bytes()).hexdigest()
            assert e["records"] == pq.ParquetFile(m.dir / e["path"]).metadata.num_rows
        assert [e["open"] for e in m.stats["shards"][split]] == [False] * (s["shards"] - 1) + [True]
    where = {r["id"]: s for s, rows in by_split.items() for r in rows}
    assert all(where[a["id"]] == where[a["metadata"]["parent_id"]] for a in augs)

    data = m.entries("data")
    assert {e.path.split("/")[0] for e in data} == {"train", "test"}
    assert all(e.path.split("/")[1].startswith("part-") for e in data)
    assert sum(e.records for e in data) == len(records)
    assert {e.path: e.sha256 for e in data} == {x["path"]: x["sha256"] for s in m.stats["shards"].values() for x in s}
    for e in data:
        md = pq.ParquetFile(m.dir / e.path).metadata
        assert md.num_rows == e.records
        cols = {md.row_group(0).column(c).path_in_schema: md.row_group(0).column(c) for c in range(md.num_columns)}
        assert cols["metadata.task_type"].is_stats_set and not cols["target"].is_stats_set
        # Dictionary pages only where values repeat: building one for free text is wasted write time.
        assert any("DICTIONARY" in enc for enc in cols["metadata.task_type"].encodings)
        for name in ("id", "input", "target", "metadata.content_hash"):
            assert not any("DICTIONARY" in enc for enc in cols[name].encodings), name

    again = run_stage(shard, [up], cfg, ctx)
    assert again.stats["cache"] == "hit" and again.key == m.key


def test_appending_data_never_moves_a_record(make_cfg, ctx, records_manifest):
    old = synthetic(300, seed=3)
    new = synthetic(200, seed=4, start=300)
    cfg = make_cfg({"shard": {"target_bytes": 1_000_000}})
    m1 = run_stage(shard, [records_manifest(old, stage="validate")], cfg, ctx)
    m2 = run_stage(shard, [records_manifest(new + old, stage="validate")], cfg, ctx)
    before = {r["id"]: s for s in m1.stats["splits"] for r in _read_split(m1, s)}
    after = {r["id"]: s for s in m2.stats["splits"] for r in _read_split(m2, s)}
    assert len(before) == 300 and len(after) == 500
    assert all(after[k] == s for k, s in before.items())


def _manifest_of_parts(records_manifest, chunks):
    """An upstream manifest whose parts are ``chunks`` (lists of records), in order."""
    flat = [r for c in chunks for r in c]
    m = records_manifest(flat, stage="validate", parts=len(chunks))
    assert [e.records for e in m.files] == [len(c) for c in chunks]  # equal-size chunks map 1:1
    return m


def test_append_reuses_untouched_shards_and_keeps_splits(make_cfg, ctx, records_manifest):
    chunks = [synthetic(400, seed=10 + i, start=400 * i) for i in range(10)]
    extra = synthetic(400, seed=99, start=10_000)  # +10 % in one new part at the end
    cfg = make_cfg({"shard": {"target_bytes": 24_000, "row_groups_per_shard": 4, "formats": ["parquet", "webdataset"],
                              "webdataset_sample_bytes": 2048}})
    m1 = run_stage(shard, [_manifest_of_parts(records_manifest, chunks)], cfg, ctx)
    assert m1.stats["units_reused"] == 0
    n_train = m1.stats["splits"]["train"]["shards"]
    assert n_train >= 8

    m2 = run_stage(shard, [_manifest_of_parts(records_manifest, chunks + [extra])], cfg, ctx)
    assert m2.stats["cache"] == "computed" and m2.key != m1.key
    old = {f.path: f.sha256 for f in m1.files}
    new = {f.path: f.sha256 for f in m2.files}
    kept = {p for p, sha in old.items() if new.get(p) == sha}
    # Every full shard keeps its bytes; an open tail too, unless the new records fill it up
    # (then it is compacted with them into full shards).
    full = {e["path"] for s in m1.stats["shards"].values() for e in s if not e["open"]}
    assert full and {p for p in old if p.rsplit(".", 1)[0] + ".parquet" in full} <= kept
    opens = {e["path"]: e for s in m1.stats["shards"].values() for e in s if e["open"]}
    for path, e in opens.items():
        split = path.split("/")[0]
        compacted = e["bytes"] + 0.1 * m1.stats["splits"][split]["bytes"] >= 0.85 * 24_000
        assert (path in kept) or compacted, path
    assert len(kept) >= len(old) - 2 * len(opens)
    assert any(p in kept for p in opens)  # the small validation/test tails were appended after
    assert m2.stats["units_reused"] >= m1.stats["units"] - len(opens)
    assert 1 <= m2.stats["units_computed"] <= 5
    # Hard links to the same unit files: nothing was rewritten.
    for e in m1.entries("data"):
        if e.path in full:
            assert (m1.dir / e.path).stat().st_ino == (m2.dir / e.path).stat().st_ino

    before = {r["id"]: s for s in m1.stats["splits"] for r in _read_split(m1, s)}
    after = {r["id"]: s for s in m2.stats["splits"] for r in _read_split(m2, s)}
    assert len(after) == len(before) + len(extra)
    assert all(after[k] == s for k, s in before.items())
    # The stream order is the input order whatever the layout: the same as a cold run.
    cold = run_stage(shard, [_manifest_of_parts(records_manifest, chunks + [extra])], cfg,
                     type(ctx)(store=type(ctx.store)(ctx.store.root.parent / "cold-store")))
    for s in m2.stats["splits"]:
        assert _read_split(m2, s) == _read_split(cold, s)
        wds = [m2.dir / e["webdataset"]["path"] for e in m2.stats["shards"][s]]
        assert read_webdataset(wds) == _read_split(cold, s)

    # Appending until the open shards would fill a shard compacts them into full shards.
    more = [synthetic(400, seed=200 + i, start=24_000 + 400 * i) for i in range(3)]
    m3 = run_stage(shard, [_manifest_of_parts(records_manifest, chunks + [extra] + more)], cfg, ctx)
    train = m3.stats["shards"]["train"]
    assert [e["open"] for e in train].count(True) == 1 and train[-1]["open"]
    assert all(abs(e["bytes"] - 24_000) <= 2_400 for e in train[:-1])
    assert sum(e["reused"] for e in train) >= n_train - 1


def test_stage_rejects_a_non_record_file(make_cfg, ctx, records_manifest, tmp_path):
    up = records_manifest(synthetic(10), stage="validate")
    bad = up.files_with("data")[0]
    pq.write_table(pa.table({"id": ["a"], "text": ["no target column"]}), bad)
    with pytest.raises(StageError, match="RECORD_SCHEMA"):
        run_stage(shard, [up], make_cfg(), ctx)


@pytest.mark.parametrize("which", [0, 2])  # 2: indexed by the cold pass's reader thread, after writing began
def test_stage_names_a_truncated_part(make_cfg, ctx, records_manifest, which):
    up = records_manifest(synthetic(300), stage="validate", parts=3)
    bad = sorted(up.files_with("data"))[which]
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(StageError, match=rf"{bad.name}: not a readable Parquet file.*c2m run"):
        run_stage(shard, [up], make_cfg(), ctx)


def test_hf_datasets_and_webdataset_read_every_record_bit_identically(make_cfg, ctx, records_manifest, tmp_path):
    import datasets

    records = synthetic(1200, seed=12) + [augmented_of(r) for r in synthetic(60, seed=13)]
    cfg = make_cfg({"shard": {"target_bytes": 15_000, "row_groups_per_shard": 4,
                              "formats": ["parquet", "webdataset"], "webdataset_sample_bytes": 1024}})
    m = run_stage(shard, [records_manifest(records, stage="validate", parts=2)], cfg, ctx)
    assert len(m.entries("webdataset")) == len(m.entries("data"))
    for split, entries in m.stats["shards"].items():
        want = [r for r in records if assign_split(split_key(r), dict(cfg.shard.splits), 0) == split]
        paths = [str(m.dir / e["path"]) for e in entries]
        assert len(paths) >= 1
        ds = datasets.load_dataset("parquet", data_files={split: paths}, split=split, cache_dir=str(tmp_path / "hf"))
        assert ds.to_list() == want
        stream = datasets.load_dataset("parquet", data_files={split: paths}, split=split, streaming=True,
                                      cache_dir=str(tmp_path / "hf"))
        assert list(stream) == want
        assert read_webdataset([m.dir / e["webdataset"]["path"] for e in entries]) == want
