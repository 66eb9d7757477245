"""One data stage on a folder, without the DAG: ``c2m ingest|clean|dedup IN_DIR OUT_DIR``.

IN_DIR is one of three kinds, decided before anything runs and never mixed:

* a previous output of these commands (or a store stage folder), recognised by its ``manifest.json``:
  its record parts are the input, verified against the manifest (sizes, sha256);
* a folder of record Parquet parts only (RECORD_SCHEMA, used as they are);
* a folder of raw files (txt/html/JSONL/JSON, optionally .gz), ingested first. Files that match no
  ``ingest.include`` pattern are listed as skipped; a folder holding both Parquet and raw files, or
  an earlier output (a ``manifest.json`` of ours, a ``.store``), is refused: the tool never reads its
  own outputs as input.

The stage runs through the normal runner against a store (``--store``, default ``OUT_DIR/.store``),
so a second call on a grown folder reuses the per-file, per-part and sketch caches exactly as the
pipeline does. OUT_DIR then gets:

* ``parts/*.parquet`` the stage's records, ``quarantine/*.parquet`` its drops (with reasons), and
  ``quarantine/<stage>/*.parquet`` the drops of a stage run before it in the same call (ingest),
* ``stats.json`` counters + stats of every stage run, ``manifest.json`` (sizes + sha256 of every
  file, ``stats.standalone`` names the command, the input kind and each stage's counters),
* dedup only: ``removed.jsonl``, one ``{"id", "duplicate_of", "kind", "source_path", "record_id"}``
  per removed record. ``id``/``duplicate_of`` are the ids the input gave its records
  (``metadata.source_id``, e.g. the ``"id"`` of a JSONL line) when it gave one, else the record
  ids: the ids a person (or shared/bench/anchors/evaluate.py) knows the input by.

A folder of JSONL files only is deduplicated without the ingest stage (``tasks.text.dedup_jsonl``: same
records, rejects and decisions, one pass per file, per-file caches in the same store).

OUT_DIR is written like a stage output: everything is built in a temporary folder inside OUT_DIR and
moved into place at the end, ``manifest.json`` last; while the old output is being replaced a
``.c2m-incomplete`` marker says so, so an interrupted run never leaves an old manifest beside new
parts. A non-empty OUT_DIR that is not an earlier output of the same command is refused unless
``--overwrite`` (which replaces only the names above); OUT_DIR and IN_DIR may not contain each other.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from corpus2model.tasks.common.parquet import open_parquet
from corpus2model.tasks.stage import StageError

SUBCOMMANDS = ("ingest", "clean", "dedup")
# What a standalone command writes into OUT_DIR; --overwrite replaces these names and nothing else.
OUTPUTS = ("parts", "quarantine", "removed.jsonl", "stats.json", "manifest.json")
INCOMPLETE = ".c2m-incomplete"  # present while an output is being swapped in: the folder is not finished
TMP_PREFIX = ".c2m-tmp-"  # staging folders inside OUT_DIR (same filesystem: the final moves are renames)


def _store(out_dir: Path, store: str | Path | None):
    from corpus2model.tasks.stage import Store

    return Store(Path(store) if store else Path(out_dir) / ".store")


def _ctx(store):
    import logging

    from corpus2model.tasks.stage import StageContext

    return StageContext(store=store, log=logging.getLogger("corpus2model"))


# ---------------------------------------------------------------------------------------------
# where the command may read and write
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def output_command(folder: Path) -> str | None:
    """The command whose output ``folder`` is (finished or interrupted while being replaced), or None."""
    folder = Path(folder)
    marker = _read_json(folder / INCOMPLETE)
    if isinstance(marker, dict) and isinstance(marker.get("command"), str):
        return marker["command"]
    m = _read_json(folder / "manifest.json")
    if isinstance(m, dict) and isinstance(m.get("stats"), dict) and isinstance(m["stats"].get("standalone"), dict):
        return m["stats"]["standalone"].get("command")
    return None


def _is_stage_output(folder: Path) -> bool:
    """A manifest of ours (standalone output or store stage folder), not a raw file named manifest.json."""
    m = _read_json(Path(folder) / "manifest.json")
    return isinstance(m, dict) and isinstance(m.get("stage"), str) and isinstance(m.get("files"), list)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_dirs(command: str, in_dir, out_dir, store=None, overwrite: bool = False, in_label: str = "IN_DIR",
               out_label: str = "OUT_DIR") -> tuple[Path, Path]:
    """Refuse what would read our own output as input or delete what the user keeps in OUT_DIR."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if command != "validate":
        if in_dir.is_file():
            raise StageError(f"{in_label} {in_dir} is a file: give the folder that holds it (c2m {command} FOLDER OUT_DIR)")
        if not in_dir.is_dir():
            raise StageError(f"{in_label} {in_dir} does not exist: give a folder of input files")
    if out_dir.exists() and not out_dir.is_dir():
        raise StageError(f"{out_label} {out_dir} is a file: give a folder (it is created if missing)")
    ri, ro = in_dir.resolve(), out_dir.resolve()
    if in_dir.is_dir():
        if _inside(ro, ri):
            raise StageError(f"{out_label} {out_dir} is {'IN_DIR itself' if ro == ri else f'inside {in_label} {in_dir}'}: "
                             f"its outputs would be read as input next time; choose a folder outside {in_dir}")
        if _inside(ri, ro):
            raise StageError(f"{in_label} {in_dir} is inside {out_label} {out_dir}: writing the output would replace the input; "
                             f"choose a folder that does not contain {in_dir}")
        if store and _inside(Path(store).resolve(), ri):
            raise StageError(f"--store {store} is inside {in_label} {in_dir}: the cache would be read as input; put it elsewhere")
    if store and Path(store).exists() and not Path(store).is_dir():
        raise StageError(f"--store {store} is a file: give a folder for the cache (created if missing)")
    if out_dir.is_dir() and not overwrite:
        owner = output_command(out_dir) if command != "validate" else ("validate" if (out_dir / "report.json").is_file() else None)
        if owner != command:
            theirs = sorted(p.name for p in out_dir.iterdir() if p.name != ".store" and not p.name.startswith(TMP_PREFIX))
            if theirs:
                what = f"the output of c2m {owner}" if owner else f"files c2m did not write ({', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''})"
                raise StageError(f"{out_label} {out_dir} is not empty: it holds {what}; give an empty or new folder, "
                                 f"or add --overwrite to replace its {', '.join(OUTPUTS if command != 'validate' else ('report.*', 'data_docs', '*.parquet'))}")
    return in_dir, out_dir


