"""``c2m init DIR``: a working folder for an installed corpus2model, with no checkout needed.

It writes ``DIR/c2m.yaml`` (the embedded demo config, ``configs/demo.yaml`` shipped as package data,
with its paths pointed inside DIR) and the bundled sample corpus (``corpus2model.data`` ``sample/``:
``raw/`` plus ``SOURCE.md``, ``licenses/`` and the ground-truth files), so that

    c2m init demo && cd demo && c2m run c2m.yaml

runs the demo from a plain ``pip install``.

Paths in ``c2m.yaml`` are relative (``raw``, ``store``, ``registry``), and every relative path in a
config is resolved against the working directory, so the config works when run from DIR (which is
what the next steps say) and the folder can be moved or copied as a whole. Everything a run writes
stays inside DIR: the store, the registry, and (flows/cli.py) ``.prefect/`` and ``.cache/huggingface``.
Derived caches (spaCy rules, LM reference counts) go to the user cache directory; nothing is
written beside the installed code.
"""
from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

CONFIG_NAME = "c2m.yaml"
# The demo's paths, as configs/demo.yaml writes them, and what they become inside DIR.
PATH_REWRITES = {"raw": ("data/sample/raw", "raw"), "store": ("data/store", "store"), "registry": ("data/registry", "registry")}


class InitError(RuntimeError):
    """DIR cannot be initialised (not empty without --force, or not a folder)."""


def demo_config_text() -> str:
    return files("corpus2model.configs").joinpath("demo.yaml").read_text(encoding="utf-8")


def starter_config(text: str | None = None) -> str:
    """The demo config with its paths relative to the working folder and a header that says so.
    Fails loudly if demo.yaml no longer has the paths it rewrites (rather than writing a config that
    reads the sample from a folder that does not exist)."""
    text = demo_config_text() if text is None else text
    for name, (old, new) in PATH_REWRITES.items():
        pattern = re.compile(rf"^(  {name}:\s*){re.escape(old)}(\s|$)", re.M)
        text, n = pattern.subn(lambda m, new=new: f"{m.group(1)}{new}{m.group(2)}", text)
        if n != 1:
            raise InitError(f"configs/demo.yaml has no 'paths.{name}: {old}' line to rewrite")
    text = text.replace("data/store/", "store/").replace("data/registry/", "registry/")  # the path comments
    text = text.replace("configs/demo.yaml", CONFIG_NAME).replace("(data/sample, with licences)", "(raw/, licences in licenses/)")
    header = (
        f"# Written by `c2m init`. Run from this folder: paths below are relative to the working directory,\n"
        f"# so the folder can be moved as a whole. raw/ is the bundled sample corpus (SOURCE.md, licenses/);\n"
        f"# add your own *.txt/*.jsonl/*.html files under raw/ and rerun: only new files are processed.\n#\n"
    )
    return header + text


def _copy_tree(src, dst: Path) -> int:
    """Copy a package-data folder (an importlib.resources Traversable, so a zipped install works too)."""
    n = 0
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name in ("__pycache__", "__init__.py"):
            continue
        if entry.is_dir():
            n += _copy_tree(entry, dst / entry.name)
        else:
            (dst / entry.name).write_bytes(entry.read_bytes())
            n += 1
    return n


def init(target: str | Path, force: bool = False) -> dict:
    """Write the starter config and the sample corpus into ``target``. Refuses a non-empty folder
    unless ``force`` (then it overwrites the files it writes and leaves others alone)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InitError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InitError(f"{target} is not empty; choose a new folder or pass --force to write into it")
    config = starter_config()
    target.mkdir(parents=True, exist_ok=True)
    n = _copy_tree(files("corpus2model.data").joinpath("sample"), target)
    (target / CONFIG_NAME).write_text(config, encoding="utf-8")
    return {"dir": str(target.resolve()), "config": str((target / CONFIG_NAME).resolve()), "files": n}
