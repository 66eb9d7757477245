"""clean: text repair rules, keep/drop reasons, per-part caching, and ingest -> clean -> dedup
on real files from the shared raw corpus."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.config import CleanConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks import clean, dedup, ingest
from corpus2model.tasks.clean import clean_record, clean_text
from corpus2model.tasks.stage import FileEntry, Manifest, run_stage, sha256_file

RAW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raw_text_corpus"

CFG = CleanConfig()


# --------------------------------------------------------------------------------------------
# clean_text
# --------------------------------------------------------------------------------------------
def test_mojibake_is_repaired():
    assert clean_text("FranÃ§ais", CFG) == "Français"
    assert clean_text("donâ€™t stop", CFG) == "don’t stop"  # curly quote kept: it is content
    assert clean_text("FranÃ§ais", CleanConfig(fix_mojibake=False)) == "FranÃ§ais"


def test_control_and_zero_width_characters_are_removed():
    assert clean_text("a\u200bb\u200cc\u200dd\ufeffe\u2060f", CFG) == "abcdef"  # stray joiners in Latin
    assert clean_text("x\x00y\x07z\x0bw\x1f!", CFG) == "xyz\nw!"  # VT is a line break, not debris
    assert clean_text("tab\there\nnext", CleanConfig(keep_indentation=True)) == "tab here\nnext"
    # C1 controls: with mojibake repair off nothing reinterprets them, so they go; NEL is a line break.
    assert clean_text("a\x80b\x9fc\x85d", CleanConfig(fix_mojibake=False)) == "abc\nd"


@pytest.mark.parametrize("text", [
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian "mi-khaham": ZWNJ keeps the prefix apart
    "\U0001F468\u200d\U0001F469\u200d\U0001F467",  # family emoji
    "\U0001F3F3\ufe0f\u200d\U0001F308",  # rainbow flag: VS16 before the ZWJ
    "\U0001F9D1\U0001F3FD\u200d\U0001F4BB",  # skin-tone modifier before the ZWJ
    "\u0d05\u0d35\u0d28\u0d4d\u200d \u0d2a\u0d4b\u0d2f\u0d3f",  # Malayalam chillu before a space
    "\u0915\u094d\u200d\u0937",  # Hindi half-form with ZWJ
])
def test_meaningful_joiners_are_kept(text):
    repairs: dict = {}
    assert clean_text(text, CFG, repairs) == text
    assert repairs == {}


def test_separators_become_line_breaks_and_are_counted():
    repairs: dict = {}
    assert clean_text("page one.\x0cStart", CFG, repairs) == "page one.\nStart"
    assert clean_text("a\x85b\u2028c\u2029d", CFG, repairs) == "a\nb\nc\n\nd"  # NEL is not "\u2026" here
    assert clean_text("don\x92t\x85", CFG, repairs) == "don\u2019t\u2026"  # cp1252 mojibake: \x85 is "\u2026"
    assert repairs == {"line_breaks": 2, "mojibake": 1}


def test_stage_stats_count_repairs(make_cfg, ctx, records_manifest):
    records = [_rec("Stray\u200djoiner in a question?", "Page one.\x0cPage two.", source_path="r.jsonl", source_line=1),
               _rec("Family \U0001F468\u200d\U0001F469\u200d\U0001F467 question?", "An answer.", source_path="r.jsonl", source_line=2)]
    m = run_stage(clean, [records_manifest(records, parts=1)], make_cfg(), ctx)
    assert m.stats["repairs"]["debris"] == 1 and m.stats["repairs"]["line_breaks"] == 1
    kept = [r for p in m.files_with("data") for r in pq.read_table(p).to_pylist()]
    assert any("\U0001F468\u200d\U0001F469\u200d\U0001F467" in r["input"] for r in kept)


def test_whitespace_and_line_endings():
    text = "  one \t  two   \r\nthree\t \r\r\n\r\n\n\nfour\u2028five  \n\n"
    assert clean_text(text, CFG) == "one two\nthree\n\nfour\nfive"
    assert clean_text("a\n \n\t\n \nb", CFG) == "a\n\nb"  # whitespace-only lines are blank lines


def test_indentation_collapses_unless_kept():
    code = "def f():\n        return  1"
    assert clean_text(code, CFG) == "def f():\n return 1"
    assert clean_text(code, CleanConfig(keep_indentation=True)) == "def f():\n        return 1"


def test_unicode_normalization_modes():
    decomposed = "Cafe\u0301 \ufb01 \uff21"  # e + combining acute, fi ligature, full-width A
    assert clean_text(decomposed, CleanConfig(normalization="NFC")) == "Caf\u00e9 \ufb01 \uff21"
    assert clean_text(decomposed, CleanConfig(normalization="NFKC")) == "Caf\u00e9 fi A"
    assert clean_text(decomposed, CleanConfig(normalization="none")) == decomposed


# --------------------------------------------------------------------------------------------
# clean_record
# --------------------------------------------------------------------------------------------
def _rec(inp, tgt, **md):
    return make_record(inp, tgt, task_type=md.pop("task_type", "instruction"), **md)


def test_clean_record_keeps_id_and_cleans_fields():
    rec = _rec("What  is\u200b 2+2?\r\n", "It is four.  \n\n\n\nDone.")
    out, reason, detail = clean_record(rec, CFG)
    assert reason is None and detail == ""
    assert out["id"] == rec["id"]
    assert out["input"] == "What is 2+2?"
    assert out["target"] == "It is four.\n\nDone."
    assert out["metadata"] == rec["metadata"]


def test_too_long_is_rejected_before_cleaning_not_truncated():
    # 40,000 chars that cleaning would shrink to 20,000: still too long, judged on the raw field.
    rec = _rec("a " * 20_000, "short answer")
    out, reason, detail = clean_record(rec, CleanConfig(max_chars=32_768))
    assert out is None and reason == "too_long"
    assert "40000" in detail and "input" in detail
    rec = _rec("question?", "x" * 40_000)
    assert clean_record(rec, CFG)[1] == "too_long"


@pytest.mark.parametrize(
    "inp,tgt,reason",
    [
        ("a long enough question here", "", "empty_target"),
        ("a long enough question here", " \u200b\t\n ", "empty_target"),  # blank after cleaning
        ("hi", "yo", "too_short"),
        ("", "short   text  \r\n\n\n\nhere now  ", None),  # "short text\n\nhere now": exactly min_chars
        ("", "short text here!", "too_short"),
    ],
)
def test_clean_record_reasons(inp, tgt, reason):
    out, got, detail = clean_record(_rec(inp, tgt), CFG)
    assert got == reason
    assert (out is None) == (reason is not None)
    assert bool(detail) == (reason is not None)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def _records():
    good = [_rec(f"Question {i}: what is {i} plus {i}?", f"The answer is {2 * i}.", source_path=f"f{i}.jsonl", source_line=1) for i in range(6)]
    bad = [
        _rec("Question without answer, long enough", "", source_path="bad.jsonl", source_line=1),
        _rec("tiny", "t", source_path="bad.jsonl", source_line=2),
        _rec("overlong", "y" * 40_000, source_path="bad.jsonl", source_line=3),
    ]
    return good[:3] + bad + good[3:]


def test_stage_counters_quarantine_and_cache_hit(make_cfg, ctx, records_manifest):
    records = _records()
    up = records_manifest(records, parts=2)
    cfg = make_cfg()
    m = run_stage(clean, [up], cfg, ctx)
    c = m.counters
    assert c["in"] == 9 and c["out"] == 6
    assert c["rejected"] == {"empty_target": 1, "too_short": 1, "too_long": 1}
    assert c["in"] == c["out"] + sum(c["rejected"].values()) + c["duplicates"]
    assert m.stats["units"] == 2 and m.stats["units_computed"] == 2
    assert m.stats["chars_out"] < m.stats["chars_in"]

    kept = [r for p in m.files_with("data") for r in pq.read_table(p).to_pylist()]
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in records if r["metadata"]["source_path"] != "bad.jsonl")
    assert [e.path for e in m.entries("data")] == ["parts/000000.parquet", "parts/000001.parquet"]

    q = [r for p in m.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
    assert sorted(r["reason"] for r in q) == ["empty_target", "too_long", "too_short"]
    assert {r["stage"] for r in q} == {"clean"}
    assert all(r["source_path"] == "bad.jsonl" and r["detail"] and r["id"] for r in q)
    assert sum(e.records for e in m.entries("quarantine")) == 3

    again = run_stage(clean, [up], cfg, ctx)
    assert again.stats["cache"] == "hit" and again.key == m.key


def test_changing_one_part_recomputes_only_that_unit(make_cfg, ctx, records_manifest):
    records = _records()
    cfg = make_cfg()
    first = run_stage(clean, [records_manifest(records, parts=2)], cfg, ctx)
    assert first.stats["units_computed"] == 2

    changed = records[:-1] + [_rec("A brand new question about cats?", "Cats sleep a lot.", source_path="new.jsonl", source_line=1)]
    second = run_stage(clean, [records_manifest(changed, parts=2)], cfg, ctx)
    assert second.stats["cache"] == "computed"
    assert second.stats["units"] == 2
    assert second.stats["units_computed"] == 1 and second.stats["units_reused"] == 1
    # The recomputed part (the second: records 5..8) is named by the raw files its records came from.
    assert second.stats["computed_files"] == ["bad.jsonl", "f3.jsonl", "f4.jsonl", "new.jsonl"]
    assert second.counters["out"] == first.counters["out"]

    # A config change invalidates every unit.
    third = run_stage(clean, [records_manifest(changed, parts=2)], make_cfg({"clean": {"min_chars": 5}}), ctx)
    assert third.stats["units_computed"] == 2


def test_workers_do_not_change_the_key_or_output(make_cfg, ctx, records_manifest):
    up = records_manifest(_records(), parts=3)
    one = run_stage(clean, [up], make_cfg(), ctx)
    two = run_stage(clean, [up], make_cfg({"clean": {"workers": 2}}), ctx)
    assert two.key == one.key and two.stats["cache"] == "hit"


def test_wrong_schema_part_is_a_clear_error(make_cfg, ctx, tmp_path):
    import pyarrow as pa

    folder = tmp_path / "bogus"
    (folder / "parts").mkdir(parents=True)
    p = folder / "parts" / "x.parquet"
    pq.write_table(pa.table({"text": ["hello"]}), p)
    up = Manifest(stage="ingest", key="bogus", files=[FileEntry("parts/x.parquet", p.stat().st_size, sha256_file(p), "data", 1)], path=str(folder))
    with pytest.raises(clean.StageError, match="RECORD_SCHEMA"):
        run_stage(clean, [up], make_cfg(), ctx)


# --------------------------------------------------------------------------------------------
# ingest -> clean -> dedup on real raw files
# --------------------------------------------------------------------------------------------
def _pick_raw_files() -> tuple[list[str], list[dict]]:
    """~40 files: every member of several planted exact clusters plus a spread of other files."""
    clusters = [json.loads(line) for line in (RAW / "ground_truth" / "duplicates.jsonl").read_text().splitlines()]
    exact = [c for c in clusters if c["kind"] == "exact"]
    wanted_ids = {"pub-dup-007", "pub-dup-008", "pub-dup-011", "pub-dup-015", "pub-dup-017", "pub-dup-018", "pub-dup-021", "pub-dup-051"}
    chosen = [c for c in exact if c["cluster_id"] in wanted_ids]
    picked = {m for c in chosen for m in c["members"]}
    in_any_cluster = {m for c in clusters for m in c["members"]}
    files = [json.loads(line) for line in (RAW / "ground_truth" / "files.jsonl").read_text().splitlines()]
    # Plus unclustered small files from every folder (snippets give too_short, one book too_long).
    by_folder: dict[str, list[str]] = {}
    for f in files:
        if f["path"] not in in_any_cluster and f["bytes"] < 40_000:
            by_folder.setdefault(f["path"].split("/")[1], []).append(f["path"])
    for folder, paths in sorted(by_folder.items()):
        picked.update(sorted(paths)[:4])
    picked.add(next(f["path"] for f in files if f["path"].startswith("raw/gutenberg/") and f["path"] not in in_any_cluster))
    return sorted(picked), chosen


def test_ingest_clean_dedup_on_raw_corpus(make_cfg, ctx, tmp_path):
    if not RAW.is_dir():
        pytest.skip(f"shared corpus not found at {RAW}")
    picked, clusters = _pick_raw_files()
    assert 30 <= len(picked) <= 50
    raw = tmp_path / "raw"
    for rel in picked:
        dst = raw / rel.removeprefix("raw/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RAW / rel, dst)

    cfg = make_cfg()
    source = ingest.scan_raw(raw, cfg.ingest.include, ctx.store)
    m_ingest = run_stage(ingest, [source], cfg, ctx)
    m_clean = run_stage(clean, [m_ingest], cfg, ctx)
    m_dedup = run_stage(dedup, [m_clean], cfg, ctx)

    # Counters chain: what one stage writes out is what the next reads in.
    assert m_clean.counters["in"] == m_ingest.counters["out"]
    assert m_dedup.counters["in"] == m_clean.counters["out"]
    assert m_clean.stats["units"] == len(m_ingest.entries("data")) == len(picked)
    for m in (m_ingest, m_clean, m_dedup):
        c = m.counters
        assert c["in"] + c.get("added", 0) == c["out"] + sum(c["rejected"].values()) + c["duplicates"]
        assert sum(e.records for e in m.entries("data")) == c["out"]
    assert m_clean.counters["rejected"].get("too_long", 0) >= 1  # the Gutenberg book
    q = [r for p in m_clean.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
    assert len(q) == sum(m_clean.counters["rejected"].values())

    kept = [r for p in m_dedup.files_with("data") for r in pq.read_table(p).to_pylist()]
    removed = pq.read_table(m_dedup.file("removed.parquet")).to_pylist()
    assert len(removed) == m_dedup.counters["duplicates"] == m_dedup.stats["duplicates"]
    kept_by_path = {r["metadata"]["source_path"]: r for r in kept}
    kept_ids = {r["id"] for r in kept}
    removed_paths = {r["source_path"] for r in removed}
    assert all(r["duplicate_of"] in kept_ids for r in removed)

    # Every planted exact cluster whose members all survived cleaning ends as one kept record:
    # the member with the smallest path, whatever order the files were read in.
    checked = 0
    cleaned_paths = {r["metadata"]["source_path"] for p in m_clean.files_with("data") for r in pq.read_table(p).to_pylist()}
    for cl in clusters:
        members = sorted(m.removeprefix("raw/") for m in cl["members"])
        if not all(m in cleaned_paths for m in members):
            continue
        checked += 1
        assert members[0] in kept_by_path, cl["cluster_id"]
        assert set(members[1:]) <= removed_paths, cl["cluster_id"]
    assert checked >= 5
    assert m_dedup.stats["clusters"] >= checked

    # Rerun: everything is a cache hit.
    assert run_stage(clean, [m_ingest], cfg, ctx).stats["cache"] == "hit"
    assert run_stage(dedup, [m_clean], cfg, ctx).stats["cache"] == "hit"
