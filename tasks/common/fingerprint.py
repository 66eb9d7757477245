"""Code fingerprints: which version of the code made a cache entry (DESIGN.md, "The stage contract").

A stage's fingerprint is a sha256 over the normalised AST of its module and of every project module
(``corpus2model.*``) it imports, transitively, including imports inside functions. Normalised means
``ast.dump`` without line/column attributes and with docstrings removed, so comments, docstrings,
blank lines and formatting do not count: rewording a comment never reruns hours of training, while
a changed expression in a library the stage uses does show up. (Prefect's TASK_SOURCE policy and
ZenML hash only the task function's source text: they miss a changed helper and count a comment.)

The fingerprint is recorded in each manifest but is never part of the cache key: the key says what
the output is made from, the fingerprint says which code made it. ``c2m status`` compares the two
and ``runtime.on_code_change`` (warn | rerun) decides what a mismatch does.

Pure and light: reads source files through importlib's finders without importing them, and caches
per process (the code of a running process does not change under it in any way that matters here).
Parsing and dumping the ASTs of the ~60 project modules a run uses took 2-5 s per process on 2 cores
(most of an unchanged rerun's plan), so each module's digest and import list is also kept on disk in
the user cache dir (``fingerprints-py3X.json``), keyed by the sha256 of the file's bytes (and the module
name, which relative imports resolve against): every file is still read and hashed on each run, so an
edit is always seen (no trust in mtimes, which two quick writes can share); only the parse is skipped.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

CODE_CHANGED_WARN = "code changed since this entry: run with runtime.on_code_change=rerun to recompute"
CODE_CHANGED_RERUN = "code changed since this entry (runtime.on_code_change=rerun)"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                # Keep the body non-empty (a function whose body is only a docstring) with `pass`,
                # so that a docstring-only function and a `pass` function hash alike.
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalised_ast(source: str) -> str:
    """``ast.dump`` of the source without positions or docstrings: comments and layout vanish."""
    return ast.dump(_strip_docstrings(ast.parse(source)), annotate_fields=True, include_attributes=False)


@functools.lru_cache(maxsize=None)
def _source_file(name: str) -> str | None:
    """The .py file of a project module, or None when ``name`` is not a module (e.g. a function
    imported with ``from pkg import name``)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return spec.origin


def _is_package(name: str) -> bool:
    f = _source_file(name)
    return bool(f) and Path(f).name == "__init__.py"


def _import_candidates(name: str, tree: ast.AST) -> set[str]:
    """Project modules ``name`` may import anywhere in its body (top level or inside functions); the
    project is the module's top-level package (``corpus2model``): third-party code is pinned by the
    environment. Names are candidates (``from pkg import x`` may name a function): ``_module_digest``
    keeps those that are modules, in each process, so the disk cache holds no decision about them."""
    root = name.split(".", 1)[0]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == root or alias.name.startswith(root + "."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == root or mod.startswith(root + ".")):
                continue
            found.add(mod)
            for alias in node.names:  # `from corpus2model.tasks import registry` names a module
                if alias.name != "*":
                    found.add(f"{mod}.{alias.name}")
    # Importing a.b.c runs a/__init__ and a/b/__init__ too.
    for mod in list(found):
        parts = mod.split(".")
        for i in range(2, len(parts)):
            found.add(".".join(parts[:i]))
    return found


DISK_CACHE_MAX = 4000  # entries (~60 per checkout state): old code versions fall out first
_disk: dict | None = None
_disk_dirty = False
_disk_lock = threading.Lock()


def _disk_cache_path() -> Path:
    from corpus2model.tasks.common.resources import cache_dir

    # ast.dump's text differs between Python versions: one file per version, never mixed.
    return cache_dir(f"fingerprints-py{sys.version_info[0]}{sys.version_info[1]}.json")


def _disk_cache() -> dict:
    global _disk
    if _disk is None:
        try:
            data = json.loads(_disk_cache_path().read_text(encoding="utf-8"))
            _disk = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _disk = {}  # absent or damaged: recomputed, and rewritten whole
    return _disk


def _save_disk_cache() -> None:
    """Write the cache if this process added to it (atomic replace: concurrent runs each write a whole
    file; the last one wins, and a lost entry only costs one parse later). Never fails a run."""
    global _disk_dirty
    with _disk_lock:
        if not _disk_dirty or _disk is None:
            return
        entries = dict(list(_disk.items())[-DISK_CACHE_MAX:])
        path = _disk_cache_path()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, path)
            _disk_dirty = False
        except OSError:
            tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=None)
