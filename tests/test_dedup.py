"""dedup: exact keys, an order-independent representative, removed rows, and the stage."""
from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.records import REMOVED_SCHEMA, make_record
from corpus2model.tasks import dedup
from corpus2model.tasks.dedup import PartWriter, exact_key, select_representatives
from corpus2model.tasks.stage import run_stage


def _rec(inp, tgt, rid, path=None, line=None, task_type="instruction"):
    # Explicit ids (as a source-given id would be) so "which member was kept" is visible.
    r = make_record(inp, tgt, task_type=task_type, source_path=path, source_line=line)
    r["id"] = rid
    return r


def _corpus():
    return [
        _rec("What is 2+2?", "4", "a1", "b.jsonl", 3),
        _rec("what  is 2+2? ", "4", "a2", "a.jsonl", 9),  # same after normalisation; smallest path
        _rec("WHAT IS 2+2?", "4", "a3", "b.jsonl", 1),
        _rec("Name a colour.", "Blue.", "b1", "c.jsonl", 1),
        _rec("Name a colour.", "Red.", "c1", "c.jsonl", 2),  # same input, other target: not a dup
        _rec("", "A plain document.", "d1", None, None),
        _rec("", "A plain document.", "d2", "z.txt", None),  # None path sorts first as "": d1 kept
        _rec("Unique question?", "Unique answer.", "e1", "e.jsonl", 1),
    ]


def test_exact_key_normalisation():
    a = {"input": "Hello  World", "target": "Ok\n"}
    b = {"input": "hello world", "target": "OK"}
    assert exact_key(a, normalize=True) == exact_key(b, normalize=True)
    assert exact_key(a, normalize=False) != exact_key(b, normalize=False)
    assert exact_key(a, normalize=False) == exact_key(dict(a), normalize=False)
    # input and target are separate fields: moving text across the boundary is a different record.
    assert exact_key({"input": "ab", "target": "c"}, True) != exact_key({"input": "a", "target": "bc"}, True)
    assert len(exact_key(a, True)) == 64


def test_representative_is_smallest_source_path_line_id():
    kept, removed = select_representatives(_corpus(), normalize=True)
    assert [r["id"] for r in kept] == ["a2", "b1", "c1", "d1", "e1"]  # input order
    assert sorted((r["id"], r["duplicate_of"]) for r in removed) == [("a1", "a2"), ("a3", "a2"), ("d2", "d1")]
    assert {r["kind"] for r in removed} == {"exact"}
    assert {r["id"]: r["source_path"] for r in removed}["a3"] == "b.jsonl"


def test_without_normalisation_only_identical_text_collapses():
    kept, removed = select_representatives(_corpus(), normalize=False)
    assert [r["id"] for r in removed] == ["d2"]
    assert len(kept) == 7


def test_same_path_ties_break_on_line_then_id():
    recs = [_rec("q", "t", "z", "p.jsonl", 5), _rec("q", "t", "y", "p.jsonl", 2), _rec("q", "t", "x", "p.jsonl", 5)]
    kept, removed = select_representatives(recs, normalize=True)
    assert [r["id"] for r in kept] == ["y"]
    kept, removed = select_representatives([recs[0], recs[2]], normalize=True)
    assert [r["id"] for r in kept] == ["x"]


def test_fully_identical_members_keep_exactly_one():
    r = _rec("same", "same", "s", "p.jsonl", 1)
    kept, removed = select_representatives([r, dict(r), dict(r)], normalize=True)
    assert len(kept) == 1 and len(removed) == 2


@pytest.mark.parametrize("seed", range(5))
def test_representative_does_not_depend_on_input_order(seed):
    base = _corpus()
    shuffled = base[:]
    random.Random(seed).shuffle(shuffled)
    kept_a, removed_a = select_representatives(base, normalize=True)
    kept_b, removed_b = select_representatives(shuffled, normalize=True)
    assert sorted(r["id"] for r in kept_a) == sorted(r["id"] for r in kept_b)
    assert sorted(map(tuple, (r.values() for r in removed_a))) == sorted(map(tuple, (r.values() for r in removed_b)))


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def _read(paths):
    return [r for p in paths for r in pq.read_table(p).to_pylist()]


