"""validate: check training records against an expectation suite (Great Expectations 1.x).

One implementation (``run_boundary``) serves four DAG nodes, one per boundary: the final ``validate``
node (this module's STAGE/VERSION/SECTIONS/run/key_extra, before shard) and the report-only
check_raw / check_clean / check_augment nodes (declared in ``boundary.py``). Each is cached on its
upstream keys, its config section and its suite file's bytes.

The suite is data (``schemas/suites/training_records.yaml``): each entry names a GE expectation,
its kwargs, a severity and a one-line reason. ``error`` failures stop the flow before any
downstream stage runs (``ValidationFailed``, with the report copied to
``<store>/reports/validate-failed-<hash>/`` because the stage's own folder is discarded on error);
``warn`` failures are recorded and the run continues. Validation never drops records: the data
parts pass through as hard links, and failing rows are *copied* to ``failing_rows.parquet``
(quarantine schema, one row per failing record and expectation) so a person can look at them.

Outputs in the stage folder::

    parts/<upstream part name>.parquet   role data        final node only: the upstream parts, hard-linked, unchanged
    failing_rows.parquet                 role quarantine  reason "expectation:<type>:<column>", detail = severity
    report.json / report.md              role report      per-expectation results with severities
    data_docs/index.html, ...            role report      GE Data Docs, post-processed to read offline (docs.py)
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.schemas.records import QUARANTINE_SCHEMA, RECORD_SCHEMA, quarantine_row
from corpus2model.tasks.common.artifacts import publish_link, publish_markdown
from corpus2model.tasks.stage import (
    FileEntry,
    Manifest,
    StageContext,
    StageError,
    canonical_json,
    link_or_copy,
    sha256_bytes,
)
from corpus2model.tasks.validate.report import BOUNDARY_TITLES, ValidationFailed, ValidationReport, failure_message
from corpus2model.tasks.validate.runner import validate_table
from corpus2model.tasks.validate.suite import resolve_suite_path
from corpus2model.tasks.validate.tables import file_reader, raw_columns

# The cache key is (STAGE, VERSION, SECTIONS' config, key_extra, upstream keys): these values are
# what every existing store entry was keyed with. Moving this code between modules does not change
# what it computes; bump VERSION only when the outputs would change.
STAGE = "validate"
VERSION = "2"
SECTIONS = ("validate",)

# The boundaries: node name, suite config field, upstream stages (the last one holds the records).
# The final one reads the `validate` section, the check_* nodes the `checks` section.
BOUNDARIES = {
    "raw": ("check_raw", "raw_suite", ("source", "ingest")),
    "clean": ("check_clean", "clean_suite", ("dedup",)),
    "augment": ("check_augment", "augment_suite", ("augment",)),
    "final": ("validate", "suite", ("augment",)),
}
CHECK_SECTIONS = ("checks",)


def key_extra(cfg) -> dict:
    """The suite's bytes are part of the cache key: editing the suite reruns validation."""
    path = resolve_suite_path(cfg.validate.suite)
    return {"suite_sha256": sha256_bytes(path.read_bytes())}


def suite_for(vcfg, boundary: str) -> Path:
    """The suite file a boundary's config section names (validate.suite, checks.<boundary>_suite)."""
    return resolve_suite_path(getattr(vcfg, BOUNDARIES[boundary][1]))


def failing_rows_table(report: ValidationReport, table: pa.Table, stage: str = STAGE) -> pa.Table:
    """One quarantine row per (failing record, expectation), in suite order; the records are copies."""
    rows = []
    for r in report.results:
        if not r.failing_rows:
            continue
        for rec in table.take(pa.array(r.failing_rows, type=pa.int64())).to_pylist():
            rows.append(quarantine_row(stage, r.reason, detail=r.severity, record=rec))
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _read_records(up: Manifest, stage: str) -> tuple[pa.Table, list[tuple[Path, str, int]]]:
    paths = up.files_with("data")
    names = [p.name for p in paths]
    unique = len(set(names)) == len(names)
    tables, parts = [], []
    for i, p in enumerate(paths):
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{stage}: cannot read upstream part {p} ({e}); rerun the {up.stage} stage") from None
        missing = set(RECORD_SCHEMA.names) - set(t.column_names)
        if missing:
            raise StageError(f"{stage}: upstream part {p} lacks record columns {sorted(missing)}")
        t = t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
        tables.append(t)
        parts.append((p, f"parts/{p.name if unique else f'{i:06d}-{p.name}'}", t.num_rows))
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    return table, parts


