"""shard: hash-based splits, the rolling Parquet writer, and the stage through run_stage."""
from __future__ import annotations

import hashlib
import random
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.records import RECORD_SCHEMA, make_record, records_table
from tasks import shard
from tasks.shard import RollingParquetWriter, assign_split, split_bucket, split_key
from tasks.stage import StageError, run_stage

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


# ---------------------------------------------------------------------------------------------
# RollingParquetWriter
# ---------------------------------------------------------------------------------------------
def _row_group_starts(path) -> list[int]:
    md = pq.ParquetFile(path).metadata
    starts = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        offs = []
        for c in range(rg.num_columns):
            col = rg.column(c)
            offs.append(col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset)
        starts.append(min(offs))
    return starts


def _last_group_bytes(path) -> int:
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(md.num_row_groups - 1)
    return sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))


def _footer_bytes(path) -> int:
    data = path.read_bytes()
    assert data[-4:] == b"PAR1"
    return struct.unpack("<i", data[-8:-4])[0] + 8


def test_rolling_writer_sizes_and_bit_identical_roundtrip(tmp_path):
    records = synthetic(3000, seed=1)
    target, rows = 20_000, 40
    w = RollingParquetWriter(tmp_path / "out", "part", target, RECORD_SCHEMA, "zstd", rows)
    table = records_table(records)
    for i in range(0, len(records), 777):  # batches that do not line up with row groups
        w.write(table.slice(i, 777))
    files = w.close()
    assert len(files) >= 5
    assert [f["path"].name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    for f in files[:-1]:
        size = f["path"].stat().st_size
        assert size == f["bytes"]
        # The guarantee: rolled at the first row group that reached the target, never earlier or later.
        last_start = _row_group_starts(f["path"])[-1]
        assert last_start < target <= size, (last_start, target, size)
        # So the overshoot is under one row group plus the footer.
        assert size - target < _last_group_bytes(f["path"]) + _footer_bytes(f["path"])
        md = pq.ParquetFile(f["path"]).metadata
        assert all(md.row_group(g).num_rows == rows for g in range(md.num_row_groups))
        assert md.row_group(0).column(0).compression == "ZSTD"
    assert sum(f["records"] for f in files) == len(records)
    assert [pq.ParquetFile(f["path"]).metadata.num_rows for f in files] == [f["records"] for f in files]

    back = pa.concat_tables([pq.read_table(f["path"]) for f in files])
    assert back.schema.equals(RECORD_SCHEMA)
    assert back.to_pylist() == records

    import datasets

    ds = datasets.load_dataset("parquet", data_files={"train": [str(f["path"]) for f in files]},
                               cache_dir=str(tmp_path / "hf"), split="train")
    assert ds.num_rows == len(records)
    assert ds.to_list() == records


def test_rolling_writer_footer_accounts_for_the_rest(tmp_path):
    # size = last row group end + footer + 8 bytes; checked so the test above measures the right thing.
    w = RollingParquetWriter(tmp_path, "p", 10_000, RECORD_SCHEMA, "none", 25)
    w.write(records_table(synthetic(400)))
    (first, *_) = w.close()
    md = pq.ParquetFile(first["path"]).metadata
    assert md.row_group(0).column(0).compression == "UNCOMPRESSED"
    end = _row_group_starts(first["path"])[-1] + _last_group_bytes(first["path"])
    assert end + _footer_bytes(first["path"]) == first["path"].stat().st_size


def test_rolling_writer_writes_nothing_without_rows(tmp_path):
    w = RollingParquetWriter(tmp_path / "empty", "part", 1000)
    w.write(records_table([]))
    assert w.close() == []
    assert not (tmp_path / "empty").exists()


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _read_split(m, split) -> list[dict]:
    paths = [m.dir / s["path"] for s in m.stats["shards"][split]]
    return pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist() if paths else []


def test_stage_splits_counts_and_cache(make_cfg, ctx, records_manifest):
    base = synthetic(600, seed=2)
    augs = [augmented_of(r) for r in base[::7]]
    records = base + augs
    up = records_manifest(records, stage="validate", parts=3)
    cfg = make_cfg({"shard": {"target_bytes": 15_000, "row_group_rows": 30,
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
    where = {r["id"]: s for s, rows in by_split.items() for r in rows}
    assert all(where[a["id"]] == where[a["metadata"]["parent_id"]] for a in augs)

    data = m.entries("data")
    assert {e.path.split("/")[0] for e in data} == {"train", "test"}
    assert all(e.path.split("/")[1].startswith("part-") for e in data)
    assert sum(e.records for e in data) == len(records)
    for e in data:
        md = pq.ParquetFile(m.dir / e.path).metadata
        assert md.num_rows == e.records
        cols = {md.row_group(0).column(c).path_in_schema: md.row_group(0).column(c) for c in range(md.num_columns)}
        assert cols["metadata.task_type"].is_stats_set and not cols["target"].is_stats_set

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


def test_stage_rejects_a_non_record_file(make_cfg, ctx, records_manifest, tmp_path):
    up = records_manifest(synthetic(10), stage="validate")
    bad = up.files_with("data")[0]
    pq.write_table(pa.table({"id": ["a"], "text": ["no target column"]}), bad)
    with pytest.raises(StageError, match="RECORD_SCHEMA"):
        run_stage(shard, [up], make_cfg(), ctx)
