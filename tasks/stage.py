"""The stage contract (DESIGN.md, "The stage contract"), written once for every stage.

A stage module defines::

    STAGE = "clean"            # name, also the store folder
    VERSION = "1"              # bump when the output for the same input changes
    SECTIONS = ("clean",)      # config sections it reads, and the only ones it hashes
    def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest
    def key_extra(cfg) -> dict     # optional: content the config only points at (a suite file)

``cfg`` is a namespace holding only the declared sections, so a stage cannot read a setting that
is not part of its cache key. ``run`` writes into ``out_dir`` (a temporary folder) and returns a
Manifest listing the files it wrote (paths relative to ``out_dir``) plus counters and stats; the
runner fills in sizes, sha256s and the key, checks the counters, writes ``manifest.json`` last and
renames the folder into ``<store>/<stage>/<key>/`` in one step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from corpus2model.schemas.records import SCHEMA_VERSION

CODE_VERSION = "0.1.0"
MANIFEST = "manifest.json"
UNIT_MANIFEST = "unit.json"


class StageError(RuntimeError):
    """A stage could not produce its output; the message says which input and what to do."""


class CounterMismatch(StageError):
    pass


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, paths as strings; what keys are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(stage: str, version: str, sections: dict, upstream_keys: list[str]) -> str:
    """Content-only key: stage, stage version, canonical config sections, upstream keys (in order)."""
    payload = canonical_json(
        {"stage": stage, "version": version, "config": sections, "upstream": list(upstream_keys)}
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


@dataclass
class FileEntry:
    path: str  # relative to the stage folder
    bytes: int = 0
    sha256: str = ""
    role: str = "data"  # data | quarantine | removed | report | model | ...
    records: int | None = None
    # When the file was written: a later mtime means someone touched it, so verify re-hashes it.
    # Not part of any key or identity.
    mtime_ns: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "FileEntry":
        return cls(**{k: d[k] for k in ("path", "bytes", "sha256", "role", "records", "mtime_ns") if k in d})


@dataclass
class Manifest:
    stage: str
    stage_version: str = ""
    key: str = ""
    config_hash: str = ""
    upstream: dict[str, str] = field(default_factory=dict)  # stage -> key
    files: list[FileEntry] = field(default_factory=list)
    # in + added = out + sum(rejected) + duplicates  (checked for record stages)
    counters: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    code_version: str = CODE_VERSION
    seconds: float = 0.0
    created: str = ""
    path: str = ""  # absolute folder of this output (not part of the JSON identity)

    # -- access -------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return Path(self.path)

    def files_with(self, role: str) -> list[Path]:
        return [self.dir / f.path for f in self.files if f.role == role]

    def entries(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]

    def file(self, name: str) -> Path:
        for f in self.files:
            if f.path == name:
                return self.dir / f.path
        raise StageError(f"{self.stage} output {self.path} lists no file {name!r}")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str | Path = "") -> "Manifest":
        d = dict(d)
        d["files"] = [FileEntry.from_dict(f) for f in d.get("files", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, path=str(path))

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        return cls.from_dict(json.loads((folder / MANIFEST).read_text(encoding="utf-8")), folder)


def check_counters(stage: str, counters: dict) -> None:
    """in + added == out + rejected + duplicates, or the stage lost (or invented) records."""
    if not counters:
        return
    n_in = counters.get("in", 0) + counters.get("added", 0)
    rejected = sum(counters.get("rejected", {}).values())
    n_out = counters.get("out", 0) + rejected + counters.get("duplicates", 0)
    if n_in != n_out:
        raise CounterMismatch(
            f"stage {stage}: counters do not add up: in {counters.get('in', 0)} + added {counters.get('added', 0)} != "
            f"out {counters.get('out', 0)} + rejected {rejected} + duplicates {counters.get('duplicates', 0)}; "
            f"a record was lost or counted twice"
        )


def _finalize_files(folder: Path, files: list[FileEntry], hashed: dict[str, str] | None = None) -> None:
    for f in files:
        p = folder / f.path
        if not p.is_file():
            raise StageError(f"manifest lists {f.path} but {p} was not written")
        st = p.stat()
        f.bytes = st.st_size
        f.mtime_ns = st.st_mtime_ns
        f.sha256 = (hashed or {}).get(f.path) or f.sha256 or sha256_file(p)


def verify(folder: Path, manifest_name: str = MANIFEST) -> tuple[bool, str]:
    """A cache hit must have its manifest and every listed file, each with the recorded size; a file
    whose mtime moved since it was written is re-hashed, so a same-size edit is caught too."""
    mpath = folder / manifest_name
    if not mpath.is_file():
        return False, "no output yet"
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return False, f"manifest unreadable ({e})"
    for f in data.get("files", []):
        p = folder / f["path"]
        if not p.is_file():
            return False, f"output file missing: {f['path']}"
        st = p.stat()
        if st.st_size != f["bytes"]:
            return False, f"output file changed size: {f['path']} ({st.st_size} bytes, manifest says {f['bytes']})"
        if f.get("mtime_ns") and st.st_mtime_ns != f["mtime_ns"] and f.get("sha256") and sha256_file(p) != f["sha256"]:
            return False, f"output file edited: {f['path']} (sha256 differs from the manifest)"
    return True, "verified"


class Store:
    """``<root>/<stage>/<key>/`` outputs, ``<root>/_units/<stage>/<key>/`` per-unit results,
    ``<root>/_tmp`` for writes in progress (same filesystem, so the final rename is atomic)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def unit_dir(self, stage: str, key: str) -> Path:
        return self.root / "_units" / stage / key

    def lookup(self, stage: str, key: str) -> tuple[Manifest | None, str]:
        folder = self.stage_dir(stage, key)
        ok, why = verify(folder)
        return (Manifest.load(folder) if ok else None), why

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Per-key lock: two runs on one store compute a key once; the second then reuses it."""
        lockdir = self.root / "_locks"
        lockdir.mkdir(parents=True, exist_ok=True)
        with open(lockdir / f"{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def sweep_tmp(self) -> int:
        """Remove temp folders whose writer process is gone (killed with -9, machine reset).
        A folder's name carries its writer's pid, so a live concurrent writer is never touched."""
        tmp_root = self.root / "_tmp"
        removed = 0
        for entry in tmp_root.iterdir() if tmp_root.is_dir() else []:
            pid = entry.name.split(".", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    @contextlib.contextmanager
    def atomic_dir(self, final: Path) -> Iterator[Path]:
        """Yield a temp folder; on success it replaces ``final`` in one rename, on error it vanishes."""
        tmp_root = self.root / "_tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.{final.parent.name}-{final.name}-", dir=tmp_root))
        try:
            yield tmp
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                # An unverifiable leftover (e.g. a file was deleted): move it aside, then replace.
                trash = tmp_root / f"stale-{uuid.uuid4().hex}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- per-unit cache -------------------------------------------------------------------
    def unit_lookup(self, stage: str, key: str) -> dict | None:
        folder = self.unit_dir(stage, key)
        ok, _ = verify(folder, UNIT_MANIFEST)
        if not ok:
            return None
        data = json.loads((folder / UNIT_MANIFEST).read_text(encoding="utf-8"))
        data["dir"] = str(folder)
        return data

    def unit_write(self, stage: str, key: str, write) -> dict:
        """``write(tmp_dir) -> {"files": [FileEntry|dict], "counters": {...}, ...}``; stored atomically."""
        final = self.unit_dir(stage, key)
        with self.atomic_dir(final) as tmp:
            info = write(tmp)
            entries = [f if isinstance(f, FileEntry) else FileEntry.from_dict(f) for f in info.get("files", [])]
            _finalize_files(tmp, entries)
            info = {**info, "files": [dataclasses.asdict(e) for e in entries], "key": key}
            (tmp / UNIT_MANIFEST).write_text(canonical_json(info), encoding="utf-8")
        info["dir"] = str(final)
        return info


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> None:
    """Replace ``path`` with ``data`` as JSON in one step: a reader (or a killed writer) never leaves
    or sees half a file. fsync'd, because aliases and run records must survive a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def link_or_copy(src: Path, dst: Path) -> None:
    """Stage outputs share bytes with per-unit results through hard links (copy across filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class StageContext:
    """What a stage may use besides its inputs and config: the store (for per-unit caching),
    the raw folder (ingest only) and a logger."""

    store: Store
    raw_dir: Path | None = None
    log: Any = None
    # Where out_dir will live once the runner renames it: artifacts link files people open later.
    final_dir: Path | None = None

    def info(self, msg: str, *args) -> None:
        if self.log is not None:
            self.log.info(msg, *args)


def stage_config(module: types.ModuleType, cfg) -> types.SimpleNamespace:
    """The declared sections only, as models (for the stage) and as canonical dicts (for the key)."""
    return types.SimpleNamespace(**{s: getattr(cfg, "validate_" if s == "validate" else s) for s in module.SECTIONS})


def stage_sections(module: types.ModuleType, cfg) -> dict:
    """What a stage's key is computed from besides its upstream keys: its hashed config sections,
    plus ``key_extra`` (e.g. the expectation suite's file content: editing the suite reruns validation)."""
    sections = {s: cfg.section(s) for s in module.SECTIONS}
    if hasattr(module, "key_extra"):
        sections["_extra"] = module.key_extra(stage_config(module, cfg))
    return sections


def stage_key(module: types.ModuleType, cfg, upstream: list[Manifest] | list[str],
              sections: dict | None = None) -> tuple[str, str]:
    """(key, config hash); pass ``sections`` when the caller already has stage_sections()."""
    sections = stage_sections(module, cfg) if sections is None else sections
    config_hash = hashlib.sha256(canonical_json(sections).encode()).hexdigest()[:16]
    keys = [u if isinstance(u, str) else f"{u.stage}:{u.key}" for u in upstream]
    return cache_key(module.STAGE, module.VERSION, sections, keys), config_hash


def run_stage(module: types.ModuleType, inputs: list[Manifest], cfg, ctx: StageContext) -> Manifest:
    """Return the verified cached output for this key, or compute it atomically (under a per-key lock)."""
    key, config_hash = stage_key(module, cfg, inputs)
    store = ctx.store
    try:
        store.sweep_tmp()  # leftovers of killed runs: never reused, only removed
        return _run_locked(module, inputs, cfg, ctx, key, config_hash)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            # Nothing was marked finished: the temp folder is gone and no manifest was renamed in.
            raise StageError(
                f"stage {module.STAGE}: cannot write to the store {store.root} ({os.strerror(e.errno)}: {e.filename or ''}); "
                f"free disk space or point paths.store at a writable folder, then run again"
            ) from e
        raise


def _run_locked(module: types.ModuleType, inputs: list[Manifest], cfg, ctx: StageContext, key: str, config_hash: str) -> Manifest:
    store = ctx.store
    with store.lock(f"{module.STAGE}-{key}"):
        hit, _ = store.lookup(module.STAGE, key)
        if hit is not None:
            hit.stats = {**hit.stats, "cache": "hit"}
            return hit
        final = store.stage_dir(module.STAGE, key)
        t0 = time.perf_counter()
        with store.atomic_dir(final) as tmp:
            result = module.run(inputs, stage_config(module, cfg), tmp, dataclasses.replace(ctx, final_dir=final))
            check_counters(module.STAGE, result.counters)
            _finalize_files(tmp, result.files, result.stats.pop("_hashed", None))
            result.stage = module.STAGE
            result.stage_version = module.VERSION
            result.key = key
            result.config_hash = config_hash
            result.upstream = {u.stage: u.key for u in inputs}
            result.seconds = round(time.perf_counter() - t0, 3)
            result.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (tmp / MANIFEST).write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        result.path = str(final)
        result.stats = {**result.stats, "cache": "computed"}
        return result


# ---------------------------------------------------------------------------------------------
# per-unit stages (ingest per raw file, clean per part): one changed unit recomputes alone
# ---------------------------------------------------------------------------------------------
MAX_LISTED = 50


@dataclass
class Unit:
    key: str  # unit cache key (content of the unit + the stage's hashed config)
    stem: str  # file name stem of its outputs inside the stage folder
    label: str  # what a person calls it (the raw file path)
    args: tuple  # what the worker gets; the worker returns Store.unit_write's info


def gather_units(stage: str, units: list[Unit], worker, ctx: StageContext, out_dir: Path,
                 workers: int = 1, sum_fields: tuple[str, ...] = ()) -> tuple[list[FileEntry], dict, dict]:
    """Reuse every cached unit, compute the missing ones (in a process pool when ``workers`` > 1),
    and link all unit files into ``out_dir`` as ``parts/<stem>.parquet`` / ``quarantine/<stem>.parquet``.

    Returns (files, counters summed over units, stats with units/units_computed/computed_files and
    the sums of ``sum_fields``)."""
    from concurrent.futures import ProcessPoolExecutor

    hits = {u.key: ctx.store.unit_lookup(stage, u.key) for u in units}
    todo = list({u.key: u.args for u in units if hits[u.key] is None}.values())  # equal units: once
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = {info["key"]: info for info in pool.map(worker, todo, chunksize=max(1, len(todo) // (4 * workers)))}
    else:
        done = {info["key"]: info for info in map(worker, todo)}

    files: list[FileEntry] = []
    counters: dict = {"in": 0, "out": 0, "rejected": {}, "duplicates": 0}
    sums = dict.fromkeys(sum_fields, 0)
    computed: set[str] = set()
    labels: list[str] = []
    for u in units:
        info = hits[u.key] or done[u.key]
        if hits[u.key] is None and u.key not in computed:
            computed.add(u.key)
            labels.extend(info.get("source_paths") or [u.label])
        c = info["counters"]
        counters["in"] += c["in"]
        counters["out"] += c["out"]
        for reason, n in c["rejected"].items():
            counters["rejected"][reason] = counters["rejected"].get(reason, 0) + n
        for name in sum_fields:
            sums[name] += info.get(name, 0)
        for e in info["files"]:
            dst = f"{'parts' if e['role'] == 'data' else 'quarantine'}/{u.stem}.parquet"
            link_or_copy(Path(info["dir"]) / e["path"], out_dir / dst)
            files.append(FileEntry(dst, bytes=e["bytes"], sha256=e["sha256"], role=e["role"], records=e["records"]))
    stats = {
        "units": len(units),
        "units_computed": len(computed),
        "units_reused": len(units) - len(computed),
        "computed_files": labels[:MAX_LISTED],
        **sums,
        "_hashed": {f.path: f.sha256 for f in files},  # linked files keep their unit sha256
    }
    return files, counters, stats
