"""`c2m validate PATH` on the shared dirty SFT file: every planted defect it can see is reported with
the right reason, and the exit code says the file is not fit to train on."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from corpus2model.flows.cli import main
from helpers import SHARED

DIRTY = SHARED / "sft_instructions" / "dirty.jsonl"
LABELS = SHARED / "sft_instructions" / "dirty.labels.jsonl"


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    code = main(["validate", str(DIRTY), "--out", str(out)])
    return code, out


def test_exit_code_and_report_files(validated):
    code, out = validated
    assert code == 1
    assert {"report.md", "report.json", "failing_rows.parquet", "unreadable.parquet"} <= {p.name for p in out.iterdir()}
    html = (out / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert "expect_column_value_lengths_to_be_between" in html and "https://" not in html.split("<body")[0]


def test_unreadable_lines_carry_their_defect(validated):
    _, out = validated
    labels = {json.loads(l)["line"]: json.loads(l)["defects"] for l in LABELS.read_text().splitlines()}
    rows = pq.read_table(out / "unreadable.parquet").to_pylist()
    expected = {"malformed_json": "invalid_json", "invalid_utf8": "invalid_utf8", "blank_line": "blank_line",
                "wrong_type_target": "wrong_type", "wrong_type_metadata": "wrong_type", "null_input": "wrong_type"}
    got = {r["source_line"]: r["reason"] for r in rows}
    for line, defects in labels.items():
        if defects and defects[0] in expected:
            assert got.get(line) == expected[defects[0]], (line, defects)
    assert len(rows) == sum(1 for d in labels.values() if d and d[0] in expected)


def test_content_defects_fail_the_matching_expectation(validated):
    _, out = validated
    labels = {json.loads(l)["line"]: json.loads(l)["defects"] for l in LABELS.read_text().splitlines()}
    failing = pq.read_table(out / "failing_rows.parquet").to_pylist()
    by_line: dict[int, set[str]] = {}
    for r in failing:
        by_line.setdefault(r["source_line"], set()).add(r["reason"])
    want = {"empty_target": "target", "whitespace_target": "target", "overlong_input": "input", "control_chars": ""}
    for line, defects in labels.items():
        if defects and defects[0] in want:
            reasons = by_line.get(line, set())
            assert any(want[defects[0]] in r for r in reasons), (line, defects, reasons)


def test_raw_suite_takes_the_checks_overrides_the_flow_applies(tmp_path):
    """`c2m validate --suite raw_documents.yaml` judges a file as the flow's check_raw does: with
    the config's checks.severity_overrides (the demo relaxes the dirty file's schema defects to warn)."""
    from helpers import ROOT

    suite = ROOT / "schemas" / "suites" / "raw_documents.yaml"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checks:\n  severity_overrides:\n    raw:expect_column_values_to_be_unique:source_record: warn\n",
                   encoding="utf-8")
    strict, relaxed = tmp_path / "strict", tmp_path / "relaxed"
    main(["validate", str(DIRTY), "--suite", str(suite), "--out", str(strict)])
    main(["validate", str(DIRTY), "--suite", str(suite), "--out", str(relaxed), "--config", str(cfg)])

    def severity(out):
        rows = json.loads((out / "report.json").read_text())["report"]["results"]
        return {r["severity"] for r in rows if "source_record" in json.dumps(r)}

    assert severity(strict) == {"error"} and severity(relaxed) == {"warn"}
