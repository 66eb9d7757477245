"""Issue 18: never delete, alter or hang on a record (ingest, dedup, config loading)."""
from __future__ import annotations

import gzip
import json
import os
import time
import tracemalloc

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.config import ConfigError, load_config
from corpus2model.schemas.records import content_hash, occurrence_id, occurrence_ids
from corpus2model.tasks import dedup, ingest
from corpus2model.tasks.ingest import parse_file, scan_raw
from corpus2model.tasks.stage import run_stage


def _rows(paths):
    return [r for p in paths for r in pq.read_table(p).to_pylist()]


def _balanced(counters):
    return counters["in"] == counters["out"] + sum(counters["rejected"].values()) + counters["duplicates"]


# --- item 3: ids keep their exact source text ------------------------------------------------------
ODD_IDS = [b'{"id": 18446744073709551617, "text": "first text of the pair"}',
           b'{"id": 18446744073709551616, "text": "second text of the pair"}',
           b'{"id": 1e400, "text": "huge float id"}',
           b'{"id": 1.10, "text": "trailing zero id"}',
           b'{"id": NaN, "text": "not a number id"}',
           b'{"id": {"x": 1}, "text": "object id"}',
           b'{"id": true, "text": "boolean id"}']
KEPT_IDS = ["18446744073709551617", "18446744073709551616", "1e400", "1.10"]


def test_ingest_keeps_numeric_ids_as_written_and_quarantines_ids_that_name_nothing(make_cfg):
    records, rejects, n_in = parse_file(b"\n".join(ODD_IDS) + b"\n", "ids.jsonl", "sha", make_cfg().ingest)
    assert [r["metadata"]["source_id"] for r in records] == KEPT_IDS
    assert [(r["source_line"], r["reason"]) for r in rejects] == [(5, "invalid_id"), (6, "invalid_id"), (7, "invalid_id")]
    assert n_in == 7