def test_stage_counters_removed_and_cache_hit(make_cfg, ctx, records_manifest):
    records = _corpus()
    up = records_manifest(records, parts=3)
    cfg = make_cfg()
    m = run_stage(dedup, [up], cfg, ctx)
    c = m.counters
    assert c == {"in": 8, "out": 5, "rejected": {}, "duplicates": 3}
    assert m.stats["clusters"] == 2 and m.stats["duplicates"] == 3 and m.stats["largest_cluster"] == 3

    kept = _read(m.files_with("data"))
    assert [r["id"] for r in kept] == ["a2", "b1", "c1", "d1", "e1"]
    assert kept[0] == records[1]  # kept records are written unchanged
    assert [e.path for e in m.entries("data")] == ["parts/part-00000.parquet"]
    assert m.entries("data")[0].records == 5

    removed_table = pq.read_table(m.file("removed.parquet"))
    assert removed_table.schema.equals(REMOVED_SCHEMA, check_metadata=False)
    removed = removed_table.to_pylist()
    assert sorted((r["id"], r["duplicate_of"], r["source_path"]) for r in removed) == [
        ("a1", "a2", "b.jsonl"), ("a3", "a2", "b.jsonl"), ("d2", "d1", "z.txt")]
    assert m.entries("removed")[0].records == 3

    again = run_stage(dedup, [up], cfg, ctx)
    assert again.stats["cache"] == "hit"


def test_stage_kept_ids_independent_of_file_order(make_cfg, ctx, records_manifest):
    cfg = make_cfg()
    base = _corpus()
    results = []
    for seed in range(3):
        shuffled = base[:]
        random.Random(seed).shuffle(shuffled)
        m = run_stage(dedup, [records_manifest(shuffled, parts=2)], cfg, ctx)
        results.append(sorted(r["id"] for r in _read(m.files_with("data"))))
    assert results[0] == results[1] == results[2] == ["a2", "b1", "c1", "d1", "e1"]


def test_stage_normalize_off(make_cfg, ctx, records_manifest):
    m = run_stage(dedup, [records_manifest(_corpus())], make_cfg({"dedup": {"normalize": False}}), ctx)
    assert m.counters["duplicates"] == 1 and m.counters["out"] == 7


def test_stage_without_duplicates_writes_no_removed_file(make_cfg, ctx, records_manifest):
    recs = [_rec(f"q{i}", f"t{i}", f"id{i}", "f.jsonl", i) for i in range(4)]
    m = run_stage(dedup, [records_manifest(recs)], make_cfg(), ctx)
    assert m.counters == {"in": 4, "out": 4, "rejected": {}, "duplicates": 0}
    assert m.entries("removed") == [] and m.stats["clusters"] == 0


def test_part_writer_rolls_over_and_keeps_order(tmp_path):
    from corpus2model.schemas.records import records_table

    recs = [_rec(f"question {i} " + "x" * 2000, f"answer {i}", f"id{i:03d}", "f.jsonl", i) for i in range(60)]
    w = PartWriter(tmp_path, max_bytes=20_000)
    for i in range(0, 60, 5):
        w.write(records_table(recs[i:i + 5]))
    entries = w.close()
    assert len(entries) > 1
    assert [e.path for e in entries] == [f"parts/part-{i:05d}.parquet" for i in range(len(entries))]
    back = _read([tmp_path / e.path for e in entries])
    assert [r["id"] for r in back] == [r["id"] for r in recs]
    assert sum(e.records for e in entries) == 60


def test_part_writer_writes_one_empty_part(tmp_path):
    entries = PartWriter(tmp_path).close()
    assert [e.path for e in entries] == ["parts/part-00000.parquet"] and entries[0].records == 0
    assert pq.read_table(tmp_path / entries[0].path).num_rows == 0


# --------------------------------------------------------------------------------------------
# near-duplicates (method: minhash), the persisted sketch index, contamination, standalone use
# --------------------------------------------------------------------------------------------
_VOCAB = [f"word{i}" for i in range(2000)]


def _text(seed, n=200):
    rng = random.Random(seed)
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


def _near(text, k, seed):
    rng = random.Random(seed)
    toks = text.split()
    for _ in range(k):
        toks[rng.randrange(len(toks))] = rng.choice(_VOCAB)
    return " ".join(toks)