def _module_digest(name: str) -> tuple[str, frozenset[str]]:
    global _disk_dirty
    path = _source_file(name)
    if path is None:
        raise ModuleNotFoundError(f"no Python source for module {name!r}")
    data = Path(path).read_bytes()
    key = f"{name}:{hashlib.sha256(data).hexdigest()}"
    with _disk_lock:
        hit = _disk_cache().get(key)
    if not (isinstance(hit, list) and len(hit) == 2 and isinstance(hit[0], str) and isinstance(hit[1], list)):
        source = data.decode("utf-8")
        tree = ast.parse(source)
        candidates = sorted(_import_candidates(name, tree))
        hit = [hashlib.sha256(normalised_ast(source).encode("utf-8")).hexdigest(), candidates]
        with _disk_lock:
            _disk_cache()[key] = hit
            _disk_dirty = True
    return hit[0], frozenset(m for m in hit[1] if _source_file(m))


@functools.lru_cache(maxsize=None)
def closure(name: str) -> tuple[str, ...]:
    """``name`` and every project module it uses, transitively, sorted."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(_module_digest(mod)[1] - seen)
    return tuple(sorted(seen))


@functools.lru_cache(maxsize=None)
def fingerprint(name: str) -> str:
    """Hex digest of the normalised code of module ``name`` and the project modules it uses."""
    parts = {mod: _module_digest(mod)[0] for mod in closure(name)}
    _save_disk_cache()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def clear_cache() -> None:
    """Forget every digest held in this process (tests that edit source files; a long-lived process
    after a deploy). The disk cache is keyed by file content, so it never goes stale; it is re-read."""
    global _disk
    for f in (_source_file, _module_digest, closure, fingerprint):
        f.cache_clear()
    with _disk_lock:
        _disk = None
    importlib.invalidate_caches()


def module_name(module) -> str:
    """The importable module behind a stage: a ``Stage`` of the table (flows/stages.py) names it in
    ``module``; a stage module is its own (a synthetic ``corpus2model.tasks.validate[<stage>]`` module
    stands for tasks/validate.py); else the module of its run function."""
    declared = getattr(module, "module", None)
    name = declared if isinstance(declared, str) and declared else (getattr(module, "__name__", "") or "")
    name = name.split("[", 1)[0]
    if _source_file(name) is None:
        run = getattr(module, "run", None)
        name = getattr(run, "__module__", name)
    return name


def stage_fingerprint(module) -> str:
    """The fingerprint of a stage module object (what run_stage records in the manifest); "" for a
    module whose source cannot be found (e.g. a stage built in a test), which counts as unchanged."""
    try:
        return fingerprint(module_name(module))
    except (ModuleNotFoundError, OSError, SyntaxError):
        return ""


def on_code_change(cfg) -> str:
    """``runtime.on_code_change`` of a full config; "warn" for anything without a runtime section."""
    return getattr(getattr(cfg, "runtime", None), "on_code_change", "warn")


def code_changed(recorded: str | None, module) -> bool:
    """True when an entry records a fingerprint and the current code differs. Entries made before
    fingerprints existed record none and count as unchanged, so a warm store stays warm."""
    if not recorded:
        return False
    current = stage_fingerprint(module)
    return bool(current) and recorded != current


def recorded_fingerprint(folder: Path) -> str:
    """The fingerprint a stored entry's manifest.json records ("" when none or unreadable)."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8")).get("code_fingerprint") or ""
    except (OSError, ValueError):
        return ""


def check_entry(folder: Path, module, cfg) -> tuple[bool, str]:
    """For a verified cache entry: (still a hit, note). Unchanged code: (True, ""). Changed code:
    with on_code_change=warn (True, CODE_CHANGED_WARN); with rerun (False, CODE_CHANGED_RERUN).
    flows/plan.py calls this so that `c2m status` and `c2m run` name the stage."""
    if not code_changed(recorded_fingerprint(folder), module):
        return True, ""
    if on_code_change(cfg) == "rerun":
        return False, CODE_CHANGED_RERUN
    return True, CODE_CHANGED_WARN