def test_dedup_jsonl_fast_path_keeps_big_ids_distinct(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    ind = tmp_path / "in"
    ind.mkdir()
    (ind / "ids.jsonl").write_bytes(b"\n".join(ODD_IDS) + b"\n")
    m = dedup_folder(ind, tmp_path / "out", make_cfg({"dedup": {"method": "exact"}}))
    kept = _rows(m.files_with("data"))
    assert [r["metadata"]["source_id"] for r in kept] == KEPT_IDS
    assert (tmp_path / "out" / "removed.jsonl").read_text() == ""  # no id collapsed onto another
    assert m.counters == {"in": 7, "out": 4, "rejected": {"invalid_id": 3}, "duplicates": 0}


# --- item 4: one bad line does not turn a UTF-8 file into mojibake -----------------------------------
def test_one_cp1252_line_in_a_utf8_file_is_repaired_alone(make_cfg):
    lines = [f"Ligne {i} : très bon café, à bientôt.".encode() for i in range(20)]
    lines.append("Une ligne écrite sous Windows : très bon.".encode("cp1252"))
    stats: dict = {}
    records, rejects, _ = parse_file(b"\n".join(lines) + b"\n", "fr.txt", "sha", make_cfg().ingest, stats)
    assert not rejects and len(records) == 1
    text, md = records[0]["target"], records[0]["metadata"]
    assert md["encoding"] == "utf-8" and "trÃ" not in text
    assert text.splitlines()[0] == "Ligne 0 : très bon café, à bientôt."
    assert text.splitlines()[20] == "Une ligne écrite sous Windows : très bon."
    assert md["decode_repairs"] == "line 21: cp1252" and stats["decode_repairs"] == 1


def test_utf8_file_with_one_stray_byte_is_kept_with_the_byte_replaced(make_cfg):
    body = "\n".join(f"Строка {i}: очень хороший текст." for i in range(10)).encode()
    data = body.replace("Строка 4".encode(), "Строка 4".encode() + b"\xff")
    records, rejects, _ = parse_file(data, "ru.txt", "sha", make_cfg().ingest)
    assert not rejects and len(records) == 1
    text = records[0]["target"]
    assert text.splitlines()[4] == "Строка 4\ufffd: очень хороший текст." and text.splitlines()[3] == "Строка 3: очень хороший текст."
    assert records[0]["metadata"]["decode_repairs"] == "line 5: 1 invalid byte replaced"


def test_a_wholly_legacy_file_is_still_detected_not_repaired(make_cfg):
    data = "\n".join(["Ein schöner Tag in der Straße, nicht wahr?"] * 5).encode("cp1252")
    records, _, _ = parse_file(data, "de.txt", "sha", make_cfg().ingest)
    assert "schöner" in records[0]["target"] and records[0]["metadata"]["decode_repairs"] is None


# --- item 6: every occurrence has its own id; a removed duplicate names the kept one ------------------
def test_exact_copies_get_their_own_ids_and_removed_names_the_kept_record(make_cfg, ctx, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    doc = "A document that was copied into two folders of the corpus, word for word.\n"
    (raw / "a.txt").write_text(doc)
    (raw / "b.txt").write_text(doc)
    (raw / "c.jsonl").write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": doc}) + "\n")
    cfg = make_cfg({"dedup": {"method": "exact"}})
    m_in = run_stage(ingest, [scan_raw(raw, cfg.ingest.include, ctx.store)], cfg, ctx)
    recs = _rows(m_in.files_with("data"))
    assert len({r["id"] for r in recs}) == 4
    assert {r["metadata"]["content_hash"] for r in recs} == {content_hash("", doc)}
    assert {r["id"] for r in recs} == {occurrence_id("a.txt", None), occurrence_id("b.txt", None),
                                       occurrence_id("c.jsonl", 1), occurrence_id("c.jsonl", 2)}
    m = run_stage(dedup, [m_in], cfg, ctx)
    removed = _rows(m.files_with("removed"))
    assert len(removed) == 3 and all(r["id"] != r["duplicate_of"] for r in removed)
    assert {r["duplicate_of"] for r in removed} == {occurrence_id("a.txt", None)}
    assert {(r["source_path"], r["source_line"]) for r in removed} == {("b.txt", None), ("c.jsonl", 1), ("c.jsonl", 2)}
    assert {(r["kept_source_path"], r["kept_source_line"]) for r in removed} == {("a.txt", None)}
    for method in ("exact", "minhash"):  # the near-duplicate path writes the same rows
        mm = run_stage(dedup, [m_in], make_cfg({"dedup": {"method": method}}), ctx)
        assert sorted(map(json.dumps, _rows(mm.files_with("removed")))) == sorted(map(json.dumps, removed))


def test_standalone_removed_jsonl_names_kept_source(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    ind = tmp_path / "in"
    ind.mkdir()
    line = json.dumps({"text": "the same words in two shards of the corpus, copied"}) + "\n"
    (ind / "a.jsonl").write_text(line)
    (ind / "b.jsonl").write_text(line)
    dedup_folder(ind, tmp_path / "out", make_cfg({"dedup": {"method": "exact"}}))
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert row["id"] == occurrence_id("b.jsonl", 1) and row["duplicate_of"] == occurrence_id("a.jsonl", 1)
    assert (row["source_path"], row["kept_source_path"], row["kept_source_line"]) == ("b.jsonl", "a.jsonl", 1)


# --- item 7: links leaving the input folder are refused, and every skip is counted -----------------
def test_links_out_of_the_raw_folder_are_refused_and_skips_counted(make_cfg, ctx, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "doc.txt").write_text("A document that belongs to the corpus and should be read.\n")
    os.symlink(outside, raw / "x.txt")
    os.symlink(raw / "doc.txt", raw / "inside.txt")  # stays in the folder: read
    os.symlink(raw / "missing.txt", raw / "broken.txt")
    os.symlink(raw / "loop.txt", raw / "loop.txt")
    os.symlink(tmp_path, raw / "sub" / "up")  # a directory link is not walked
    (raw / "notes.pdf").write_bytes(b"%PDF")
    os.mkfifo(raw / "pipe.txt")  # reading it would hang
    cfg = make_cfg()
    source = scan_raw(raw, cfg.ingest.include, ctx.store)
    assert sorted(f.path for f in source.files) == ["doc.txt", "inside.txt"]
    assert source.stats["skipped"] == {"broken_link": 1, "directory_link": 1, "link_loop": 1, "link_outside_root": 1,
                                       "not_a_regular_file": 1, "not_included": 1}
    assert ["x.txt", "link_outside_root"] in source.stats["skipped_files"]
    m = run_stage(ingest, [source], cfg, ctx)
    assert m.stats["skipped"] == source.stats["skipped"]
    assert all("root:x" not in r["target"] for r in _rows(m.files_with("data")))


# --- item 11: one bad line is one quarantined line, never a traceback --------------------------------
BAD_LINES = [b'{"text": "a lone surrogate \\ud800 in the text"}', b"[" * 5000 + b"]" * 5000,
             b'{"text": "fine line of text"}', b'{"id": "x", "input": "q", "target": "\\udc00"}']


def test_surrogates_and_deep_nesting_are_quarantined_by_ingest(make_cfg):
    records, rejects, n_in = parse_file(b"\n".join(BAD_LINES) + b"\n", "bad.jsonl", "sha", make_cfg().ingest)
    assert sorted((r["source_line"], r["reason"]) for r in rejects) == [(1, "invalid_unicode"), (2, "too_deep"), (4, "invalid_unicode")]
    assert len(records) == 1 and n_in == 4
    pq.write_table(ingest.quarantine_table(rejects), "/dev/null")  # writable as Parquet
    whole, wrejects, _ = parse_file(b"[" * 5000 + b"]" * 5000, "deep.json", "sha", make_cfg().ingest)
    assert not whole and wrejects[0]["reason"] == "too_deep"


def test_surrogates_and_deep_nesting_are_quarantined_by_dedup(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    ind = tmp_path / "in"
    ind.mkdir()
    (ind / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    m = dedup_folder(ind, tmp_path / "out", make_cfg({"dedup": {"method": "exact"}}))
    assert m.counters == {"in": 4, "out": 1, "rejected": {"invalid_unicode": 2, "too_deep": 1}, "duplicates": 0}
    assert _balanced(m.counters)


# --- item 12: bounded config and gzip ------------------------------------------------------------
def test_billion_laughs_config_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines += ["ingest: {include: *a9}"]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand") as e:
        load_config(p)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)


def test_gzip_bomb_is_rejected_without_inflating_it(make_cfg):
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    cfg = make_cfg({"ingest": {"max_file_bytes": 1 << 20}}).ingest
    tracemalloc.start()
    records, rejects, _ = parse_file(bomb, "bomb.txt.gz", "sha", cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not records and rejects[0]["reason"] == "file_too_large"
    assert peak < 8 << 20  # the file inflates to 64 MiB; only the first MiB + 1 byte is held


def test_occurrence_ids_keep_their_definition():
    """Ids are stored keys: sha256(path + US + line number, nothing for a whole-file document)[:16], whether
    made one by one or a file at a time (one path hash per file)."""
    import hashlib

    def defined(path, line):
        raw = path.encode("utf-8", "surrogatepass") + b"\x1f" + (b"" if line is None else str(line).encode())
        return hashlib.sha256(raw).hexdigest()[:16]

    for path in ("a/b.jsonl.gz", "x\udcff.jsonl", "日本/文.jsonl"):
        lines = [1, 2, 10, 99999, None]
        assert occurrence_ids(path, lines) == [defined(path, n) for n in lines]
        assert [occurrence_id(path, n) for n in lines] == [defined(path, n) for n in lines]


def test_gzip_fast_inflate_agrees_with_the_careful_reader():
    """ingest.inflate_one_member (ISA-L when installed) returns a single complete member's bytes and
    None for what the careful reader must decide (cut, several members, corrupt, too large)."""
    from corpus2model.tasks.ingest import inflate_one_member, read_raw

    body = "".join(json.dumps({"id": str(i), "text": f"line {i} é"}) + "\n" for i in range(500)).encode()
    gz = gzip.compress(body)
    assert inflate_one_member(gz, 10**6) == body
    assert inflate_one_member(gz[:-7], 10**6) is None  # cut
    assert inflate_one_member(gz + gz, 10**6) is None  # two members
    assert inflate_one_member(gz, len(body) - 1) is None  # over the limit
    bad = bytearray(gz)
    bad[-6] ^= 1  # CRC
    assert inflate_one_member(bytes(bad), 10**6) is None
    assert read_raw(gz + gz, "x.jsonl.gz", 10**6)[0] == body + body
    assert read_raw(bytes(bad), "x.jsonl.gz", 10**6)[2]["reason"] == "corrupt_gzip"