def run_boundary(boundary: str, inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """Validate one boundary. ``final`` passes the records through (shard reads them); the check_*
    nodes write reports only. Error-severity failures raise ValidationFailed, report kept."""
    stage, _, ups = BOUNDARIES[boundary]
    if len(inputs) != len(ups):
        raise StageError(f"{stage} takes upstream manifests {list(ups)}, got {[u.stage for u in inputs]}")
    vcfg = cfg.validate if boundary == "final" else cfg.checks
    suite_path = suite_for(vcfg, boundary)
    table, parts = _read_records(inputs[-1], stage)
    raw = raw_columns(table, file_reader(Path(inputs[0].path))) if boundary == "raw" else None
    docs_dir = out_dir / "data_docs"
    try:
        report = validate_table(table, suite_path, docs_dir, max_failing_rows=vcfg.max_failing_rows, raw=raw,
                                severity_overrides=vcfg.severity_overrides, boundary=boundary,
                                upstream_rejected=(inputs[-1].counters.get("rejected") or {}) if boundary == "raw" else None)
    except ValueError as e:
        raise StageError(f"{stage}: {e}") from None

    files: list[FileEntry] = []
    n = table.num_rows
    if boundary == "final":
        for src, rel, k in parts:
            link_or_copy(src, out_dir / rel)
            files.append(FileEntry(rel, role="data", records=k))
    # The rows that failed, copies with the expectation that failed (validation never drops a record).
    failing = failing_rows_table(report, table, stage)
    pq.write_table(failing, out_dir / "failing_rows.parquet")
    files.append(FileEntry("failing_rows.parquet", role="quarantine", records=failing.num_rows))
    upstream_rejected = {}
    if boundary == "raw":
        upstream_rejected = dict(inputs[-1].counters.get("rejected") or {})
    summary = report.to_dict()
    summary.update(docs_index="data_docs/index.html", boundary=boundary, upstream_rejected=upstream_rejected)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    markdown = report.to_markdown()
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    files += [FileEntry("report.json", role="report"), FileEntry("report.md", role="report")]
    files += [FileEntry(p.relative_to(out_dir).as_posix(), role="report")
              for p in sorted(docs_dir.rglob("*")) if p.is_file()]

    if not report.success:
        folder = _keep_failed_report(out_dir, inputs, report, ctx, stage)
        publish_markdown(f"{stage}-summary", markdown, description=f"{BOUNDARY_TITLES[boundary]}: validation FAILED")
        publish_link(f"{stage}-data-docs", "file://" + str(folder / "data_docs" / "index.html"),
                     text=f"Data Docs: {BOUNDARY_TITLES[boundary]} (failed)")
        raise ValidationFailed(failure_message(report, suite_path, stage, folder), report=report, folder=folder)

    final = ctx.final_dir or out_dir  # links in artifacts must name the folder that outlives this run
    publish_markdown(f"{stage}-summary", markdown,
                     description=f"{report.warn_failed} warn-severity expectation(s) failed" if report.warn_failed else "")
    publish_link(f"{stage}-data-docs", "file://" + str(final / "data_docs" / "index.html"),
                 text=f"Data Docs: {BOUNDARY_TITLES[boundary]}")
    ctx.info("%s: %d rows, %d expectations, %d warnings failed", stage, report.rows, len(report.results), report.warn_failed)
    return Manifest(
        stage=stage,
        files=files,
        counters={"in": n, "out": n, "rejected": {}, "duplicates": 0},
        stats={
            "boundary": boundary,
            "rows": n,
            "expectations": len(report.results),
            "errors_failed": report.error_failed,
            "warns_failed": report.warn_failed,
            "failed": [r.reason for r in report.results if not r.success],
            "failing_rows": failing.num_rows,
            "suite": str(suite_path),
            "suite_sha256": report.suite_sha256,
            "profile": report.profile,
            # Relative: out_dir is renamed into the store after run returns.
            "docs_index": "data_docs/index.html",
        },
    )


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """The final boundary (training records, before shard): records pass through as hard links."""
    return run_boundary("final", inputs, cfg, out_dir, ctx)


def _keep_failed_report(out_dir: Path, inputs: list[Manifest], report: ValidationReport, ctx: StageContext,
                        stage: str = STAGE) -> Path:
    """out_dir is deleted when the stage raises: copy the evidence where a person can open it."""
    digest = hashlib.sha256(
        canonical_json({"upstream": [f"{u.stage}:{u.key}" for u in inputs], "suite": report.suite_sha256}).encode()
    ).hexdigest()[:12]
    folder = ctx.store.root / "reports" / f"{stage}-failed-{digest}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("report.json", "report.md", "failing_rows.parquet"):
        shutil.copy2(out_dir / name, folder / name)
    shutil.copytree(out_dir / "data_docs", folder / "data_docs")
    return folder


_BOUNDARY_MODULES: dict[str, types.ModuleType] = {}
