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
