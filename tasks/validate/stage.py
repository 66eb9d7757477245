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

Preference records (upstream role "pairs") are validated at the final node and at check_clean /
check_augment too (PAIRS_BOUNDARIES; not at raw, before clean), with the ``preference_pairs`` suite
(schemas/suites/preference_pairs.yaml; ``validate.severity_overrides`` keys prefixed ``pairs:`` tune it
at the final node, ``checks.severity_overrides`` ones at the check nodes): the same rules, error failures
stop the flow, failing rows are copied to ``pairs_failing_rows.parquet``, and at the final node the pair
parts pass through to shard. The pairs suite runs only where there are pairs. A corpus of pairs only
has no training records: the records suite's row-count rules (ROW_COUNT_EXPECTATIONS) are then not run,
and the report lists them under ``not_applicable``; with no records and no pairs they stop the flow.

Outputs in the stage folder::

    parts/<upstream part name>.parquet   role data        final node only: the upstream parts, hard-linked, unchanged
    pairs/<upstream part name>.parquet   role pairs       final node only, when there are preference records (likewise)
    pairs_failing_rows.parquet, pairs_report.json|md, pairs_data_docs/   the same for the pairs (clean, augment, final)
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

from corpus2model.schemas.records import PAIR_SCHEMA, QUARANTINE_SCHEMA, RECORD_SCHEMA, quarantine_row
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
# The suite preference records are checked with at the final node (where training records meet validate.suite).
PAIRS_SUITE = "preference_pairs"
# The boundaries that run it on the upstream's pairs: not raw, where ingest's pairs are not cleaned yet
# (the suite's debris rules would stop on what clean removes), as raw_documents.yaml is not training_records.yaml.
PAIRS_BOUNDARIES = ("clean", "augment", "final")
# Table-level rules about how many training records there are. A pairs-only corpus (DPO, reward model)
# has none at every boundary by design, so where there are preference pairs and no records they are not
# run (the report says so); with neither, they run and stop the flow as before.
ROW_COUNT_EXPECTATIONS = ("expect_table_row_count_to_be_between", "expect_table_row_count_to_equal")


def pairs_key_extra() -> dict:
    """The preference_pairs suite's bytes, for the key of every node that runs it (PAIRS_BOUNDARIES)."""
    return {"pairs_suite_sha256": sha256_bytes(resolve_suite_path(PAIRS_SUITE).read_bytes())}


def key_extra(cfg) -> dict:
    """The suites' bytes are part of the cache key: editing a suite reruns validation."""
    path = resolve_suite_path(cfg.validate.suite)
    return {"suite_sha256": sha256_bytes(path.read_bytes()), **pairs_key_extra()}


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


def _read_parts(up: Manifest, stage: str, role: str, folder: str, schema: pa.Schema, conform) -> tuple[pa.Table, list]:
    """The upstream's parts of ``role`` as one ``schema`` table (each read table passed through
    ``conform(table, path)``, which checks and shapes it), and where each part is linked to
    (``<folder>/<name>``, prefixed by its position where two parts share a name)."""
    paths = up.files_with(role)
    unique = len({p.name for p in paths}) == len(paths)
    what = "part" if role == "data" else f"{role} part"
    tables, parts = [], []
    for i, p in enumerate(paths):
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{stage}: cannot read upstream {what} {p} ({e}); rerun the {up.stage} stage") from None
        t = conform(t, p)
        tables.append(t)
        parts.append((p, f"{folder}/{p.name if unique else f'{i:06d}-{p.name}'}", t.num_rows))
    return (pa.concat_tables(tables) if tables else schema.empty_table()), parts


def _read_records(up: Manifest, stage: str) -> tuple[pa.Table, list[tuple[Path, str, int]]]:
    def conform(t: pa.Table, p: Path) -> pa.Table:
        missing = set(RECORD_SCHEMA.names) - set(t.column_names)
        if missing:
            raise StageError(f"{stage}: upstream part {p} lacks record columns {sorted(missing)}")
        return t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)

    return _read_parts(up, stage, "data", "parts", RECORD_SCHEMA, conform)


