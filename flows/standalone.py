"""One data stage on a folder, without the DAG: ``c2m ingest|clean|dedup IN_DIR OUT_DIR``.

IN_DIR holds raw files (txt/html/JSONL/JSON, optionally .gz; ingested first) or record Parquet
parts (RECORD_SCHEMA, used as they are). The stage runs through the normal runner against a
store (``--store``, default ``OUT_DIR/.store``), so a second call on a grown folder reuses the
per-file, per-part and sketch caches exactly as the pipeline does. OUT_DIR then gets:

* ``parts/*.parquet`` the stage's records, ``quarantine/*.parquet`` its drops (with reasons),
* ``stats.json`` counters + stats of every stage run, ``manifest.json`` of the last stage,
A folder of JSONL files only is deduplicated without the ingest stage (``tasks.text.dedup_jsonl``: same
records, rejects and decisions, one pass per file, per-file caches in the same store).

* dedup only: ``removed.jsonl``, one ``{"id", "duplicate_of", "kind", "source_path", "record_id"}``
  per removed record. ``id``/``duplicate_of`` are the ids the input gave its records
  (``metadata.source_id``, e.g. the ``"id"`` of a JSONL line) when it gave one, else the record
  ids: the ids a person (or shared/bench/anchors/evaluate.py) knows the input by.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SUBCOMMANDS = ("ingest", "clean", "dedup")


def _store(out_dir: Path, store: str | Path | None):
    from corpus2model.tasks.stage import Store

    return Store(Path(store) if store else Path(out_dir) / ".store")


def _ctx(store):
    import logging

    from corpus2model.tasks.stage import StageContext

    return StageContext(store=store, log=logging.getLogger("corpus2model"))


def _parquet_manifest(in_dir: Path):
    """Record parts already on disk (RECORD_SCHEMA) as an upstream manifest, or None."""
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA
    from corpus2model.tasks.stage import FileEntry, Manifest, cache_key, sha256_file

    paths = sorted(p for p in in_dir.rglob("*.parquet") if ".store" not in p.parts and "quarantine" not in p.parts)
    if not paths:
        return None
    files = []
    for p in paths:
        pf = pq.ParquetFile(p)
        if not pf.schema_arrow.equals(RECORD_SCHEMA, check_metadata=False):
            from corpus2model.tasks.stage import StageError

            raise StageError(f"{p} is Parquet but not RECORD_SCHEMA (schemas/records.py): give raw files or record parts")
        files.append(FileEntry(p.relative_to(in_dir).as_posix(), bytes=p.stat().st_size, sha256=sha256_file(p),
                               role="data", records=pf.metadata.num_rows))
    key = cache_key("folder", "1", {}, [json.dumps([[f.path, f.sha256] for f in files])])
    return Manifest(stage="folder", stage_version="1", key=key, files=files, path=str(in_dir.resolve()))


def _records(in_dir: Path, cfg, store, runs: list):
    """The input as records: Parquet parts as they are, anything else through ingest."""
    in_dir = Path(in_dir)
    m = _parquet_manifest(in_dir)
    if m is not None:
        return m
    return _run(_mod("ingest"), [_source(in_dir, cfg, store)], cfg, store, runs)


def _source(in_dir: Path, cfg, store):
    from corpus2model.tasks.ingest import scan_raw

    return scan_raw(Path(in_dir), cfg.ingest.include, store)


def _mod(name: str):
    import importlib

    return importlib.import_module(f"corpus2model.tasks.{name}")


def _run(module, inputs, cfg, store, runs: list):
    from corpus2model.tasks.stage import run_stage

    m = run_stage(module, inputs, cfg, _ctx(store))
    runs.append(m)
    return m


def _publish(m, out_dir: Path, runs: list) -> None:
    """Link the stage's files into OUT_DIR (replacing an earlier result) and write stats.json."""
    from corpus2model.tasks.stage import link_or_copy

    out_dir = Path(out_dir)
    for sub in ("parts", "quarantine"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    for f in m.files:
        (out_dir / f.path).unlink(missing_ok=True)
        link_or_copy(m.dir / f.path, out_dir / f.path)
    shutil.copyfile(m.dir / "manifest.json", out_dir / "manifest.json")
    stats = {r.stage: {"key": r.key, "cache": r.stats.get("cache"), "seconds": r.seconds, "counters": r.counters,
                       "stats": {k: v for k, v in r.stats.items() if k != "computed_files"}} for r in runs}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False, default=str), encoding="utf-8")


