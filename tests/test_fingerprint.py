"""Code fingerprints of cache entries (tasks/common/fingerprint.py): comments, docstrings and layout do
not count, a code edit in a library the stage uses does; `c2m status` names the stage; with
runtime.on_code_change=rerun the entry is recomputed in place, with warn it is kept."""
from __future__ import annotations

import json
import sys
import textwrap
import types
import uuid

import pytest

from corpus2model.tasks.common import fingerprint as fp
from corpus2model.tasks.stage import Manifest, StageContext, Store, run_stage

STAGE_SRC = '''\
"""A stage in a throwaway package."""
from pathlib import Path

from corpus2model.tasks.stage import FileEntry, Manifest

STAGE = "toy"
VERSION = "1"
SECTIONS = ()


def run(inputs, cfg, out_dir: Path, ctx):
    from {pkg}.lib import make  # function-level import: followed too

    (out_dir / "out.txt").write_text(make())
    return Manifest(stage=STAGE, files=[FileEntry("out.txt")])
'''
LIB_SRC = '''\
def make():
    """The output."""
    return "one"  # a comment
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A package ``<pkg>`` with a stage module and the library it imports inside its run function."""
    pkg = f"c2m_fp_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / pkg
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "stage.py").write_text(STAGE_SRC.format(pkg=pkg))
    (root / "lib.py").write_text(LIB_SRC)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("C2M_CACHE_DIR", str(tmp_path / "cache"))  # the digests' disk cache
    fp.clear_cache()
    yield types.SimpleNamespace(pkg=pkg, lib=root / "lib.py", name=f"{pkg}.stage", cache=tmp_path / "cache")
    for m in [m for m in sys.modules if m.startswith(pkg)]:
        del sys.modules[m]
    fp.clear_cache()


def refingerprint(name: str) -> str:
    fp.clear_cache()
    return fp.fingerprint(name)


def test_normalised_ast_ignores_comments_docstrings_and_layout():
    a = 'def f(x):\n    """Doc."""\n    return x + 1  # note\n'
    b = "def f( x ):\n\n    # a new comment\n    return (x +\n            1)\n"
    c = "def f(x):\n    return x + 2\n"
    assert fp.normalised_ast(a) == fp.normalised_ast(b)
    assert fp.normalised_ast(a) != fp.normalised_ast(c)


def test_closure_follows_function_level_imports(toy):
    assert f"{toy.pkg}.lib" in fp.closure(toy.name)


def test_comment_docstring_format_edits_keep_the_fingerprint_a_code_edit_changes_it(toy):
    before = refingerprint(toy.name)
    toy.lib.write_text('# header comment\n\n\ndef make( ):\n    """Reworded."""\n    return (\n        "one"\n    )\n')
    assert refingerprint(toy.name) == before
    toy.lib.write_text(LIB_SRC.replace('"one"', '"two"'))
    assert refingerprint(toy.name) != before


def test_disk_cache_skips_the_parse_and_still_sees_a_same_size_edit(toy, monkeypatch):
    """A new process reuses the digests on disk (no AST work); an edit that keeps the file's size (and
    possibly its mtime: two writes within the clock tick) still changes the fingerprint, because the
    cache is keyed by the bytes' sha256, not by stat."""
    before = refingerprint(toy.name)
    assert list(toy.cache.glob("fingerprints-py*.json"))
    parsed = []
    real = fp.normalised_ast
    monkeypatch.setattr(fp, "normalised_ast", lambda src: parsed.append(src) or real(src))
    assert refingerprint(toy.name) == before and parsed == []  # every module from the disk cache
    toy.lib.write_text(LIB_SRC.replace('"one"', '"two"'))  # same size, same inode
    assert refingerprint(toy.name) != before and len(parsed) == 1  # only the edited module parsed again
    toy.cache.joinpath(next(toy.cache.glob("fingerprints-py*.json")).name).write_text("{not json")
    assert refingerprint(toy.name) != before  # a damaged cache file is recomputed, never trusted


def test_project_fingerprints_are_stable_and_differ_per_stage():
    fp.clear_cache()
    a = fp.fingerprint("corpus2model.tasks.clean")
    fp.clear_cache()
    assert fp.fingerprint("corpus2model.tasks.clean") == a
    assert fp.fingerprint("corpus2model.tasks.dedup") != a
    assert "corpus2model.tasks.stage" in fp.closure("corpus2model.tasks.clean")
    # Stages of the table name their module; the boundary checks are tasks/validate/boundary.py
    from corpus2model.flows.stages import STAGES

    assert fp.module_name(STAGES["check_raw"]) == "corpus2model.tasks.validate.boundary"
    assert fp.stage_fingerprint(STAGES["clean"]) == a


def cfg_with(mode: str):
    return types.SimpleNamespace(runtime=types.SimpleNamespace(on_code_change=mode))


def test_run_stage_records_the_fingerprint_outside_the_key_and_rerun_recomputes(toy, tmp_path):
    import importlib

    mod = importlib.import_module(toy.name)
    ctx = StageContext(store=Store(tmp_path / "store"))
    first = run_stage(mod, [], cfg_with("warn"), ctx)
    assert first.code_fingerprint == fp.stage_fingerprint(mod) and first.code_fingerprint
    assert json.loads((first.dir / "manifest.json").read_text())["code_fingerprint"] == first.code_fingerprint
    assert fp.check_entry(first.dir, mod, cfg_with("warn")) == (True, "")

    toy.lib.write_text(LIB_SRC.replace('"one"', '"two"'))  # a code change without a VERSION bump
    fp.clear_cache()
    sys.modules.pop(f"{toy.pkg}.lib", None)
    assert fp.check_entry(first.dir, mod, cfg_with("warn")) == (True, fp.CODE_CHANGED_WARN)
    assert fp.check_entry(first.dir, mod, cfg_with("rerun")) == (False, fp.CODE_CHANGED_RERUN)

    kept = run_stage(mod, [], cfg_with("warn"), ctx)  # warn: the entry stays a hit
    assert kept.stats["cache"] == "hit" and (kept.dir / "out.txt").read_text() == "one"

    redone = run_stage(mod, [], cfg_with("rerun"), ctx)  # rerun: same key, recomputed in place
    assert redone.stats["cache"] == "computed" and redone.key == first.key and redone.dir == first.dir
    assert (redone.dir / "out.txt").read_text() == "two"
    assert Manifest.load(redone.dir).code_fingerprint == fp.stage_fingerprint(mod) != first.code_fingerprint
    assert fp.check_entry(redone.dir, mod, cfg_with("rerun")) == (True, "")
    assert run_stage(mod, [], cfg_with("rerun"), ctx).stats["cache"] == "hit"


def test_entries_without_a_fingerprint_count_as_unchanged(toy, tmp_path):
    import importlib

    mod = importlib.import_module(toy.name)
    ctx = StageContext(store=Store(tmp_path / "store"))
    m = run_stage(mod, [], cfg_with("rerun"), ctx)
    data = json.loads((m.dir / "manifest.json").read_text())
    del data["code_fingerprint"]  # an entry written before fingerprints existed
    (m.dir / "manifest.json").write_text(json.dumps(data))
    toy.lib.write_text(LIB_SRC.replace('"one"', '"two"'))
    fp.clear_cache()
    assert fp.check_entry(m.dir, mod, cfg_with("rerun")) == (True, "")
    assert run_stage(mod, [], cfg_with("rerun"), ctx).stats["cache"] == "hit"


def test_status_names_the_stage_whose_code_changed(tmp_path, capsys, monkeypatch):
    """A real ingest entry on the bundled sample; its manifest is made to record other code."""
    from corpus2model.flows.cli import main
    from corpus2model.flows.stages import STAGES
    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks.common.resources import data_path
    from corpus2model.tasks.ingest import scan_raw

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("news_54c6d850.txt", "news_c7273428.txt"):
        (raw / name).write_bytes(data_path("sample", "raw", "corpus", "news", name).read_bytes())
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: fp
        paths: {{raw: {raw}, store: {tmp_path / 'store'}, registry: {tmp_path / 'registry'}}}
        """))
    cfg = parse_config({"name": "fp", "paths": {"raw": str(raw), "store": str(tmp_path / "store"),
                                                "registry": str(tmp_path / "registry")}})
    store = Store(cfg.paths.store)
    entry = run_stage(STAGES["ingest"], [scan_raw(cfg.paths.raw, cfg.ingest.include, store)], cfg, StageContext(store=store))
    monkeypatch.chdir(tmp_path)

    def ingest_line(*extra) -> str:
        assert main(["status", str(config), *extra]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ingest "))

    assert "code changed" not in ingest_line() and " cached " in ingest_line()
    data = json.loads((entry.dir / "manifest.json").read_text())
    data["code_fingerprint"] = "0" * 24  # made by other code
    (entry.dir / "manifest.json").write_text(json.dumps(data))
    line = ingest_line()
    assert " cached " in line and fp.CODE_CHANGED_WARN in line
    line = ingest_line("--set", "runtime.on_code_change=rerun")
    assert " will run " in line and fp.CODE_CHANGED_RERUN in line
