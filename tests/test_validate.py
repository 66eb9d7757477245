"""validate: suite loading, flattening, real Great Expectations runs on clean and dirty records,
offline Data Docs, and the stage (warn continues, error stops with a surviving report, caching)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.records import empty_metadata, make_record, records_table
from corpus2model.tasks import validate
from corpus2model.tasks.stage import StageError, run_stage, sha256_bytes, sha256_file, stage_config, stage_key
from corpus2model.tasks.validate import ValidationFailed, load_suite, records_frame, validate_table
from corpus2model.tasks.validate import stage as validate_stage
from helpers import ROOT, SHARED

SUITE = ROOT / "schemas" / "suites" / "training_records.yaml"
DIRTY = SHARED / "sft_instructions" / "dirty.jsonl"
LABELS = SHARED / "sft_instructions" / "dirty.labels.jsonl"


def clean_records(n: int = 12) -> list[dict]:
    return [
        make_record(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", task_type="math_qa",
                    domain="math", source="unit", source_path="unit.jsonl", source_line=i + 1)
        for i in range(n)
    ]


def dirty_records() -> tuple[list[dict], list[int]]:
    """The dirty.jsonl lines that ingest would keep (JSON objects with string fields), ids as written."""
    records, lines = [], []
    for line_no, raw in enumerate(DIRTY.read_bytes().split(b"\n"), start=1):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("id", "input", "target")):
            continue
        md = obj.get("metadata", {})
        if not isinstance(md, dict) or any(not isinstance(md[k], str) for k in ("task_type", "domain", "source") if k in md):
            continue
        records.append({
            "id": obj["id"], "input": obj["input"], "target": obj["target"],
            "metadata": empty_metadata(task_type=md.get("task_type"), domain=md.get("domain"), source=md.get("source"),
                                       source_path="dirty.jsonl", source_line=line_no),
        })
        lines.append(line_no)
    return records, lines


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """One real GE validation of the dirty file (with Data Docs), shared by the tests below."""
    records, lines = dirty_records()
    docs = tmp_path_factory.mktemp("dirty") / "data_docs"
    report = validate_table(records_table(records), SUITE, docs)
    return report, records, lines, docs


def _result(report, expectation: str, column: str):
    (r,) = [r for r in report.results if r.expectation == expectation and r.column == column]
    return r


def test_records_frame_flattens_metadata():
    recs = clean_records(3)
    recs[1]["metadata"]["aug_method"] = "word_swap"
    df = records_frame(records_table(recs))
    assert list(df.columns[:3]) == ["id", "input", "target"] and "metadata" not in df.columns
    assert df["metadata_task_type"].tolist() == ["math_qa"] * 3
    assert df["metadata_source_line"].tolist() == [1, 2, 3]
    assert df["metadata_aug_method"].isna().tolist() == [True, False, True]
    # A DataFrame with a metadata column of dicts flattens the same way; absent fields exist, all null.
    df2 = records_frame(pd.DataFrame([{"id": "a", "input": "", "target": "t", "metadata": {"task_type": "text"}}]))
    assert df2.loc[0, "metadata_task_type"] == "text" and df2["metadata_parent_id"].isna().all()


def test_suite_errors_name_file_and_entry(tmp_path):
    entries = load_suite(SUITE)
    assert {e.severity for e in entries} == {"error", "warn"} and all(e.why for e in entries)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {expectation: expect_table_row_count_to_be_between, kwargs: {min_value: 1}, severity: error, why: x}\n"
                   "- {expectation: expect_column_values_to_be_purple, kwargs: {column: id}, severity: error, why: x}\n")
    with pytest.raises(StageError, match=r"bad\.yaml, entry 1: unknown expectation 'expect_column_values_to_be_purple'"):
        load_suite(bad)
    bad.write_text("- {expectation: expect_column_values_to_not_be_null, kwargs: {column: id}, severity: fatal, why: x}\n")
    with pytest.raises(StageError, match=r"bad\.yaml, entry 0 .*severity must be one of"):
        load_suite(bad)


def test_clean_table_passes():
    report = validate_table(records_table(clean_records()), SUITE, None)
    assert report.success and report.error_failed == 0 and report.warn_failed == 0
    assert report.rows == 12 and len(report.results) == len(load_suite(SUITE))
    assert all(r.success and r.unexpected_count == 0 and not r.failing_rows for r in report.results)


def test_dirty_defects_caught_by_matching_expectation(dirty):
    report, records, lines, _ = dirty
    row_of_line = {line: row for row, line in enumerate(lines)}
    flagged = {(r.expectation, r.column): set(r.failing_rows) for r in report.results}
    checked = 0
    for label in map(json.loads, LABELS.read_text().splitlines()):
        row = row_of_line.get(label["line"])
        if row is None:
            continue  # not parseable / wrong types: ingest quarantines it, validation never sees it
        for defect in label["defects"]:
            if defect == "duplicate_id":
                expected = ("expect_column_values_to_be_unique", "id")
            elif defect == "empty_target":
                expected = ("expect_column_value_lengths_to_be_between", "target")
            elif defect == "overlong_input":
                expected = ("expect_column_value_lengths_to_be_between", "input")
            elif defect == "control_chars":
                field = "input" if label["detail"].startswith("input") else "target"
                expected = ("expect_column_values_to_not_match_regex", field)
            else:
                continue
            assert row in flagged[expected], f"line {label['line']} ({defect}) not flagged by {expected}"
            checked += 1
        if not label["defects"]:
            # Valid lines pass the content checks (uniqueness also flags a duplicate's first copy).
            for key in [("expect_column_value_lengths_to_be_between", "input"),
                        ("expect_column_value_lengths_to_be_between", "target"),
                        ("expect_column_values_to_not_match_regex", "input"),
                        ("expect_column_values_to_not_match_regex", "target")]:
                assert row not in flagged[key], f"valid line {label['line']} flagged by {key}"
    assert checked == 10 + 12 + 6 + 8  # every such defect in the file reaches the table
    assert not report.success
    assert _result(report, "expect_column_values_to_be_unique", "id").unexpected_count == 20  # both copies
    dup_ids = _result(report, "expect_column_values_to_be_unique", "id").failing_ids
    assert "gsm8k-train-03457" in dup_ids and len(dup_ids) == 20
    # missing_metadata / metadata_missing_field lines reach the table without a task type.
    assert not _result(report, "expect_column_values_to_not_be_null", "metadata_task_type").success
    assert _result(report, "expect_table_row_count_to_be_between", None).observed_value == len(records)


def test_data_docs_read_offline(dirty):
    report, _, _, docs = dirty
    pages = sorted(docs.rglob("*.html"))
    assert report.docs_index == docs / "index.html" and report.docs_index in pages
    assert {"validation", "suite"} <= set(report.docs_pages)
    assert not [p for p in docs.rglob("*") if p.is_file() and p.suffix != ".html"]  # no 3.6 MB of GIFs
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "<script" not in text.lower(), page
        assert not re.search(r"<link[^>]+https?://", text, re.I), page
        assert not re.search(r"url\(\s*['\"]?https?://", text, re.I), page
        assert not re.search(r"<img[^>]+https?://", text, re.I), page
        assert "\x00" not in text and "\x1b" not in text, page
        assert "<style>" in text, page
    index = report.docs_index.read_text(encoding="utf-8")
    for r in report.results:
        assert r.expectation in index
    assert "FAILED" in index and report.docs_pages["validation"] in index
    gx_page = (docs / report.docs_pages["validation"]).read_text(encoding="utf-8")
    assert "values must be unique" in gx_page and "gsm8k-train-03457" in gx_page
    assert "characters, truncated" in gx_page  # the 120k-character inputs are not copied verbatim
    assert "[U+0000]" in gx_page  # a NUL in a failing value is shown, not emitted


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def test_suite_path_resolves_from_any_cwd(make_cfg, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default relative path falls back to the project root
    extra = validate.key_extra(stage_config(validate, make_cfg()))
    # the preference_pairs suite (the final node validates pairs too) is keyed beside it
    assert extra == {"suite_sha256": sha256_bytes(SUITE.read_bytes()),
                     "pairs_suite_sha256": sha256_bytes((SUITE.parent / "preference_pairs.yaml").read_bytes())}
    with pytest.raises(StageError, match="nope.yaml not found"):
        validate.key_extra(stage_config(validate, make_cfg({"validate": {"suite": "nope.yaml"}})))


def test_stage_warn_continues_and_caches(make_cfg, ctx, records_manifest, tmp_path, monkeypatch):
    published = {}
    # The stage module publishes the artifacts (the package only re-exports it).
    monkeypatch.setattr(validate_stage, "publish_link", lambda key, link, **kw: published.update({key: link}))
    monkeypatch.setattr(validate_stage, "publish_markdown", lambda key, md, **kw: published.update({key: md}))
    recs = clean_records(10)
    recs[3]["metadata"]["task_type"] = "poetry"  # unknown type: warn
    recs[7]["metadata"]["source_path"] = None  # no lineage: warn
    up = records_manifest(recs, stage="augment", parts=2)
    suite_copy = tmp_path / "suite.yaml"
    shutil.copy(SUITE, suite_copy)
    cfg = make_cfg({"validate": {"suite": str(suite_copy), "max_failing_rows": 5}})

    m = run_stage(validate, [up], cfg, ctx)
    assert m.stats["cache"] == "computed"
    assert m.counters == {"in": 10, "out": 10, "rejected": {}, "duplicates": 0}
    assert m.stats["errors_failed"] == 0 and m.stats["warns_failed"] == 2 and m.stats["rows"] == 10
    assert m.stats["expectations"] == len(load_suite(SUITE))
    assert m.stats["docs_index"] == "data_docs/index.html" and (m.dir / m.stats["docs_index"]).is_file()
    # The link artifact points at the final store folder, not the temporary one run() wrote into.
    assert published["validate-data-docs"] == "file://" + str(m.dir / "data_docs" / "index.html")
    assert published["validate-summary"] == (m.dir / "report.md").read_text()

    # The records pass through unchanged, same part names.
    data = m.entries("data")
    assert [e.path for e in data] == ["parts/000000.parquet", "parts/000001.parquet"]
    assert [sha256_file(p) for p in m.files_with("data")] == [sha256_file(p) for p in up.files_with("data")]
    assert sum(e.records for e in data) == 10

    (q,) = m.files_with("quarantine")
    failing = pq.read_table(q).to_pylist()
    assert sorted((r["reason"], r["detail"], r["id"]) for r in failing) == sorted([
        ("expectation:expect_column_values_to_be_in_set:metadata_task_type", "warn", recs[3]["id"]),
        ("expectation:expect_column_values_to_not_be_null:metadata_source_path", "warn", recs[7]["id"]),
    ])
    reports = {e.path for e in m.entries("report")}
    assert {"report.json", "report.md", "data_docs/index.html"} <= reports
    assert any(p.startswith("data_docs/validations/") for p in reports)
    summary = json.loads((m.dir / "report.json").read_text())
    assert summary["warn_failed"] == 2 and summary["error_failed"] == 0 and summary["rows"] == 10
    sev = {(r["expectation"], r["column"]): r["severity"] for r in summary["results"]}
    assert sev[("expect_column_values_to_be_in_set", "metadata_task_type")] == "warn"
    md = (m.dir / "report.md").read_text()
    assert "| expectation | column | severity | result | unexpected |" in md
    assert "| expect_column_values_to_be_in_set | metadata_task_type | warn | FAIL | 1 (10.00%) |" in md

    assert run_stage(validate, [up], cfg, ctx).stats["cache"] == "hit"

    # Editing the suite (not the config) changes the key: validation reruns.
    key_before = stage_key(validate, cfg, [up])[0]
    assert key_before == m.key
    suite_copy.write_text(suite_copy.read_text().replace("classification]", "classification, poetry]"))
    assert stage_key(validate, cfg, [up])[0] != key_before


def test_stage_error_stops_with_surviving_report(make_cfg, ctx, records_manifest):
    recs = clean_records(8)
    recs[2]["target"] = ""  # error: empty target
    recs[5]["input"] = "tab\tok but bell \x07 is not"  # error: control character
    up = records_manifest(recs, stage="augment")
    cfg = make_cfg()
    with pytest.raises(ValidationFailed) as e:
        run_stage(validate, [up], cfg, ctx)
    msg = str(e.value)
    assert "2 error-severity" in msg
    assert "expect_column_value_lengths_to_be_between(target): 1 unexpected" in msg
    assert "expect_column_values_to_not_match_regex(input): 1 unexpected" in msg
    folder = Path(re.search(r"Report: (\S+) \(", msg).group(1))
    assert folder.parent == ctx.store.root / "reports" and folder.name.startswith("validate-failed-")
    assert (folder / "data_docs" / "index.html").is_file() and (folder / "report.md").is_file()
    failing = pq.read_table(folder / "failing_rows.parquet").to_pylist()
    assert {(r["id"], r["detail"]) for r in failing} == {(recs[2]["id"], "error"), (recs[5]["id"], "error")}
    assert json.loads((folder / "report.json").read_text())["error_failed"] == 2
    # Nothing that looks finished: no output folder for the stage.
    assert not (ctx.store.root / "validate").exists() or not any((ctx.store.root / "validate").iterdir())