def _doc_rec(text, rid, path, line):
    return _rec("", text, rid, path, line, task_type="text")


def _near_corpus():
    base, other = _text(1), _text(2)
    return [
        _doc_rec(_near(base, 2, 10), "n1", "b.jsonl", 1),  # J ~ 0.9 with base
        _doc_rec(base, "n0", "a.jsonl", 5),  # the representative: smallest source_path
        _doc_rec("  " + base.upper() + "\n", "n2", "c.jsonl", 1),  # exact after normalisation
        _doc_rec(_near(base, 40, 11), "far", "c.jsonl", 2),  # J < 0.5: kept
        _doc_rec(other, "o1", "d.jsonl", 1),
        _doc_rec(_text(3), "u1", "d.jsonl", 2),
    ]


MINHASH = {"dedup": {"method": "minhash"}}


def test_minhash_stage_removes_near_and_exact_with_kinds(make_cfg, ctx, records_manifest):
    up = records_manifest(_near_corpus(), parts=2)
    m = run_stage(dedup, [up], make_cfg(MINHASH), ctx)
    assert m.counters == {"in": 6, "out": 4, "rejected": {}, "duplicates": 2}
    removed = sorted((r["id"], r["duplicate_of"], r["kind"]) for r in pq.read_table(m.file("removed.parquet")).to_pylist())
    assert removed == [("n1", "n0", "near"), ("n2", "n0", "exact")]
    assert sorted(r["id"] for r in _read(m.files_with("data"))) == ["far", "n0", "o1", "u1"]
    assert m.stats["near_duplicates"] == 1 and m.stats["exact_duplicates"] == 1
    assert m.stats["sketch_units_computed"] == 2
    assert run_stage(dedup, [up], make_cfg(MINHASH), ctx).stats["cache"] == "hit"


def test_minhash_threshold_is_configurable(make_cfg, ctx, records_manifest):
    m = run_stage(dedup, [records_manifest(_near_corpus(), parts=2)], make_cfg({"dedup": {"method": "minhash", "threshold": 0.97}}), ctx)
    assert m.counters["duplicates"] == 1  # only the exact copy left above 0.97
    # the threshold is not part of the sketch key: another threshold reuses every sketch
    m2 = run_stage(dedup, [records_manifest(_near_corpus(), parts=2)], make_cfg({"dedup": {"method": "minhash", "threshold": 0.5}}), ctx)
    assert m2.stats["sketch_units_computed"] == 0 and m2.stats["sketch_units_reused"] == 2


def test_incremental_index_sketches_only_new_parts(make_cfg, ctx, records_manifest, tmp_path):
    cfg = make_cfg(MINHASH)
    old = [_doc_rec(_text(100 + i), f"old{i}", "old.jsonl", i) for i in range(6)]
    m1 = run_stage(dedup, [records_manifest(old, parts=3)], cfg, ctx)
    assert m1.stats["sketch_units_computed"] == 3 and m1.counters["duplicates"] == 0
    # a new part whose record near-duplicates an old one (and sorts after it)
    new = [_doc_rec(_near(_text(103), 2, 7), "new0", "zz-new.jsonl", 1), _doc_rec(_text(999), "new1", "zz-new.jsonl", 2)]
    up = records_manifest(old, parts=3)
    folder = up.dir
    p = folder / "parts" / "000003.parquet"
    from corpus2model.schemas.records import records_table
    from corpus2model.tasks.stage import FileEntry, sha256_file

    pq.write_table(records_table(new), p)
    up.files.append(FileEntry("parts/000003.parquet", p.stat().st_size, sha256_file(p), "data", 2))
    m2 = run_stage(dedup, [up], cfg, ctx)
    assert m2.stats["sketch_units_computed"] == 1 and m2.stats["sketch_units_reused"] == 3
    # the old parts keep their decisions: their kept parts are reused, only the new one is written
    assert m1.stats["parts_written"] == 3 and m2.stats["parts_written"] == 1
    removed = pq.read_table(m2.file("removed.parquet")).to_pylist()
    assert [(r["id"], r["duplicate_of"], r["kind"]) for r in removed] == [("new0", "old3", "near")]
    assert m2.counters == {"in": 8, "out": 7, "rejected": {}, "duplicates": 1}


