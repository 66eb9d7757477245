"""Preference pairs for DPO: the preference_pairs suite on a pairs file or table (the DPO loader calls
``validate_preference_pairs``; ``c2m validate PATH --suite preference_pairs`` calls
``validate_pairs_path``). Same outputs as a records boundary: data_docs/, report.md, report.json and
failing_rows.parquet."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.schemas.records import QUARANTINE_SCHEMA, quarantine_row
from corpus2model.tasks.common.artifacts import publish_link, publish_markdown
from corpus2model.tasks.stage import StageError
from corpus2model.tasks.validate.report import ValidationFailed, ValidationReport, failure_message
from corpus2model.tasks.validate.runner import validate_table
from corpus2model.tasks.validate.suite import resolve_suite_path, suite_kind
from corpus2model.tasks.validate.tables import read_pairs


def validate_preference_pairs(table_or_path, out_dir: str | Path, suite: str | Path = "preference_pairs",
                              severity_overrides: dict | None = None, max_failing_rows: int = 1000) -> ValidationReport:
    """Validate DPO preference pairs (a JSONL path, pyarrow Table, DataFrame or list of dicts) with the
    preference_pairs suite. Writes ``out_dir``: data_docs/index.html, report.md, report.json and
    failing_rows.parquet (quarantine schema, one row per failing pair and expectation). Raises
    ValidationFailed (``.report`` holds the results, ``.failing_ids()`` the pairs to drop) when an
    error-severity expectation fails; warn failures are only reported."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_path = resolve_suite_path(suite)
    if suite_kind(suite_path) != "preference_pairs":
        raise StageError(f"{suite_path} is not a preference-pairs suite (it needs 'table: preference_pairs')")
    rows = read_pairs(table_or_path) if isinstance(table_or_path, (str, Path)) else table_or_path
    report = validate_table(rows, suite_path, out_dir / "data_docs", max_failing_rows,
                            severity_overrides=severity_overrides, boundary="pairs")
    records = _rows_as_dicts(rows)
    q = []
    for r in report.results:
        for i in r.failing_rows:
            q.append(quarantine_row("validate_pairs", r.reason, detail=r.severity, record=records[i]))
    pq.write_table(pa.Table.from_pylist(q, schema=QUARANTINE_SCHEMA), out_dir / "failing_rows.parquet")
    summary = {**report.to_dict(), "docs_index": "data_docs/index.html", "source": str(table_or_path) if isinstance(table_or_path, (str, Path)) else None}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    markdown = report.to_markdown()
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    publish_markdown("validate-pairs-summary", markdown, description="" if report.success else "validation FAILED")
    publish_link("validate-pairs-data-docs", "file://" + str((out_dir / "data_docs" / "index.html").resolve()),
                 text="Data Docs: preference pairs")
    if not report.success:
        raise ValidationFailed(failure_message(report, suite_path, "validate_preference_pairs", out_dir),
                               report=report, folder=out_dir)
    return report


def _rows_as_dicts(rows) -> list[dict]:
    import pandas as pd

    if isinstance(rows, pa.Table):
        return rows.to_pylist()
    if isinstance(rows, pd.DataFrame):
        return rows.to_dict("records")
    return list(rows)


def validate_pairs_path(path: Path, out_dir: Path, suite_path: Path, vcfg) -> dict:
    """``c2m validate PATH --suite preference_pairs``: the validate_path summary for a pairs file."""
    try:
        report = validate_preference_pairs(path, out_dir, suite_path, vcfg.severity_overrides, vcfg.max_failing_rows)
    except ValidationFailed as e:
        if e.report is None:
            raise
        report = e.report
    # Pairs have no ingest step: nothing is "unreadable" here (a non-JSON line is a StageError).
    pq.write_table(QUARANTINE_SCHEMA.empty_table(), out_dir / "unreadable.parquet")
    summary = {"path": str(path), "suite": str(suite_path), "records": report.rows, "unreadable": 0,
               "unreadable_reasons": {}, "errors_failed": report.error_failed, "warns_failed": report.warn_failed,
               "docs_index": str(out_dir / "data_docs" / "index.html")}
    # The same report.json shape as validate_path writes for records.
    (out_dir / "report.json").write_text(json.dumps({**summary, "report": report.to_dict()}, indent=1, default=str),
                                         encoding="utf-8")
    return {**summary, "markdown": report.to_markdown()}
