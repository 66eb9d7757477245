"""Running Great Expectations: one suite on one table in a throwaway file context, results in suite
order with the failing rows' positions, ids and source lines, Data Docs post-processed to read
offline. great_expectations and pandas are imported inside the functions (heavy)."""
from __future__ import annotations

import contextlib
import logging
import numbers
import tempfile
from pathlib import Path
from typing import Any

from corpus2model.tasks.stage import StageError, sha256_bytes
from corpus2model.tasks.validate.docs import publish_docs
from corpus2model.tasks.validate.drift import profile
from corpus2model.tasks.validate.report import ExpectationResult, ValidationReport
from corpus2model.tasks.validate.suite import SuiteEntry, apply_severity, gx_expectation, import_gx, load_suite, suite_kind
from corpus2model.tasks.validate.tables import pairs_frame, records_frame


@contextlib.contextmanager
def _quiet():
    """GE logs config chatter at INFO/WARNING; the stage reports through its own outputs."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def validate_table(data, suite_path: str | Path, docs_dir: Path | None = None,
                   max_failing_rows: int = 1000, *, raw: dict[str, list] | None = None,
                   severity_overrides: dict | None = None, boundary: str = "final",
                   upstream_rejected: dict | None = None, not_applicable: dict[str, str] | None = None) -> ValidationReport:
    """Validate records (pyarrow Table or DataFrame) or, for a ``table: preference_pairs`` suite,
    preference pairs against a suite file; write Data Docs to ``docs_dir`` (``index.html`` there)
    when given. ``raw`` holds row-aligned raw_* columns (raw_columns). ``not_applicable`` maps
    ``<expectation>:<column or table>`` to why that rule does not apply to this table: such entries are
    not run and the report lists them with the reason (``ValidationReport.not_applicable``). Pure:
    reads nothing else, writes only docs_dir."""
    gx = import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_path = Path(suite_path)
    entries = apply_severity(load_suite(suite_path), severity_overrides, boundary)
    skipped = {}
    if not_applicable:
        skipped = {f"{e.expectation}:{e.column or 'table'}": not_applicable[f"{e.expectation}:{e.column or 'table'}"]
                   for e in entries if f"{e.expectation}:{e.column or 'table'}" in not_applicable}
        entries = [e for e in entries if f"{e.expectation}:{e.column or 'table'}" not in skipped]
    kind = suite_kind(suite_path)
    df = pairs_frame(data) if kind == "preference_pairs" else records_frame(data)
    for name, values in (raw or {}).items():
        if len(values) != len(df):
            raise ValueError(f"raw column {name} has {len(values)} values for {len(df)} rows")
        df[name] = values
    for e in entries:
        for col in [e.kwargs.get("column"), *(e.kwargs.get("column_list") or [])]:
            if col is not None and col not in df.columns:
                raise StageError(
                    f"expectation suite {suite_path}, entry {e.index} ({e.expectation}): column {col!r} is not in "
                    f"the {kind} table; columns: {', '.join(df.columns)}"
                )

    with tempfile.TemporaryDirectory(prefix="c2m-gx-") as tmp, _quiet():
        # A throwaway file context: nothing of GE's state outlives the call or leaks between runs.
        context = gx.get_context(mode="file", project_root_dir=tmp)
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        suite = gx.ExpectationSuite(name=suite_path.stem, meta={"source_file": str(suite_path), "boundary": boundary})
        for e in entries:
            suite.add_expectation(gx_expectation(e, suite_path))
        suite = context.suites.add_or_update(suite)
        batch_def = (
            context.data_sources.add_or_update_pandas("records")
            .add_dataframe_asset("records")
            .add_batch_definition_whole_dataframe("all")
        )
        vdef = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name="records", data=batch_def, suite=suite)
        )
        actions = [UpdateDataDocsAction(name="data_docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name="validate",
                validation_definitions=[vdef],
                actions=actions,
                # COMPLETE gives every failing row index (we keep max_failing_rows of them); the
                # sample values shown in Data Docs stay at 20 per expectation.
                result_format={"result_format": "COMPLETE", "partial_unexpected_count": 20,
                               "return_unexpected_index_query": False, "include_unexpected_rows": False},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name="validate"))
        (vres,) = run.run_results.values()
        results = _collect(vres.results, entries, df, max_failing_rows)
        report = ValidationReport(
            suite=str(suite_path),
            suite_sha256=sha256_bytes(suite_path.read_bytes()),
            rows=len(df),
            results=results,
            boundary=boundary,
            kind=kind,
            profile=profile(df),
            upstream_rejected=dict(upstream_rejected or {}),
            not_applicable=skipped,
        )
        if docs_dir is not None:
            site = Path(tmp) / "gx" / "uncommitted" / "data_docs" / "local_site"
            report.docs_pages = publish_docs(site, Path(docs_dir), report)
            report.docs_index = Path(docs_dir) / "index.html"
    return report


def _collect(gx_results, entries: list[SuiteEntry], df, max_failing_rows: int) -> list[ExpectationResult]:
    by_index: dict[int, Any] = {}
    for r in gx_results:
        by_index[int((r.expectation_config.meta or {})["suite_index"])] = r
    ids = df["id"]
    out = []
    for e in entries:  # suite order, whatever order GE ran them in
        r = by_index[e.index]
        res = dict(r.result or {})
        # Row positions (the frame has a 0..n-1 index); multi-column expectations may report dicts.
        listed = [i for i in (res.get("unexpected_index_list") or []) if isinstance(i, numbers.Integral)]
        rows = [int(i) for i in listed[:max_failing_rows]]
        exc = None
        info = r.exception_info or {}
        if info.get("raised_exception"):
            exc = info.get("exception_message")
        elif isinstance(info, dict):
            # GE 1.x keys exception info by metric when several metrics fail.
            for v in info.values():
                if isinstance(v, dict) and v.get("raised_exception"):
                    exc = v.get("exception_message")
                    break
        out.append(
            ExpectationResult(
                index=e.index,
                expectation=e.expectation,
                column=e.column,
                severity=e.severity,
                suite_severity=e.suite_severity,
                success=bool(r.success),
                unexpected_count=int(res.get("unexpected_count") or 0),
                unexpected_percent=res.get("unexpected_percent"),
                why=e.why,
                kwargs=e.kwargs,
                observed_value=res.get("observed_value"),
                failing_rows=rows,
                failing_ids=[None if _isnull(ids.iat[i]) else str(ids.iat[i]) for i in rows],
                failing_where=_where(df, rows[:5]),
                exception=exc,
            )
        )
    return out


def _where(df, rows: list[int]) -> list[str]:
    if "metadata_source_path" not in df.columns or "metadata_source_line" not in df.columns:
        return []
    out = []
    for i in rows:
        path, line = df["metadata_source_path"].iat[i], df["metadata_source_line"].iat[i]
        if not _isnull(path):
            out.append(f"{path}:{int(line)}" if not _isnull(line) else str(path))
    return out


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)
