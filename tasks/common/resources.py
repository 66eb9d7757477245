"""Where the project's own files are, in a checkout and in an installed wheel alike.

Data the code reads (thesaurus, LM reference text, expectation suites, the starter sample) is package
data found through importlib.resources, never a path relative to ``__file__``'s parents: in
site-packages those parents are not the repo. Caches that the code builds go to the user cache
directory (``C2M_CACHE_DIR``, else ``$XDG_CACHE_HOME/corpus2model``, else ``~/.cache/corpus2model``),
never beside the code, which may be read-only.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def package_path(package: str, *parts: str) -> Path:
    """A file or folder shipped in one of our packages, as a real path (the wheel is unzipped)."""
    return Path(str(files(package).joinpath(*parts)))


def data_path(*parts: str) -> Path:
    """A path under the shipped data/ folder (``corpus2model.data``)."""
    return package_path("corpus2model.data", *parts)


def suites_dir() -> Path:
    return package_path("corpus2model.schemas", "suites")


def cache_dir(*parts: str) -> Path:
    """A per-user cache folder for derived files (created on demand by the caller)."""
    base = os.environ.get("C2M_CACHE_DIR")
    if base:
        root = Path(base)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corpus2model"
    return root.joinpath(*parts)
