"""The stage contract (DESIGN.md, "The stage contract"), written once for every stage.

A stage module defines::

    STAGE = "clean"            # name, also the store folder
    VERSION = "1"              # bump when the output for the same input changes
    SECTIONS = ("clean",)      # config sections it reads, and the only ones it hashes
    def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest
    def key_extra(cfg) -> dict     # optional: content the config only points at (a suite file);
                                   # key_extra(cfg, upstream) also gets the keyed inputs' "stage:key"

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
import inspect
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from corpus2model.schemas.records import SCHEMA_VERSION
from corpus2model.tasks.common.fingerprint import code_changed, on_code_change, stage_fingerprint

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
    # Normalised-AST digest of the stage's code and the project modules it uses (tasks/common/
    # fingerprint.py). Never part of the key: it tells `c2m status` that the code changed since.
    code_fingerprint: str = ""
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
    data, why = read_verified(folder, manifest_name)
    return data is not None, why


def read_verified(folder: Path, manifest_name: str = MANIFEST) -> tuple[dict | None, str]:
    """(the manifest's JSON, "verified") when ``verify`` passes, else (None, why). What a cache hit costs:
    one read of the manifest and one stat per listed file; a data file is opened only when its mtime
    moved since it was written (then it is re-hashed), never on an untouched hit."""
    try:
        data = json.loads((folder / manifest_name).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None, "no output yet"
    except (OSError, json.JSONDecodeError) as e:
        return None, f"manifest unreadable ({e})"
    for f in data.get("files", []):
        p = folder / f["path"]
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None, f"output file missing: {f['path']}"
        if not stat.S_ISREG(st.st_mode):
            return None, f"output file missing: {f['path']}"
        if st.st_size != f["bytes"]:
            return None, f"output file changed size: {f['path']} ({st.st_size} bytes, manifest says {f['bytes']})"
        if f.get("mtime_ns") and st.st_mtime_ns != f["mtime_ns"] and f.get("sha256") and sha256_file(p) != f["sha256"]:
            return None, f"output file edited: {f['path']} (sha256 differs from the manifest)"
    return data, "verified"


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
        data, why = read_verified(folder)
        return (Manifest.from_dict(data, folder) if data is not None else None), why

    @contextlib.contextmanager
    def lock(self, name: str, say=None, poll_s: float = 0.5, report_every_s: float = 60.0) -> Iterator[None]:
        """Per-key lock: two runs on one store compute a key once; the second then reuses it.

        The file holds its holder (pid, host, since), so a waiter says whom it waits for, and again every
        ``report_every_s``; ``say`` (default: stderr) gets those lines. Forked children (process pool
        workers) close their copy of the descriptor (``_close_inherited_locks``), so the lock dies with its
        holder. If it outlives the holder anyway (an orphan from older code, a pool that was not forked by
        us), a waiter on the same host whose holder pid is gone takes it over: it says so and replaces the
        lock file, leaving the orphan holding a file nobody opens."""
        say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        path = self.root / "_locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        waited_since, reported = None, 0.0
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no O_TRUNC: the holder's note stays
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                now = time.time()
                waited_since = waited_since or now
                if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    say(f"lock {path} is held for pid {holder['pid']}, which is gone (an orphaned child still has "
                        f"it open); taking it over")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                if now - reported >= report_every_s:
                    reported = now
                    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                           if holder else "a process that left no note")
                    say(f"waiting for lock {path}: held by {who}; waited {now - waited_since:.0f} s so far")
                time.sleep(poll_s)
                continue
            if not _same_file(fd, path):  # taken over (unlinked) between our open and our flock
                os.close(fd)
                continue
            break
        _HELD_LOCK_FDS.add(fd)
        try:
            note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
            if waited_since is not None:
                say(f"lock {path} acquired after {time.time() - waited_since:.0f} s")
            yield
        finally:
            _HELD_LOCK_FDS.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
        data, _ = read_verified(folder, UNIT_MANIFEST)
        if data is None:
            return None
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


# Lock descriptors this process holds. A forked child would keep each one's flock alive after this
# process dies (the lock belongs to the shared open file, not the process): a SIGTERM'd `c2m ingest`
# left its pool workers holding the stage lock and the rerun waited silently. Children close them.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)  # closes the child's copy only; the parent still holds the lock
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_holder(fd: int) -> dict:
    try:
        note = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


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
    # Where unit work runs (tasks/common/executor.py): None = the Dask cluster this stage runs on, else a
    # local process pool of the stage's ``workers``. Tests and benches pass DaskUnits(client) or LocalUnits(n).
    executor: Any = None

    def info(self, msg: str, *args) -> None:
        if self.log is not None:
            self.log.info(msg, *args)


@dataclass(frozen=True)
class Stage:
    """One DAG node, declared once in the stage table (flows/stages.py): its name (also the store
    folder), VERSION (bump when the output for the same input changes), the config sections it reads
    and hashes, the upstream stages it reads (in order), its run function and, optionally,
    ``key_extra(cfg)``: content the config only points at (a suite file's bytes).

    ``key_inputs`` names the inputs that enter the key when not all do: an input whose key another
    input's key already chains (finetune reads shard, and tokenize's key is made from shard's) adds
    nothing to it, and leaving it out keeps existing keys where they were.

    ``STAGE``/``VERSION``/``SECTIONS`` are the contract's names, so run_stage, stage_key and the code
    fingerprint take a Stage or a stage module (tests build small ones) alike."""

    name: str
    version: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    run: Callable
    key_extra: Callable | None = None
    key_inputs: tuple[str, ...] | None = None
    module: str = ""  # the module that implements it (what the code fingerprint hashes)
    validation: bool = False  # a validation node: the flow runs its distribution checks after it

    @property
    def STAGE(self) -> str:  # noqa: N802  (the stage-module contract's name)
        return self.name

    @property
    def VERSION(self) -> str:  # noqa: N802
        return self.version

    @property
    def SECTIONS(self) -> tuple[str, ...]:  # noqa: N802
        return self.sections

    @property
    def __name__(self) -> str:  # tasks/common/fingerprint.py: module_name()
        return self.module


def stage_config(module: types.ModuleType, cfg) -> types.SimpleNamespace:
    """The declared sections only, as models (for the stage) and as canonical dicts (for the key)."""
    return types.SimpleNamespace(**{s: getattr(cfg, "validate_" if s == "validate" else s) for s in module.SECTIONS})


def stage_sections(module: types.ModuleType, cfg, upstream: list[Manifest] | list[str] | None = None) -> dict:
    """What a stage's key is computed from besides its upstream keys: its hashed config sections,
    plus ``key_extra`` (e.g. the expectation suite's file content: editing the suite reruns validation).

    A ``key_extra(cfg, upstream)`` of two parameters also gets the keyed inputs' ``"stage:key"`` strings:
    finetune's parent version depends on which training data this is (tasks/model/continual.py)."""
    sections = {s: cfg.section(s) for s in module.SECTIONS}
    extra = getattr(module, "key_extra", None)
    if extra is not None:
        view = stage_config(module, cfg)
        if len(inspect.signature(extra).parameters) >= 2:
            sections["_extra"] = extra(view, _keyed_inputs(module, upstream or []))
        else:
            sections["_extra"] = extra(view)
    return sections


def _keyed_inputs(module: types.ModuleType, upstream: list[Manifest] | list[str]) -> list[str]:
    """``"stage:key"`` of the inputs that enter the key (Stage.key_inputs), in order."""
    keys = [u if isinstance(u, str) else f"{u.stage}:{u.key}" for u in upstream]
    keyed = getattr(module, "key_inputs", None)
    if keyed is not None:  # Stage.key_inputs: an input whose key another input's key already chains
        keys = [k for k in keys if k.split(":", 1)[0] in keyed]
    return keys


def upstream_map(inputs: list[Manifest]) -> dict[str, str]:
    """stage -> key of a stage's inputs; a second input of one stage (evaluate's ablated finetune) is
    ``stage#2``, so every key it read is recorded and the first keeps the plain name readers look up."""
    out: dict[str, str] = {}
    for u in inputs:
        name, i = u.stage, 1
        while name in out:
            i += 1
            name = f"{u.stage}#{i}"
        out[name] = u.key
    return out


def stage_key(module: types.ModuleType, cfg, upstream: list[Manifest] | list[str],
              sections: dict | None = None) -> tuple[str, str]:
    """(key, config hash); pass ``sections`` when the caller already has stage_sections()."""
    sections = stage_sections(module, cfg, upstream) if sections is None else sections
    config_hash = hashlib.sha256(canonical_json(sections).encode()).hexdigest()[:16]
    return cache_key(module.STAGE, module.VERSION, sections, _keyed_inputs(module, upstream)), config_hash


def run_stage(module: types.ModuleType, inputs: list[Manifest], cfg, ctx: StageContext) -> Manifest:
    """Return the verified cached output for this key, or compute it atomically (under a per-key lock)."""
    key, config_hash = stage_key(module, cfg, inputs)
    store = ctx.store
    try:
        return _run_locked(module, inputs, cfg, ctx, key, config_hash)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            # Nothing was marked finished: the temp folder is gone and no manifest was renamed in.
            raise StageError(
                f"stage {module.STAGE}: cannot write to the store {store.root} ({os.strerror(e.errno)}: {e.filename or ''}); "
                f"free disk space or point paths.store at a writable folder, then run again"
            ) from e
        raise


def _reusable(module: types.ModuleType, cfg, store: Store, key: str) -> Manifest | None:
    """The verified stored output for ``key``, marked a hit; None when there is none or when
    runtime.on_code_change=rerun and the code changed since (atomic_dir then replaces it in one rename)."""
    hit, _ = store.lookup(module.STAGE, key)
    if hit is None or (on_code_change(cfg) == "rerun" and code_changed(hit.code_fingerprint, module)):
        return None
    hit.stats = {**hit.stats, "cache": "hit"}
    return hit


def _run_locked(module: types.ModuleType, inputs: list[Manifest], cfg, ctx: StageContext, key: str, config_hash: str) -> Manifest:
    store = ctx.store
    # A verified output is final (it was renamed in whole), so a hit needs no lock: it costs the
    # manifest read and a stat per file. Only a miss waits for the key's lock, then looks again.
    hit = _reusable(module, cfg, store, key)
    if hit is not None:
        return hit
    with store.lock(f"{module.STAGE}-{key}", say=ctx.log.warning if ctx.log is not None else None):
        hit = _reusable(module, cfg, store, key)
        if hit is not None:
            return hit
        store.sweep_tmp()  # leftovers of killed runs: never reused, only removed (by the next run that writes)
        fingerprint = stage_fingerprint(module)  # only for what is computed: parsing the code is not free
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
            result.code_fingerprint = fingerprint
            result.upstream = upstream_map(inputs)
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
    bytes: int = 0  # input size, for MB/s and the ETA (0: progress counts units only)


def compute_units(stage: str, todo: list[Unit], worker, ctx: StageContext, workers: int = 1) -> dict[str, dict]:
    """Run ``worker(unit.args)`` for every unit of ``todo`` (units not in the store yet) on the stage's
    executor (tasks/common/executor.py: the Dask cluster the stage runs on, else a process pool of
    ``workers``), reporting progress (tasks/common/progress.py). Returns the infos by unit key.

    ``worker`` must be a module-level function (it is pickled by name) whose ``args`` hold only paths and
    plain settings: it may run in another process or on another machine that sees the store."""
    from corpus2model.tasks.common.executor import unit_executor
    from corpus2model.tasks.common.progress import Progress

    todo = list({u.key: u for u in todo}.values())  # equal units: once
    done: dict[str, dict] = {}
    if not todo:
        return done
    executor = unit_executor(workers, ctx.executor)
    with Progress(stage, total=len(todo), total_bytes=sum(u.bytes for u in todo)) as progress, \
            contextlib.closing(executor.map(worker, [u.args for u in todo], name=stage)) as results:
        for i, info in results:  # closing: an error here cancels the units still queued on the executor
            done[todo[i].key] = info
            progress.advance(1, todo[i].bytes)
    if len(todo) > 1:
        ctx.info("%s", progress.line() + f" on {executor!r}")
    return done


def map_units(stage: str, units: list[Unit], worker, ctx: StageContext, workers: int = 1) -> list[dict]:
    """The info of every unit, in order: the cached ones reused, the missing ones computed
    (``compute_units``). For stages that assemble unit results themselves (shard, tokenize, dedup)."""
    hits = {u.key: ctx.store.unit_lookup(stage, u.key) for u in units}
    done = compute_units(stage, [u for u in units if hits[u.key] is None], worker, ctx, workers)
    return [hits[u.key] or done[u.key] for u in units]


def gather_units(stage: str, units: list[Unit], worker, ctx: StageContext, out_dir: Path,
                 workers: int = 1, sum_fields: tuple[str, ...] = ()) -> tuple[list[FileEntry], dict, dict]:
    """Reuse every cached unit, compute the missing ones (``compute_units``: on the Dask cluster the stage
    runs on, else in a process pool when ``workers`` > 1), and link all unit files into ``out_dir`` as
    ``parts/<stem>.parquet`` / ``quarantine/<stem>.parquet``.

    Returns (files, counters summed over units, stats with units/units_computed/computed_files and
    the sums of ``sum_fields``)."""
    hits = {u.key: ctx.store.unit_lookup(stage, u.key) for u in units}
    done = compute_units(stage, [u for u in units if hits[u.key] is None], worker, ctx, workers)

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
            # preference records (role "pairs", schemas.records.PAIR_SCHEMA) keep a folder of their own
            dst = f"{ {'data': 'parts', 'pairs': 'pairs'}.get(e['role'], 'quarantine')}/{u.stem}.parquet"
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