def _sweep_staging(out_dir: Path) -> None:
    """Staging folders of killed runs (their pid is gone) are removed; a live run's are left alone."""
    from corpus2model.tasks.stage import _alive

    for p in out_dir.glob(f"{TMP_PREFIX}*"):
        pid = p.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _swap_in(stage_dir: Path, out_dir: Path, command: str) -> None:
    """Replace OUT_DIR's outputs with ``stage_dir``'s. The marker goes first and the manifest last, so
    an interruption leaves a folder without a manifest (or with the marker), which nothing reads as
    finished, and which a rerun of the same command may replace."""
    from corpus2model.tasks.stage import write_json_atomic

    new = sorted(p.name for p in stage_dir.iterdir() if p.name != "manifest.json")
    old = _read_json(out_dir / "manifest.json") if _is_stage_output(out_dir) else None
    listed = {f["path"].split("/")[0] for f in old["files"] if isinstance(f, dict) and "path" in f} if old else set()
    write_json_atomic(out_dir / INCOMPLETE, {"command": command, "pid": os.getpid()})
    trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-old-", dir=out_dir))
    try:
        # the old output (its manifest first): our fixed names, what its manifest lists, what we replace
        for name in ["manifest.json", *OUTPUTS, *sorted(listed), *new]:
            if name not in ("", ".", "..", INCOMPLETE) and "/" not in name and os.path.lexists(out_dir / name) \
                    and not os.path.lexists(trash / name):
                os.rename(out_dir / name, trash / name)
        for name in new:
            os.rename(stage_dir / name, out_dir / name)
        os.rename(stage_dir / "manifest.json", out_dir / "manifest.json")
        (out_dir / INCOMPLETE).unlink()
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _publish(command: str, out_dir: Path, build) -> "object":
    """``build(stage_dir) -> Manifest`` writes the output into a staging folder inside OUT_DIR (files
    listed relative to it); the manifest gets sizes and sha256 of every file, then everything is
    swapped into OUT_DIR. Returns the manifest, its path now OUT_DIR."""
    from corpus2model.tasks.stage import _finalize_files

    out_dir.mkdir(parents=True, exist_ok=True)
    _sweep_staging(out_dir)
    stage_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        m = build(stage_dir)
        # Entries the stage already hashed keep their sha256 (hard links to the same bytes).
        _finalize_files(stage_dir, m.files)
        (stage_dir / "manifest.json").write_text(json.dumps(m.to_dict(), indent=1, ensure_ascii=False, default=str),
                                                 encoding="utf-8")
        _swap_in(stage_dir, out_dir, command)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    m.path = str(out_dir.resolve())
    return m