def _stage_on_folder(stage: str, in_dir, out_dir, cfg, store):
    """Run one stage on ``in_dir`` (raw files are ingested first, except by ingest itself) and
    publish its output into ``out_dir``; returns (manifest, upstream manifest)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st, runs = _store(out_dir, store), []
    up = _source(Path(in_dir), cfg, st) if stage == "ingest" else _records(Path(in_dir), cfg, st, runs)
    m = _run(_mod(stage), [up], cfg, st, runs)
    _publish(m, out_dir, runs)
    return m, up


def ingest_folder(in_dir, out_dir, cfg, store=None):
    """Raw files in ``in_dir`` -> records in ``out_dir``; returns the ingest manifest."""
    return _stage_on_folder("ingest", in_dir, out_dir, cfg, store)[0]


def clean_folder(in_dir, out_dir, cfg, store=None):
    """Raw files or record parts in ``in_dir`` -> cleaned records in ``out_dir``."""
    return _stage_on_folder("clean", in_dir, out_dir, cfg, store)[0]


def dedup_folder(in_dir, out_dir, cfg, store=None):
    """Raw files or record parts in ``in_dir`` -> deduplicated records + removed.jsonl in ``out_dir``.

    A folder of JSONL files only (no record parts) takes the direct path (``tasks.text.dedup_jsonl``):
    records and sketches in one pass per file, no ingest Parquet in between (and without
    ``dedup.eval_files`` contamination checks, which need the stage: a folder with them set takes
    the stage path)."""
    in_dir = Path(in_dir)
    if not cfg.dedup.eval_files and _parquet_manifest(in_dir) is None:
        from corpus2model.tasks.text.dedup_jsonl import dedup_jsonl_folder, jsonl_only

        st = _store(out_dir, store)
        src = _source(in_dir, cfg, st)
        if jsonl_only(src):
            return dedup_jsonl_folder(src, Path(out_dir), cfg, st)
    m, up = _stage_on_folder("dedup", in_dir, out_dir, cfg, store)
    write_removed_jsonl(m, up, Path(out_dir) / "removed.jsonl")
    return m


def _id_stream(paths):
    import pyarrow.parquet as pq

    for p in paths:
        pf = pq.ParquetFile(p)
        for batch in pf.iter_batches(batch_size=8192, columns=["id", "metadata"]):
            for rid, md in zip(batch.column("id").to_pylist(), batch.column("metadata").to_pylist()):
                md = md or {}
                yield rid, (rid, md.get("source_path"), md.get("source_line"), md.get("source_id"))


def write_removed_jsonl(m, upstream, path: Path) -> int:
    """removed.parquet -> JSONL named by the ids the input gave its records.

    Record ids are content hashes (exact copies share one), so the input id of each removed
    record is recovered by walking the input and the kept output side by side: dedup writes both
    in input order and kept records unchanged, so an input record that is not the next kept one
    is the next removed one."""
    import pyarrow.parquet as pq

    removed = [r for p in m.files_with("removed") for r in pq.read_table(p).to_pylist()]
    kept = _id_stream(m.files_with("data"))
    nxt = next(kept, None)
    names: dict[str, str] = {}  # record id -> input id, for kept representatives
    own: list[str] = []  # input id of each removed row, in order
    wanted = {r["duplicate_of"] for r in removed}
    for rid, ident in _id_stream(upstream.files_with("data")):
        name = ident[3] if ident[3] is not None else rid
        if nxt is not None and nxt[1] == ident:
            if rid in wanted:
                names.setdefault(rid, name)
            nxt = next(kept, None)
        else:
            own.append(name)
    if len(own) != len(removed):
        from corpus2model.tasks.stage import StageError

        raise StageError(f"dedup output {m.path}: {len(removed)} removed rows but {len(own)} input records are not kept; "
                         f"the output does not match its input, rerun dedup")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r, name in zip(removed, own):
            row = {"id": name, "duplicate_of": names.get(r["duplicate_of"], r["duplicate_of"]), "kind": r["kind"],
                   "source_path": r["source_path"], "record_id": r["id"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(removed)


# ---------------------------------------------------------------------------------------------
# argparse wiring (flows/cli.py: ``from flows.standalone import add_subcommands; add_subcommands(sub)``)
# ---------------------------------------------------------------------------------------------
def _config(args):
    from corpus2model.schemas.config import ConfigError, apply_overrides, load_config, parse_config

    from corpus2model.flows.cli import _parse_set

    overrides = _parse_set(args.set)
    workers = args.workers or os.cpu_count() or 1
    for stage in SUBCOMMANDS:
        overrides.setdefault(f"{stage}.workers", workers)
    try:
        if args.config:
            return load_config(args.config, overrides)
        return parse_config(apply_overrides({}, overrides), source="--set")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_standalone(args) -> int:
    import sys

    from corpus2model.tasks.stage import StageError

    cfg = _config(args)
    fn = {"ingest": ingest_folder, "clean": clean_folder, "dedup": dedup_folder}[args.command]
    try:
        m = fn(args.in_dir, args.out_dir, cfg, store=args.store)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = m.counters
    print(f"{args.command}: in {c.get('in')} out {c.get('out')} rejected {sum(c.get('rejected', {}).values())} "
          f"duplicates {c.get('duplicates', 0)} ({m.stats.get('cache')}, {m.seconds:.1f} s) -> {args.out_dir}")
    return 0


def validate_path(path, out_dir, cfg, suite=None, store=None) -> dict:
    """An expectation suite on any records file or folder, without the DAG.

    PATH is a JSONL/JSON file (optionally .gz), a record Parquet file, or a folder (read like the
    other one-stage commands). Lines that cannot even be read as records (invalid JSON or UTF-8, wrong
    types, blank lines) are reported as unreadable with their reason; the rest is validated. OUT_DIR
    gets data_docs/ (Great Expectations, reads offline), report.md, report.json, failing_rows.parquet
    and unreadable.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA, quarantine_table, records_table
    from corpus2model.tasks.ingest import parse_file
    from corpus2model.tasks.stage import StageError, sha256_file
    from corpus2model.tasks.validate import (failing_rows_table, file_reader, raw_columns, resolve_suite_path, suite_boundary,
                                suite_kind, validate_pairs_path, validate_table)

    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_path = resolve_suite_path(suite or cfg.validate_.suite)
    if suite_kind(suite_path) == "preference_pairs":
        return validate_pairs_path(path, out_dir, suite_path, cfg.validate_)
    unreadable: list[pa.Table] = []
    if path.is_dir():
        st = _store(out_dir, store)
        up = _records(path, cfg, st, [])
        table = pa.concat_tables([pq.read_table(p) for p in up.files_with("data")])
        unreadable = [pq.read_table(p) for p in up.files_with("quarantine")]
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        if not table.schema.equals(RECORD_SCHEMA, check_metadata=False):
            raise StageError(f"{path}: not a record Parquet file (schemas/records.py RECORD_SCHEMA); validate its JSONL instead")
    elif path.is_file():
        records, rejects, _ = parse_file(path.read_bytes(), path.name, sha256_file(path), cfg.ingest)
        table = records_table(records)
        unreadable = [quarantine_table(rejects)] if rejects else []
    else:
        raise StageError(f"{path} does not exist: give a records file (JSONL, JSON, Parquet) or a folder")
    bad = pa.concat_tables(unreadable) if unreadable else quarantine_table([])
    # Raw JSON lines say what ingest cannot keep (missing metadata, id types, extra keys).
    raw = raw_columns(table, file_reader(path if path.is_dir() else path.parent))
    report = validate_table(table, suite_path, out_dir / "data_docs", cfg.validate_.max_failing_rows, raw=raw,
                            severity_overrides=cfg.validate_.severity_overrides,
                            boundary=suite_boundary(suite_path))
    pq.write_table(failing_rows_table(report, table), out_dir / "failing_rows.parquet")
    pq.write_table(bad, out_dir / "unreadable.parquet")
    reasons: dict[str, int] = {}
    for r in bad.column("reason").to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    summary = {"path": str(path), "suite": str(suite_path), "records": table.num_rows, "unreadable": bad.num_rows,
               "unreadable_reasons": reasons, "errors_failed": report.error_failed, "warns_failed": report.warn_failed,
               "docs_index": str(out_dir / "data_docs" / "index.html")}
    (out_dir / "report.md").write_text(report.to_markdown(), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps({**summary, "report": report.to_dict()}, indent=1, default=str), encoding="utf-8")
    return {**summary, "markdown": report.to_markdown()}