def _read_pairs(up: Manifest, stage: str) -> tuple[pa.Table, list[tuple[Path, str, int]]]:
    """The upstream's preference-record parts (role "pairs") as one PAIR_SCHEMA table, and where each
    part is linked to (``pairs/<name>``)."""
    def conform(t: pa.Table, p: Path) -> pa.Table:
        if not t.schema.equals(PAIR_SCHEMA, check_metadata=False):
            raise StageError(f"{stage}: upstream part {p} does not hold preference records (schemas.records.PAIR_SCHEMA); "
                             f"rerun the {up.stage} stage")
        return t

    return _read_parts(up, stage, "pairs", "pairs", PAIR_SCHEMA, conform)


def _count_pairs(up: Manifest, stage: str) -> int:
    """How many preference records the upstream holds, from the Parquet footers (nothing else is read)."""
    n = 0
    for p in up.files_with("pairs"):
        try:
            n += pq.ParquetFile(p).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{stage}: cannot read upstream pairs part {p} ({e}); rerun the {up.stage} stage") from None
    return n


def _validate_pairs(table: pa.Table, vcfg, out_dir: Path, stage: str) -> tuple[ValidationReport, list[FileEntry], pa.Table]:
    """The preference_pairs suite on the pairs: pairs_data_docs/, pairs_report.json|md and
    pairs_failing_rows.parquet (copies, as for records)."""
    suite_path = resolve_suite_path(PAIRS_SUITE)
    docs_dir = out_dir / "pairs_data_docs"
    try:
        report = validate_table(table, suite_path, docs_dir, max_failing_rows=vcfg.max_failing_rows,
                                severity_overrides=vcfg.severity_overrides, boundary="pairs")
    except ValueError as e:
        raise StageError(f"{stage}: {e}") from None
    failing = failing_rows_table(report, table, stage)
    pq.write_table(failing, out_dir / "pairs_failing_rows.parquet")
    summary = {**report.to_dict(), "docs_index": "pairs_data_docs/index.html", "boundary": "pairs"}
    (out_dir / "pairs_report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    (out_dir / "pairs_report.md").write_text(report.to_markdown(), encoding="utf-8")
    files = [FileEntry("pairs_failing_rows.parquet", role="quarantine", records=failing.num_rows),
             FileEntry("pairs_report.json", role="report"), FileEntry("pairs_report.md", role="report")]
    files += [FileEntry(p.relative_to(out_dir).as_posix(), role="report") for p in sorted(docs_dir.rglob("*")) if p.is_file()]
    return report, files, failing


def run_boundary(boundary: str, inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """Validate one boundary. ``final`` passes the records through (shard reads them); the check_*
    nodes write reports only. Error-severity failures raise ValidationFailed, report kept."""
    stage, _, ups = BOUNDARIES[boundary]
    if len(inputs) != len(ups):
        raise StageError(f"{stage} takes upstream manifests {list(ups)}, got {[u.stage for u in inputs]}")
    vcfg = cfg.validate if boundary == "final" else cfg.checks
    suite_path = suite_for(vcfg, boundary)
    table, parts = _read_records(inputs[-1], stage)
    n = table.num_rows
    # The pairs are read where they are validated or passed on; at raw only their count matters.
    if boundary in PAIRS_BOUNDARIES:
        pairs, pair_parts = _read_pairs(inputs[-1], stage)
        n_upstream_pairs = pairs.num_rows
    else:
        pairs, pair_parts = None, []
        n_upstream_pairs = _count_pairs(inputs[-1], stage)
    not_applicable = None
    if n == 0 and n_upstream_pairs:
        where = "here" if boundary in PAIRS_BOUNDARIES else "from check_clean on"
        not_applicable = {f"{e}:table": f"no training records: this corpus holds only preference pairs "
                                        f"({n_upstream_pairs}), which the preference_pairs suite checks {where}"
                          for e in ROW_COUNT_EXPECTATIONS}
    raw = raw_columns(table, file_reader(Path(inputs[0].path))) if boundary == "raw" else None
    docs_dir = out_dir / "data_docs"
    try:
        report = validate_table(table, suite_path, docs_dir, max_failing_rows=vcfg.max_failing_rows, raw=raw,
                                severity_overrides=vcfg.severity_overrides, boundary=boundary,
                                upstream_rejected=(inputs[-1].counters.get("rejected") or {}) if boundary == "raw" else None,
                                not_applicable=not_applicable)
    except ValueError as e:
        raise StageError(f"{stage}: {e}") from None

    files: list[FileEntry] = []
    pairs_report, n_pairs, pairs_stats = None, 0, {}
    if boundary == "final":
        for src, rel, k in parts:
            link_or_copy(src, out_dir / rel)
            files.append(FileEntry(rel, role="data", records=k))
        for src, rel, k in pair_parts:  # empty ones too: shard reads what its upstream lists
            link_or_copy(src, out_dir / rel)
            files.append(FileEntry(rel, role="pairs", records=k))
    # The suite asks for at least one pair ("DPO on no pairs must not start"): run it only where there are
    # pairs, so a records corpus whose pair parts came out empty (clean removed them all) is not stopped.
    if n_upstream_pairs and pairs is not None:
        pairs_report, pair_files, pair_failing = _validate_pairs(pairs, vcfg, out_dir, stage)
        files += pair_files
        n_pairs = pairs.num_rows
        pairs_stats = {"rows": n_pairs, "expectations": len(pairs_report.results),
                       "errors_failed": pairs_report.error_failed, "warns_failed": pairs_report.warn_failed,
                       "failed": [r.reason for r in pairs_report.results if not r.success],
                       "failing_rows": pair_failing.num_rows, "suite": str(resolve_suite_path(PAIRS_SUITE)),
                       "suite_sha256": pairs_report.suite_sha256, "docs_index": "pairs_data_docs/index.html"}
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

    if pairs_report is not None and not pairs_report.success:
        folder = _keep_failed_report(out_dir, inputs, pairs_report, ctx, stage)
        publish_markdown(f"{stage}-pairs-summary", pairs_report.to_markdown(),
                         description="preference pairs: validation FAILED")
        raise ValidationFailed(failure_message(pairs_report, resolve_suite_path(PAIRS_SUITE), stage, folder).replace(
            "data_docs/index.html, report.md, failing_rows.parquet",
            "pairs_data_docs/index.html, pairs_report.md, pairs_failing_rows.parquet"), report=pairs_report, folder=folder)
    if not report.success:
        folder = _keep_failed_report(out_dir, inputs, report, ctx, stage)
        publish_markdown(f"{stage}-summary", markdown, description=f"{BOUNDARY_TITLES[boundary]}: validation FAILED")
        publish_link(f"{stage}-data-docs", "file://" + str(folder / "data_docs" / "index.html"),
                     text=f"Data Docs: {BOUNDARY_TITLES[boundary]} (failed)")
        message = failure_message(report, suite_path, stage, folder)
        if n == 0 and not n_upstream_pairs:
            message += (f" Nothing reached this boundary: the {inputs[-1].stage} output holds no training records and "
                        f"no preference pairs; look at the upstream stages' rejected counts and quarantine files.")
        raise ValidationFailed(message, report=report, folder=folder)

    final = ctx.final_dir or out_dir  # links in artifacts must name the folder that outlives this run
    publish_markdown(f"{stage}-summary", markdown,
                     description=f"{report.warn_failed} warn-severity expectation(s) failed" if report.warn_failed else "")
    publish_link(f"{stage}-data-docs", "file://" + str(final / "data_docs" / "index.html"),
                 text=f"Data Docs: {BOUNDARY_TITLES[boundary]}")
    ctx.info("%s: %d rows, %d expectations, %d warnings failed", stage, report.rows, len(report.results), report.warn_failed)
    if pairs_report is not None:
        publish_markdown(f"{stage}-pairs-summary", pairs_report.to_markdown(),
                         description=f"preference pairs: {pairs_report.warn_failed} warn-severity expectation(s) failed"
                         if pairs_report.warn_failed else "preference pairs")
        ctx.info("%s: %d preference pairs, %d warnings failed", stage, n_pairs, pairs_report.warn_failed)
    return Manifest(
        stage=stage,
        files=files,
        counters={"in": n + n_pairs, "out": n + n_pairs, "rejected": {}, "duplicates": 0},
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
            **({"pairs": pairs_stats} if pairs_stats else {}),
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
    for name in ("report.json", "report.md", "failing_rows.parquet", "pairs_report.json", "pairs_report.md",
                 "pairs_failing_rows.parquet"):
        if (out_dir / name).is_file():  # the pairs' files exist when the upstream has preference records
            shutil.copy2(out_dir / name, folder / name)
    for name in ("data_docs", "pairs_data_docs"):
        if (out_dir / name).is_dir():
            shutil.copytree(out_dir / name, folder / name)
    return folder


_BOUNDARY_MODULES: dict[str, types.ModuleType] = {}