# ---------------------------------------------------------------------------------------------
# what the input is
# ---------------------------------------------------------------------------------------------
def _data_manifest(files, in_dir: Path, stage: str = "folder"):
    """Record parts (FileEntry, role data, relative to ``in_dir``) as an upstream manifest whose key
    is their content only."""
    from corpus2model.tasks.stage import Manifest, cache_key

    key = cache_key("folder", "1", {}, [json.dumps([[f.path, f.sha256] for f in files])])
    return Manifest(stage=stage, stage_version="1", key=key, files=list(files), path=str(in_dir.resolve()),
                    counters={"out": sum(f.records or 0 for f in files)})


def _check_record_parquet(path: Path, fix: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA

    try:
        pf = open_parquet(path)
    except (OSError, pa.ArrowException) as e:
        raise StageError(f"{path}: not a readable Parquet file ({e}); {fix}") from None
    if not pf.schema_arrow.equals(RECORD_SCHEMA, check_metadata=False):
        raise StageError(f"{path} is Parquet but not RECORD_SCHEMA (schemas/records.py); {fix}")
    return pf.metadata.num_rows


def _previous_output(in_dir: Path):
    """IN_DIR's manifest, verified, as the upstream manifest of its record parts."""
    from corpus2model.tasks.stage import Manifest, verify

    who = output_command(in_dir)
    name = f"the output of c2m {who}" if who else "a stage output"
    if (in_dir / INCOMPLETE).exists():
        raise StageError(f"IN_DIR {in_dir} is {name} that was interrupted while being written; rerun that command first")
    ok, why = verify(in_dir)
    if not ok:
        raise StageError(f"IN_DIR {in_dir} is {name} but does not match its manifest.json ({why}); rerun the command that wrote it")
    m = Manifest.load(in_dir)
    data = m.entries("data")
    for f in data:
        _check_record_parquet(in_dir / f.path, "give raw files or record parts")
    return _data_manifest(data, in_dir, stage=m.stage)


def _parquet_manifest(in_dir: Path, paths: list[Path]):
    from corpus2model.tasks.stage import FileEntry, sha256_file

    files = []
    for p in paths:
        n = _check_record_parquet(p, "give raw files or record parts, one kind per folder")
        files.append(FileEntry(p.relative_to(in_dir).as_posix(), bytes=p.stat().st_size, sha256=sha256_file(p),
                               role="data", records=n))
    return _data_manifest(files, in_dir)


def input_kind(in_dir: Path, include: list[str]) -> tuple[str, list[Path], list[Path]]:
    """("output" | "parts" | "raw", Parquet files, files no ingest.include pattern matches).

    Raw folders may not hold an earlier output of ours (a manifest.json of a stage, a .store) nor
    Parquet beside raw files: either would be silently mixed into (or left out of) the input."""
    from corpus2model.tasks.ingest import _included

    in_dir = Path(in_dir)
    if _is_stage_output(in_dir):
        return "output", [], []
    parquet, raw, skipped = [], [], []
    for p in sorted(in_dir.rglob("*")):
        rel = p.relative_to(in_dir)
        if p.is_dir():
            if p.name == ".store" or p.name.startswith(TMP_PREFIX) or _is_stage_output(p):
                raise StageError(f"IN_DIR {in_dir} holds an earlier c2m output or cache at {p}: it would be read as input; "
                                 f"move it out of {in_dir} (or give {p} itself as IN_DIR)")
            continue
        if p.suffix.lower() == ".parquet":
            parquet.append(p)
        elif _included(rel.as_posix(), include):
            raw.append(p)
        else:
            skipped.append(p)
    if parquet and raw:
        raise StageError(f"IN_DIR {in_dir} holds both record Parquet ({parquet[0].relative_to(in_dir)}) and raw files "
                         f"({raw[0].relative_to(in_dir)}): give one kind per folder")
    return ("parts" if parquet else "raw"), parquet, skipped


def _source(in_dir: Path, cfg, store):
    from corpus2model.tasks.ingest import scan_raw

    return scan_raw(Path(in_dir), cfg.ingest.include, store)


def _records(in_dir: Path, cfg, store, runs: list, info: dict | None = None):
    """The input as records: a previous output's parts or a folder of parts as they are, raw files
    through ingest. ``info`` receives the input kind and the skipped files."""
    in_dir = Path(in_dir)
    kind, parquet, skipped = input_kind(in_dir, cfg.ingest.include)
    info = {} if info is None else info
    info.update(kind=kind, skipped=[[p.relative_to(in_dir).as_posix(), "not_included"] for p in skipped])
    if kind == "output":
        return _previous_output(in_dir)
    if kind == "parts":
        return _parquet_manifest(in_dir, parquet)
    return _run(_mod("ingest"), [_scan(in_dir, cfg, store, info)], cfg, store, runs)


def _scan(in_dir: Path, cfg, store, info: dict):
    """scan_raw, with the files it leaves out (and why) noted in ``info``."""
    src = _source(in_dir, cfg, store)
    if "skipped_files" in src.stats:  # scan_raw names what it leaves out (links, FIFOs, not included)
        info["skipped"] = src.stats["skipped_files"]
        info["skipped_total"] = sum(src.stats.get("skipped", {}).values())
    return src


def _raw_source(in_dir: Path, cfg, store, info: dict):
    """Ingest's input: raw files only."""
    kind, _, skipped = input_kind(in_dir, cfg.ingest.include)
    info.update(kind=kind, skipped=[[p.relative_to(in_dir).as_posix(), "not_included"] for p in skipped])
    if kind != "raw":
        what = f"the output of c2m {output_command(in_dir)}" if kind == "output" and output_command(in_dir) else \
            ("a stage output" if kind == "output" else "record Parquet parts")
        raise StageError(f"IN_DIR {in_dir} is {what}, not raw files: c2m ingest reads raw files; run c2m clean or dedup on it")
    return _scan(in_dir, cfg, store, info)


def _mod(name: str):
    from corpus2model.flows.stages import STAGES  # the stage table: one declaration per stage

    return STAGES[name]


def _run(module, inputs, cfg, store, runs: list):
    from corpus2model.tasks.stage import run_stage

    m = run_stage(module, inputs, cfg, _ctx(store))
    runs.append(m)
    return m


def _stage_entry(r) -> dict:
    return {"key": r.key, "cache": r.stats.get("cache"), "seconds": r.seconds, "counters": r.counters}


def _standalone_stats(command: str, in_dir: Path, info: dict, runs: list) -> dict:
    return {"command": command, "in_dir": str(Path(in_dir).resolve()), "input": info.get("kind"),
            "skipped_files": info.get("skipped", []), "skipped": info.get("skipped_total", len(info.get("skipped", []))),
            "stages": {r.stage: _stage_entry(r) for r in runs}}


def _build_stage_output(command, m, up, runs, in_dir, info):
    """The last stage's files (as the store has them) + every earlier stage's quarantine under
    ``quarantine/<stage>/`` + (dedup) removed.jsonl, into a staging folder."""
    from corpus2model.tasks.stage import FileEntry, Manifest, link_or_copy

    def build(stage_dir: Path):
        files = []
        for f in m.files:
            link_or_copy(m.dir / f.path, stage_dir / f.path)
            files.append(FileEntry(f.path, bytes=f.bytes, sha256=f.sha256, role=f.role, records=f.records))
        for r in runs[:-1]:
            for f in r.entries("quarantine"):
                rel = f"quarantine/{r.stage}/{Path(f.path).name}"
                link_or_copy(r.dir / f.path, stage_dir / rel)
                files.append(FileEntry(rel, bytes=f.bytes, sha256=f.sha256, role="quarantine", records=f.records))
        if command == "dedup":
            n = write_removed_jsonl(m, up, stage_dir / "removed.jsonl")
            files.append(FileEntry("removed.jsonl", role="removed", records=n))
        stats = {r.stage: {**_stage_entry(r), "stats": {k: v for k, v in r.stats.items() if k != "computed_files"}}
                 for r in runs}
        (stage_dir / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        files.append(FileEntry("stats.json", role="report"))
        d = m.to_dict()
        d["files"] = []
        out = Manifest.from_dict(d)
        out.files = files
        out.stats = {**m.stats, "standalone": _standalone_stats(command, in_dir, info, runs)}
        return out

    return build


def _stage_on_folder(stage: str, in_dir, out_dir, cfg, store, overwrite: bool = False):
    """Run one stage on ``in_dir`` (raw files are ingested first, except by ingest itself) and
    publish its output into ``out_dir``; returns (stage manifest in the store, upstream manifest)."""
    return _folder(stage, in_dir, out_dir, cfg, store, overwrite)[1:]


def _folder(stage: str, in_dir, out_dir, cfg, store, overwrite: bool):
    in_dir, out_dir = check_dirs(stage, in_dir, out_dir, store, overwrite)
    st, runs, info = _store(out_dir, store), [], {}
    up = _raw_source(in_dir, cfg, st, info) if stage == "ingest" else _records(in_dir, cfg, st, runs, info)
    m = _run(_mod(stage), [up], cfg, st, runs)
    published = _publish(stage, out_dir, _build_stage_output(stage, m, up, runs, in_dir, info))
    return published, m, up


def ingest_folder(in_dir, out_dir, cfg, store=None, overwrite: bool = False):
    """Raw files in ``in_dir`` -> records in ``out_dir``; returns the manifest written there."""
    return _folder("ingest", in_dir, out_dir, cfg, store, overwrite)[0]


def clean_folder(in_dir, out_dir, cfg, store=None, overwrite: bool = False):
    """Raw files, record parts or an earlier output in ``in_dir`` -> cleaned records in ``out_dir``."""
    return _folder("clean", in_dir, out_dir, cfg, store, overwrite)[0]


def dedup_folder(in_dir, out_dir, cfg, store=None, overwrite: bool = False):
    """Raw files, record parts or an earlier output in ``in_dir`` -> deduplicated records + removed.jsonl.

    A folder of JSONL files only (no record parts) takes the direct path (``tasks.text.dedup_jsonl``):
    records and sketches in one pass per file, no ingest Parquet in between (and without
    ``dedup.eval_files`` contamination checks, which need the stage: a folder with them set takes
    the stage path)."""
    in_dir, out_dir = check_dirs("dedup", in_dir, out_dir, store, overwrite)
    if not cfg.dedup.eval_files and input_kind(in_dir, cfg.ingest.include)[0] == "raw":
        from corpus2model.tasks.text.dedup_jsonl import dedup_jsonl_folder, jsonl_only

        st, info = _store(out_dir, store), {}
        src = _raw_source(in_dir, cfg, st, info)
        if jsonl_only(src):
            from corpus2model.tasks.stage import FileEntry

            def build(stage_dir: Path):
                m = dedup_jsonl_folder(src, stage_dir, cfg, st)
                m.stats["standalone"] = {**_standalone_stats("dedup", in_dir, info, []),
                                         "stages": {"dedup": {"key": m.key, "cache": m.stats.get("cache"),
                                                              "seconds": m.seconds, "counters": m.counters}}}
                m.files.append(FileEntry("stats.json", role="report"))
                return m

            return _publish("dedup", out_dir, build)
    return _folder("dedup", in_dir, out_dir, cfg, store, overwrite)[0]


def _id_stream(paths):
    import pyarrow.parquet as pq

    for p in paths:
        pf = open_parquet(p)
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
def _one_line(msg) -> str:
    """Config errors list one field a line; a standalone command answers in one line."""
    return "; ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def _config(args):
    from corpus2model.schemas.config import ConfigError, apply_overrides, load_config, parse_config, parse_overrides

    try:
        overrides = parse_overrides(args.set)
    except ConfigError as e:
        raise SystemExit(f"error: {_one_line(e)}") from None
    workers = args.workers or os.cpu_count() or 1
    for stage in SUBCOMMANDS:
        overrides.setdefault(f"{stage}.workers", workers)
    try:
        if args.config:
            return load_config(args.config, overrides)
        return parse_config(apply_overrides({}, overrides), source="--set")
    except ConfigError as e:
        raise SystemExit(f"error: {_one_line(e)}") from None


def _guarded(args, out_dir, work, error_code: int = 1):
    """(exit code, work()); a StageError, an OS error or Ctrl-C becomes one line on stderr."""
    import sys

    def fail(msg: str):
        print(f"error: {_one_line(msg)}", file=sys.stderr)
        return error_code, None

    try:
        return 0, work()
    except StageError as e:
        return fail(str(e))
    except OSError as e:
        store = _store(out_dir, args.store).root
        where = str(e.filename or "")
        reason = e.strerror or str(e)
        if where and _inside(Path(where).resolve(), store):
            return fail(f"cannot write to the store {store} ({reason}: {where}); give --store a writable folder "
                        f"(paths.store for c2m run) and run again")
        return fail(f"{where or out_dir}: {reason}")
    except KeyboardInterrupt:
        state = ("holds an unfinished output (no manifest.json; rerun the command to finish it)"
                 if (Path(out_dir) / INCOMPLETE).exists() else "was left as it was")
        print(f"interrupted: {out_dir} {state}; finished per-file work stays in the store and a rerun reuses it",
              file=sys.stderr)
        return 130, None


def cmd_standalone(args) -> int:
    cfg = _config(args)
    fn = {"ingest": ingest_folder, "clean": clean_folder, "dedup": dedup_folder}[args.command]
    code, m = _guarded(args, args.out_dir, lambda: fn(args.in_dir, args.out_dir, cfg, store=args.store,
                                                      overwrite=args.overwrite))
    if m is None:
        return code
    sa = m.stats["standalone"]
    for stage, r in sa["stages"].items():  # every stage's accounting: in = out + rejected + duplicates
        c = r["counters"]
        print(f"{stage}: in {c.get('in')} out {c.get('out')} rejected {sum(c.get('rejected', {}).values())} "
              f"duplicates {c.get('duplicates', 0)} ({r['cache']}, {r['seconds']:.1f} s)")
    if sa["skipped"]:  # every input file is read or named here
        names = ", ".join(f"{rel} ({why})" for rel, why in sa["skipped_files"][:5])
        print(f"skipped {sa['skipped']} files: {names}{', ...' if sa['skipped'] > 5 else ''} "
              f"(not_included: --set 'ingest.include=[...]' reads them)")
    kinds = {"raw": "raw files", "parts": "record parts", "output": "an earlier output"}
    print(f"-> {args.out_dir} (input: {kinds.get(sa['input'], sa['input'])})")
    return 0


def validate_path(path, out_dir, cfg, suite=None, store=None, overwrite: bool = False) -> dict:
    """An expectation suite on any records file or folder, without the DAG.

    PATH is a JSONL/JSON file (optionally .gz), a record Parquet file, or a folder (read like the
    other one-stage commands). Lines that cannot even be read as records (invalid JSON or UTF-8, wrong
    types, blank lines) are reported as unreadable with their reason; the rest is validated. OUT_DIR
    gets data_docs/ (Great Expectations, reads offline), report.md, report.json, failing_rows.parquet
    and unreadable.parquet; like the other commands it refuses an OUT_DIR inside a PATH folder and a
    non-empty OUT_DIR that holds no earlier report, unless ``overwrite``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA, quarantine_table, records_table
    from corpus2model.tasks.ingest import parse_file
    from corpus2model.tasks.stage import sha256_file
    from corpus2model.tasks.validate import (failing_rows_table, file_reader, raw_columns, resolve_suite_path, suite_boundary,
                                suite_kind, validate_pairs_path, validate_table)

    path, out_dir = check_dirs("validate", path, out_dir, store, overwrite, in_label="PATH", out_label="--out")
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
    boundary = suite_boundary(suite_path)
    # The overrides the flow applies at that boundary: checks.* for the raw/clean/augment suites,
    # validate.* for the final one, so `c2m validate` and `c2m run` judge a file the same way.
    vcfg = cfg.checks if boundary in ("raw", "clean", "augment") else cfg.validate_
    report = validate_table(table, suite_path, out_dir / "data_docs", vcfg.max_failing_rows, raw=raw,
                            severity_overrides=vcfg.severity_overrides, boundary=boundary)
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
    cfg = _config(args)
    code, s = _guarded(args, args.out, lambda: validate_path(args.path, args.out, cfg, suite=args.suite, store=args.store,
                                                             overwrite=args.overwrite), error_code=2)
    if s is None:
        return code
    print(s["markdown"])
    print(f"{s['records']} records validated against {s['suite']}: {s['errors_failed']} error and {s['warns_failed']} warn "
          f"expectations failed; {s['unreadable']} unreadable lines {s['unreadable_reasons'] or ''}")
    print(f"report: {s['docs_index']}")
    return 1 if s["errors_failed"] or s["unreadable"] else 0


def add_subcommands(subparsers) -> None:
    helps = {"ingest": "raw files in IN_DIR -> records in OUT_DIR",
             "clean": "raw files, record parts or an earlier output -> cleaned, quality-filtered records",
             "dedup": "raw files, record parts or an earlier output -> deduplicated records + removed.jsonl"}
    for name in SUBCOMMANDS:
        sp = subparsers.add_parser(name, help=helps[name])
        sp.add_argument("in_dir", type=Path)
        sp.add_argument("out_dir", type=Path)
        sp.add_argument("--config", type=Path, help="YAML config whose sections are used (default: schema defaults)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. dedup.method=minhash")
        sp.add_argument("--store", type=Path, help="cache store (default OUT_DIR/.store); reuse it for incremental runs")
        sp.add_argument("--workers", type=int, default=0, help="processes per stage (default: all cores)")
        sp.add_argument("--overwrite", action="store_true",
                        help=f"write into a non-empty OUT_DIR that is not an earlier output of this command, replacing "
                             f"its {', '.join(OUTPUTS)} (other files stay)")
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
    sp.add_argument("--overwrite", action="store_true", help="write the report into a non-empty folder that holds no earlier report")
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