def cmd_validate(args) -> int:
    from corpus2model.tasks.stage import StageError

    cfg = _config(args)
    try:
        s = validate_path(args.path, args.out, cfg, suite=args.suite, store=args.store)
    except StageError as e:
        print(f"error: {e}")
        return 2
    print(s["markdown"])
    print(f"{s['records']} records validated against {s['suite']}: {s['errors_failed']} error and {s['warns_failed']} warn "
          f"expectations failed; {s['unreadable']} unreadable lines {s['unreadable_reasons'] or ''}")
    print(f"report: {s['docs_index']}")
    return 1 if s["errors_failed"] or s["unreadable"] else 0


def add_subcommands(subparsers) -> None:
    helps = {"ingest": "raw files in IN_DIR -> records in OUT_DIR",
             "clean": "raw files or record parts -> cleaned, quality-filtered records",
             "dedup": "raw files or record parts -> deduplicated records + removed.jsonl"}
    for name in SUBCOMMANDS:
        sp = subparsers.add_parser(name, help=helps[name])
        sp.add_argument("in_dir", type=Path)
        sp.add_argument("out_dir", type=Path)
        sp.add_argument("--config", type=Path, help="YAML config whose sections are used (default: schema defaults)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. dedup.method=minhash")
        sp.add_argument("--store", type=Path, help="cache store (default OUT_DIR/.store); reuse it for incremental runs")
        sp.add_argument("--workers", type=int, default=0, help="processes per stage (default: all cores)")
        sp.set_defaults(fn=cmd_standalone)
    sp = subparsers.add_parser("validate", help="run an expectation suite on a records file or folder (exit 1 on errors)")
    sp.add_argument("path", type=Path)
    sp.add_argument("--out", type=Path, default=Path("validation-report"), help="report folder (default ./validation-report)")
    sp.add_argument("--suite", type=Path, default=None,
                    help="suite YAML, or a name in schemas/suites: raw_documents, cleaned_records, augmented_records, "
                         "training_records, preference_pairs (default: validate.suite of the config)")
    sp.add_argument("--config", type=Path, help="YAML config whose sections are used (default: schema defaults)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--store", type=Path, help="cache store for folder input (default OUT/.store)")
    sp.add_argument("--workers", type=int, default=0)
    sp.set_defaults(fn=cmd_validate)


def main(argv=None) -> int:
    """``python -m flows.standalone dedup IN OUT`` works before cli.py has the hook."""
    import argparse

    p = argparse.ArgumentParser(prog="c2m-standalone")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