def test_contamination_report_and_remove(make_cfg, ctx, records_manifest, tmp_path):
    import json

    evalf = tmp_path / "eval.jsonl"
    leaked = _text(50, 40)
    evalf.write_text(json.dumps({"input": "Q", "target": leaked}) + "\n" + json.dumps({"text": "too short"}) + "\n")
    recs = [_doc_rec("prefix words here " + leaked + " and more", "leak", "a.jsonl", 1), _doc_rec(_text(51), "clean", "a.jsonl", 2)]
    rep = run_stage(dedup, [records_manifest(recs)], make_cfg({"dedup": {"method": "minhash", "eval_files": [str(evalf)]}}), ctx)
    assert rep.stats["contaminated_records"] == 1 and rep.counters["out"] == 2
    rm = run_stage(dedup, [records_manifest(recs)], make_cfg({"dedup": {"method": "minhash", "eval_files": [str(evalf)],
                                                                       "contamination_action": "remove"}}), ctx)
    assert rm.counters == {"in": 2, "out": 1, "rejected": {"contaminated": 1}, "duplicates": 0}
    q = pq.read_table(rm.file("quarantine.parquet")).to_pylist()
    assert q[0]["id"] == "leak" and q[0]["reason"] == "contaminated" and q[0]["score"] == 28.0  # 40 - 13 + 1 n-grams
    # editing the evaluation file changes the key
    evalf.write_text(json.dumps({"text": _text(52, 40)}) + "\n")
    again = run_stage(dedup, [records_manifest(recs)], make_cfg({"dedup": {"method": "minhash", "eval_files": [str(evalf)]}}), ctx)
    assert again.stats["cache"] == "computed" and again.stats["contaminated_records"] == 0


