"""Validation boundaries: the raw suite on the shared dirty SFT file (every defect SOURCE.md lists,
by name), the check_* DAG nodes (report-only, cached, stop the flow unless config relaxes the suite),
distribution checks against the last successful run, and preference pairs for DPO."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.flows.cli import main
from corpus2model.schemas.records import make_record, records_table
from corpus2model.tasks import validate
from corpus2model.flows.stages import DAG, STAGES
from corpus2model.tasks.stage import StageContext, Store, run_stage, stage_config, stage_key
from corpus2model.tasks.validate import (ValidationFailed, apply_severity, check_drift, compare_profiles, load_suite, raw_shapes,
                            save_stats, validate_preference_pairs)
from helpers import ROOT, SHARED

DIRTY = SHARED / "sft_instructions" / "dirty.jsonl"
LABELS = SHARED / "sft_instructions" / "dirty.labels.jsonl"
PAIRS = SHARED / "preference_pairs" / "harmless_base_test_public.jsonl"
SUITES = ROOT / "schemas" / "suites"

# Every defect SOURCE.md lists for dirty.jsonl -> the reason it must be reported with: ingest's
# quarantine reason for lines that cannot become a record, else the raw suite's expectation.
EXPECTED_REASON = {
    "empty_target": "expectation:expect_column_value_lengths_to_be_between:target",
    "whitespace_target": "expectation:expect_column_values_to_not_match_regex:target",
    "missing_metadata": "expectation:expect_column_values_to_be_null:raw_metadata_absent",
    "metadata_missing_field": "expectation:expect_column_values_to_be_null:raw_metadata_missing_fields",
    "wrong_type_id": "expectation:expect_column_values_to_be_in_set:raw_id_type",
    "wrong_type_target": "wrong_type",
    "wrong_type_metadata": "wrong_type",
    "null_input": "wrong_type",
    "duplicate_id": "expectation:expect_column_values_to_be_unique:source_record",
    "overlong_input": "expectation:expect_column_value_lengths_to_be_between:input",
    "control_chars": "expectation:expect_column_values_to_not_match_regex:{field}",
    "invalid_utf8": "invalid_utf8",
    "malformed_json": "invalid_json",
    "extra_field": "expectation:expect_column_values_to_be_null:raw_extra_keys",
    "blank_line": "blank_line",
}
RAW_SCHEMA_ERRORS = {  # what the demo config relaxes to warn (configs/demo.yaml)
    f"raw:{r.split(':', 1)[1]}": "warn" for d, r in EXPECTED_REASON.items()
    if d in {"duplicate_id", "wrong_type_id", "missing_metadata", "metadata_missing_field", "extra_field"}
}


def labels() -> list[dict]:
    return [json.loads(line) for line in LABELS.read_text().splitlines()]


@pytest.fixture(scope="module")
def raw_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw-report")
    code = main(["validate", str(DIRTY), "--suite", "raw_documents", "--out", str(out)])
    return code, out


def test_every_listed_defect_is_caught_with_its_reason(raw_report):
    code, out = raw_report
    assert code == 1  # error-severity schema defects: not fit to train on
    reasons: dict[int, set[str]] = {}
    for name in ("failing_rows.parquet", "unreadable.parquet"):
        for r in pq.read_table(out / name).to_pylist():
            reasons.setdefault(r["source_line"], set()).add(r["reason"])
    source_md = (SHARED / "sft_instructions" / "SOURCE.md").read_text()
    listed = {d for d in EXPECTED_REASON if f"| `{d}` |" in source_md}
    assert listed == set(EXPECTED_REASON)  # the table above covers the file's whole defect list
    seen: dict[str, int] = {}
    for lab in labels():
        for defect in lab["defects"]:
            want = EXPECTED_REASON[defect].format(field=lab.get("detail", "").split(" ")[0].split(":")[0])
            assert want in reasons.get(lab["line"], set()), (lab, reasons.get(lab["line"]))
            seen[defect] = seen.get(defect, 0) + 1
        if not lab["defects"]:
            # A valid line fails nothing, except the earlier copy of a duplicated source id.
            got = reasons.get(lab["line"], set()) - {EXPECTED_REASON["duplicate_id"]}
            assert not got, (lab, got)
    assert set(seen) == set(EXPECTED_REASON) and sum(seen.values()) == 100
    report = json.loads((out / "report.json").read_text())
    failed = {(r["expectation"], r["column"]): r["unexpected_count"] for r in report["report"]["results"] if not r["success"]}
    assert failed[("expect_column_values_to_be_unique", "source_record")] == 20  # 10 repeats and their originals
    assert failed[("expect_column_values_to_be_null", "raw_metadata_absent")] == 8
    assert failed[("expect_column_values_to_be_in_set", "raw_id_type")] == 6
    html = (out / "data_docs" / "index.html").read_text()
    assert "raw documents (ingest)" in html and "raw_metadata_missing_fields" in html and "Statistics" in html


def test_raw_shapes_number_lines_like_ingest():
    lines = [b'{"id": 1, "input": "a", "target": "b"}', b"", b'{"input": "a", "target": "b", "metadata": {"task_type": "x"}}',
             b"not json", b'{"text": "doc", "label": 3}']
    shapes = raw_shapes(gzip.compress(b"\n".join(lines) + b"\n"), "x/f.jsonl.gz")
    assert sorted(shapes) == [1, 3, 5]
    assert shapes[1] == {"raw_id_type": "int", "raw_metadata_absent": "metadata", "raw_extra_keys": None}
    assert shapes[3]["raw_metadata_missing_fields"] == "domain,source" and shapes[3]["raw_id_type"] is None
    assert shapes[5]["raw_extra_keys"] == "label" and "raw_metadata_absent" not in shapes[5]  # documents need no metadata
    assert raw_shapes(b'[{"id": "a", "text": "t"}]', "f.json") == {1: {"raw_id_type": "str", "raw_extra_keys": None}}
    assert raw_shapes(b"plain text", "f.txt") == {}


def test_severity_overrides():
    entries = load_suite(SUITES / "raw_documents.yaml")
    relaxed = apply_severity(entries, RAW_SCHEMA_ERRORS, "raw")
    assert [e.severity for e in relaxed].count("error") == [e.severity for e in entries].count("error") - 5
    assert apply_severity(entries, RAW_SCHEMA_ERRORS, "clean") == entries  # prefixed keys belong to raw only
    with pytest.raises(ValueError, match="raw:expect_column_values_to_be_null:raw_extra_kyes"):
        apply_severity(entries, {"raw:expect_column_values_to_be_null:raw_extra_kyes": "warn"}, "raw")


# ---------------------------------------------------------------------------------------------
# the DAG: check nodes and the refusal to train on the dirty file
# ---------------------------------------------------------------------------------------------
def _run_until(stop: str, cfg, store: Store) -> dict:
    from corpus2model.tasks.ingest import scan_raw

    done = {"source": scan_raw(cfg.paths.raw, cfg.ingest.include, store)}
    ctx = StageContext(store=store)
    for stage, ups in DAG:
        if stage == stop:
            break
        done[stage] = run_stage(STAGES[stage], [done[u] for u in ups], cfg, ctx)
    return done


def test_flow_refuses_dirty_file_unless_config_relaxes_the_suite(make_cfg, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(DIRTY, raw / "dirty.jsonl")
    cfg = make_cfg()
    store = Store(cfg.paths.store)
    with pytest.raises(ValidationFailed, match=r"check_raw: validation failed: 5 error-severity") as e:
        _run_until("tokenize", cfg, store)
    assert e.value.folder.is_dir() and (e.value.folder / "data_docs" / "index.html").is_file()
    assert len(e.value.failing_ids()) == 20 + 6 + 8 + 10 + 4  # each schema defect on its own line
    assert not (store.root / "clean").exists() and not (store.root / "shard").exists()  # nothing downstream ran

    relaxed = make_cfg({"checks": {"severity_overrides": RAW_SCHEMA_ERRORS}})
    done = _run_until("tokenize", relaxed, store)
    check = done["check_raw"]
    assert not check.files_with("data") and check.stats["errors_failed"] == 0 and check.stats["warns_failed"] == 10
    assert check.stats["boundary"] == "raw" and check.stats["profile"]["rows"] == check.counters["in"]
    failing = pq.read_table(check.file("failing_rows.parquet")).to_pylist()
    assert {r["stage"] for r in failing} == {"check_raw"} and {r["detail"] for r in failing} == {"warn"}
    md, docs = (check.dir / "report.md").read_text(), (check.dir / "data_docs" / "index.html").read_text()
    assert "invalid_json 7" in md and "<td><code>invalid_json</code></td><td>7</td>" in docs  # ingest's rejects, too
    assert "first rows: dirty.jsonl lines " in docs and "suite says error; set by checks.severity_overrides" in docs
    assert done["validate"].stats["errors_failed"] == 0 and sum(e.records for e in done["shard"].entries("data")) > 0
    for stage in ("check_clean", "check_augment"):
        assert done[stage].stats["errors_failed"] == 0 and not done[stage].files_with("data")
        assert run_stage(STAGES[stage], [done[u] for u in dict(DAG)[stage]], relaxed, StageContext(store=store)).stats["cache"] == "hit"


def test_check_node_key_follows_its_suite(make_cfg, records_manifest, tmp_path):
    up = records_manifest([make_record(f"q {i}", f"answer number {i}", task_type="math_qa", source_path="a.jsonl")
                           for i in range(4)], stage="dedup")
    suite = tmp_path / "clean.yaml"
    shutil.copy(SUITES / "cleaned_records.yaml", suite)
    cfg = make_cfg({"checks": {"clean_suite": str(suite)}})
    mod = validate.boundary_module("clean")
    key = stage_key(mod, cfg, [up])[0]
    assert stage_key(validate.boundary_module("augment"), make_cfg({"checks": {"clean_suite": str(suite), "augment_suite": str(suite)}}), [up])[0] != key
    # Relaxing a boundary check reruns the check nodes only: the final validate node (and so shard and
    # training) keeps its key.
    relaxed = make_cfg({"checks": {"clean_suite": str(suite), "severity_overrides": RAW_SCHEMA_ERRORS}})
    assert stage_key(mod, relaxed, [up])[0] != key
    assert stage_key(validate, relaxed, [up])[0] == stage_key(validate, cfg, [up])[0]
    suite.write_text(suite.read_text().replace("min_value: 1, max_value: 32768", "min_value: 100, max_value: 32768"))
    assert stage_key(mod, cfg, [up])[0] != key  # an edited suite reruns its node, and only its node's key moves
    with pytest.raises(ValidationFailed, match=r"expect_column_value_lengths_to_be_between\(target\): 4 unexpected"):
        run_stage(mod, [up], cfg, StageContext(store=Store(tmp_path / "store")))


def test_boundary_declarations_key_alike(make_cfg):
    """tasks/validate/boundary.py's CHECKS, the boundary_module() form and the stage table's check_*
    entries are one node each: same name, version, sections, upstream and key (a warm store stays warm)."""
    from corpus2model.tasks.validate.boundary import CHECKS

    cfg = make_cfg()
    for b, c in CHECKS.items():
        mod, declared = validate.boundary_module(b), STAGES[c.stage]
        ups = [f"{u}:k{i}" for i, u in enumerate(c.upstream)]
        assert (c.stage, c.version, c.sections) == (mod.STAGE, mod.VERSION, tuple(mod.SECTIONS)) == (
            declared.name, declared.version, tuple(declared.sections))
        assert c.upstream == tuple(declared.inputs) and c.version == validate.VERSION
        assert c.key_extra(stage_config(mod, cfg)) == mod.key_extra(stage_config(mod, cfg))
        assert stage_key(mod, cfg, ups) == stage_key(declared, cfg, ups)


# ---------------------------------------------------------------------------------------------
# distribution checks
# ---------------------------------------------------------------------------------------------
def test_compare_profiles_values(make_cfg):
    v = make_cfg().validate_
    a = {"rows": 100, "task_types": {"math_qa": 50, "text": 50}, "length_hist": {"5": 50, "8": 50}}
    b = {"rows": 40, "task_types": {"math_qa": 40}, "length_hist": {"5": 10, "8": 30}}
    rows, length, mix = compare_profiles(a, b, v)
    assert (rows.value, rows.ok) == (0.6, False) and "100 → 40 rows (-60.0%)" in rows.detail
    assert length.value == 0.25 and not length.ok  # CDF at bin 5: 0.5 vs 0.25
    assert mix.value == 0.5 and not mix.ok and "text 50% → 0%" in mix.detail
    assert all(r.ok for r in compare_profiles(a, a, v))


def test_drift_against_last_successful_run(make_cfg, records_manifest, tmp_path):
    from corpus2model.tasks.stage import Manifest

    def manifest(n, task="math_qa"):
        recs = [make_record(f"q {i}", "x" * (10 + i), task_type=task) for i in range(n)]
        df = validate.records_frame(records_table(recs))
        return Manifest(stage="check_clean", key=f"k{n}", stats={"boundary": "clean", "profile": validate.profile(df)})

    cfg = make_cfg()
    first = manifest(20)
    assert check_drift(tmp_path, "demo", "clean", first, cfg.validate_) == ([], "drift: no previous run")
    save_stats(tmp_path, "demo", {"check_clean": first})
    results, note = check_drift(tmp_path, "demo", "clean", manifest(20), cfg.validate_)
    assert all(r.ok for r in results) and note == "drift: rows 0.00, length 0.00, task_type 0.00"
    results, note = check_drift(tmp_path, "demo", "clean", manifest(60, task="text"), cfg.validate_)
    assert "rows 2.00!" in note and "task_type 1.00!" in note  # warn by default: reported, no exception
    strict = make_cfg({"validate": {"drift_severity": "error"}}).validate_
    with pytest.raises(ValidationFailed, match="distribution drift at the clean boundary"):
        check_drift(tmp_path, "demo", "clean", manifest(60, task="text"), strict)


# ---------------------------------------------------------------------------------------------
# preference pairs
# ---------------------------------------------------------------------------------------------
def test_preference_pairs_shared_file(tmp_path):
    with pytest.raises(ValidationFailed, match="expect_column_value_lengths_to_be_between\\(chosen\\): 2 unexpected") as e:
        validate_preference_pairs(PAIRS, tmp_path)
    empty = sorted(json.loads(l)["id"] for l in PAIRS.read_text().splitlines() if not json.loads(l)["chosen"])
    assert e.value.failing_ids() == empty and len(empty) == 2  # SOURCE.md: 2 records have an empty chosen
    failing = pq.read_table(tmp_path / "failing_rows.parquet").to_pylist()
    assert sorted(r["id"] for r in failing) == empty and {r["detail"] for r in failing} == {"error"}
    assert "preference pairs" in (tmp_path / "data_docs" / "index.html").read_text()
    assert e.value.report.rows == 1800 and e.value.report.warn_failed == 0


def test_preference_pairs_defects(tmp_path):
    ok = {"prompt": "Human: hi\n\nAssistant:", "chosen": "Hello.", "rejected": "Go away."}
    pairs = [{"id": "a", **ok}, {"id": "b", **ok, "rejected": "Hello."}, {"id": "a", **ok, "chosen": "bell \x07"}]
    with pytest.raises(ValidationFailed) as e:
        validate_preference_pairs(pairs, tmp_path)
    failed = {(r.expectation, r.column): r.failing_ids for r in e.value.report.failed("error")}
    assert failed[("expect_column_values_to_be_in_set", "chosen_equals_rejected")] == ["b"]
    assert failed[("expect_column_values_to_be_unique", "id")] == ["a", "a"]
    assert failed[("expect_column_values_to_not_match_regex", "chosen")] == ["a"]
    assert len(failed) == 3
    # Relaxed by the caller: reported as warnings, no exception.
    relax = {f"{k[0]}:{k[1]}": "warn" for k in failed}
    report = validate_preference_pairs(pairs, tmp_path / "relaxed", severity_overrides=relax)
    assert report.success and report.warn_failed == 3


def test_cli_preference_pairs_suite(tmp_path):
    code = main(["validate", str(PAIRS), "--suite", "preference_pairs", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["records"] == 1800 and report["errors_failed"] == 1
