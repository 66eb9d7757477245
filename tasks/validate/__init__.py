"""Validation with Great Expectations: the ``validate`` stage and the check_* boundary nodes.

The package, by concern:

    suite.py     expectation suites as data: loading, checking, severities and config overrides
    tables.py    the tables GE checks (records flattened, raw_* columns, preference pairs)
    runner.py    running GE on one table (validate_table)
    report.py    results, the report (JSON/markdown) and ValidationFailed
    docs.py      Data Docs that read offline (templates/*.css|*.html)
    drift.py     distribution statistics compared with the last successful run
    pairs.py     preference pairs for DPO
    stage.py     the validate stage and the implementation every boundary runs
    boundary.py  the check_raw / check_clean / check_augment declarations

This module re-exports the stage (STAGE, VERSION, SECTIONS, run, key_extra), so
``from corpus2model.tasks import validate`` is a stage module, and the names other modules import.
"""
from __future__ import annotations

from corpus2model.tasks.validate.boundary import CHECKS, BoundaryCheck, boundary_module
from corpus2model.tasks.validate.docs import offline_html
from corpus2model.tasks.validate.drift import DriftResult, check_drift, compare_profiles, profile, save_stats, stats_path
from corpus2model.tasks.validate.pairs import validate_pairs_path, validate_preference_pairs
from corpus2model.tasks.validate.report import BOUNDARY_TITLES, ExpectationResult, ValidationFailed, ValidationReport
from corpus2model.tasks.validate.runner import validate_table
from corpus2model.tasks.validate.stage import (BOUNDARIES, CHECK_SECTIONS, SECTIONS, STAGE, VERSION, failing_rows_table,
                                               key_extra, run, run_boundary, suite_for)
from corpus2model.tasks.validate.suite import (SEVERITIES, SuiteEntry, apply_severity, load_suite, resolve_suite_path,
                                               suite_boundary, suite_kind)
from corpus2model.tasks.validate.tables import (RAW_COLUMNS, file_reader, pairs_frame, raw_columns, raw_shape, raw_shapes,
                                                read_pairs, records_frame)

__all__ = [
    "STAGE", "VERSION", "SECTIONS", "run", "key_extra", "run_boundary", "suite_for", "failing_rows_table", "BOUNDARIES", "CHECK_SECTIONS",
    "CHECKS", "BoundaryCheck", "boundary_module",
    "ValidationFailed", "ValidationReport", "ExpectationResult", "BOUNDARY_TITLES",
    "SuiteEntry", "SEVERITIES", "load_suite", "apply_severity", "resolve_suite_path", "suite_kind", "suite_boundary",
    "records_frame", "pairs_frame", "read_pairs", "raw_shape", "raw_shapes", "raw_columns", "file_reader", "RAW_COLUMNS",
    "validate_table", "offline_html",
    "profile", "DriftResult", "compare_profiles", "check_drift", "save_stats", "stats_path",
    "validate_preference_pairs", "validate_pairs_path",
]