def test_standalone_dedup_folder_names_input_ids(make_cfg, tmp_path):
    import gzip
    import json

    from corpus2model.flows.standalone import dedup_folder

    base = _text(60)
    docs = [("d1", base), ("d2", _text(61)), ("d3", base), ("d4", _near(base, 2, 62)), ("d5", "  " + base + " ")]
    ind = tmp_path / "in"
    ind.mkdir()
    with gzip.open(ind / "shard_0.jsonl.gz", "wt") as f:
        for i, t in docs[:3]:
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    (ind / "shard_1.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs[3:]))
    out = tmp_path / "out"
    m = dedup_folder(ind, out, make_cfg(MINHASH))
    rows = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["duplicate_of"], r["kind"]) for r in rows) == [("d3", "d1", "exact"), ("d4", "d1", "near"), ("d5", "d1", "exact")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dedup"]["counters"] == {"in": 5, "out": 2, "rejected": {}, "duplicates": 3}
    assert sum(e.records for e in m.entries("data")) == 2 and (out / "parts").is_dir()
    assert m.stats["path"] == "jsonl-direct" and m.stats["files_computed"] == 2
    # a rerun on the same store is a cache hit and writes the same removed.jsonl
    m2 = dedup_folder(ind, out, make_cfg(MINHASH))
    assert m2.stats["cache"] == "hit" and len((out / "removed.jsonl").read_text().splitlines()) == 3
    # a grown folder parses and sketches only the new file, and compares it with the stored ones
    (ind / "shard_2.jsonl").write_text(json.dumps({"id": "d6", "text": _near(base, 1, 63)}) + "\n")
    m3 = dedup_folder(ind, out, make_cfg(MINHASH))
    assert m3.stats["files_computed"] == 1 and m3.stats["files_reused"] == 2
    # the old files keep their decisions, so their kept parts are linked, not rewritten
    assert m3.stats["parts_written"] == 1 and m3.stats["parts_reused"] == 2
    rows = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert ("d6", "d1", "near") in {(r["id"], r["duplicate_of"], r["kind"]) for r in rows}


def _jsonl_folder(tmp_path):
    import json

    base = _text(70)
    lines_a = [json.dumps({"id": "a1", "text": base}), "", "{not json",
               json.dumps({"id": "a2", "text": _near(base, 3, 71)}), json.dumps([1, 2]),
               json.dumps({"input": "Q?", "target": _text(72), "metadata": {"domain": "math"}}),
               json.dumps({"id": 7, "text": _text(73)}), json.dumps({"text": 5})]
    lines_b = [json.dumps({"id": "b1", "text": base.upper() + "  "}), json.dumps({"id": "b2", "text": "short text"}),
               json.dumps({"input": "Q?", "target": _text(72), "metadata": {"domain": "math"}, "id": "b3"})]
    ind = tmp_path / "in"
    ind.mkdir()
    (ind / "a.jsonl").write_text("\n".join(lines_a) + "\n")
    (ind / "b.jsonl").write_text("\n".join(lines_b) + "\n")
    (ind / "c.jsonl.gz").write_bytes(b"not gzip at all")
    return ind


def test_jsonl_direct_path_matches_ingest_then_dedup(make_cfg, tmp_path):
    """The standalone JSONL path builds the records ingest builds, rejects the same lines with
    the same reasons, and makes the dedup stage's decisions."""
    from corpus2model.flows.standalone import _stage_on_folder, dedup_folder, write_removed_jsonl
    from corpus2model.schemas.records import occurrence_id

    ind = _jsonl_folder(tmp_path)
    for method in ("minhash", "exact"):
        cfg = make_cfg({"dedup": {"method": method}})
        fast = dedup_folder(ind, tmp_path / f"fast-{method}", cfg)
        assert fast.stats["path"] == "jsonl-direct"
        slow, up = _stage_on_folder("dedup", ind, tmp_path / f"slow-{method}", cfg, None)
        write_removed_jsonl(slow, up, tmp_path / f"slow-{method}" / "removed.jsonl")
        # the direct path's counters are ingest's (in, rejected) and dedup's (out, duplicates)
        assert fast.counters == {"in": up.counters["in"], "out": slow.counters["out"], "rejected": up.counters["rejected"],
                                 "duplicates": slow.counters["duplicates"]}
        assert fast.counters["rejected"] == {"blank_line": 1, "invalid_json": 1, "wrong_type": 2, "corrupt_gzip": 1}
        # rows identical, field by field, in the same order
        assert _read(fast.files_with("data")) == _read(slow.files_with("data"))
        rm = lambda d: sorted((r["id"], r["duplicate_of"], r["kind"]) for r in  # noqa: E731
                              map(json.loads, (d / "removed.jsonl").read_text().splitlines()))
        assert rm(tmp_path / f"fast-{method}") == rm(tmp_path / f"slow-{method}")
        # b3 repeats line 6 of a.jsonl, which has no id of its own: it is named by its occurrence id
        expected = [("b1", "a1", "exact"), ("b3", occurrence_id("a.jsonl", 6), "exact")]
        expected += [("a2", "a1", "near")] if method == "minhash" else []
        assert rm(tmp_path / f"fast-{method}") == sorted(expected)
        q = _read(fast.files_with("quarantine"))
        assert sorted((r["source_path"], r["source_line"] or -1, r["reason"]) for r in q) == [
            ("a.jsonl", 2, "blank_line"), ("a.jsonl", 3, "invalid_json"), ("a.jsonl", 5, "wrong_type"), ("a.jsonl", 8, "wrong_type"),
            ("c.jsonl.gz", -1, "corrupt_gzip")]


def test_batched_normalised_digests_equal_the_per_record_digest():
    """tasks.text.dedup_index.normalized_digests (numpy over a whole batch: ASCII bytes, other text
    as code points) is normalize_for_hash + sha256 record by record, whitespace of every kind included."""
    from corpus2model.tasks.dedup import _digest
    from corpus2model.tasks.text.dedup_index import normalized_digests

    rng = random.Random(5)
    alphabet = "aB z.!\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\u00a0\u2003\u3000\u2028\u0085ßİﬁ½é\u0301中ǅ"
    for _ in range(400):
        targets = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 15))) for _ in range(rng.randint(1, 8))]
        inputs = [rng.choice(["", "", "", "Q  ß?"]) for _ in targets]
        for normalize in (True, False):
            assert normalized_digests(inputs, targets, normalize) == [_digest(i, t, normalize) for i, t in zip(inputs, targets)]
