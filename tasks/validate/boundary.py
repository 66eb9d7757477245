"""The check_raw / check_clean / check_augment DAG nodes: what a stage declaration needs for each.

All three run the validate stage's implementation (``stage.run_boundary``) on their own boundary,
with the ``checks`` config section and their own suite file, and write reports only (no data
parts). Each is declared by plain pieces::

    c = CHECKS["raw"]
    c.stage        "check_raw"            the node (and store folder) name
    c.version      stage.VERSION          one implementation, one version for all boundaries
    c.sections     ("checks",)            hashed config sections
    c.upstream     ("source", "ingest")   upstream stages; the last one holds the records
    c.run(inputs, cfg, out_dir, ctx)      the stage function
    c.key_extra(cfg)                      {"suite_sha256": ...} (+ "pairs_suite_sha256" at clean and augment,
                                          which check the pairs too): editing a suite reruns the check

``boundary_module(name)`` wraps the same pieces as a module-like object (STAGE, VERSION, SECTIONS,
run, key_extra) for code that still takes a stage module; keys and outputs are the same either way.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

from corpus2model.tasks.stage import Manifest, StageContext, sha256_bytes
from corpus2model.tasks.validate.report import BOUNDARY_TITLES
from corpus2model.tasks.validate.stage import (BOUNDARIES, CHECK_SECTIONS, PAIRS_BOUNDARIES, VERSION, pairs_key_extra,
                                               run_boundary, suite_for)


@dataclass(frozen=True)
class BoundaryCheck:
    """One check_<boundary> node. Its cache key is (stage, version, the checks section, the suite's
    sha256, upstream keys): the same values the module-per-boundary form has always used."""

    boundary: str
    stage: str
    upstream: tuple[str, ...]
    version: str = VERSION
    sections: tuple[str, ...] = CHECK_SECTIONS

    @property
    def title(self) -> str:
        return BOUNDARY_TITLES[self.boundary]

    def run(self, inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
        return run_boundary(self.boundary, inputs, cfg, out_dir, ctx)

    def key_extra(self, cfg) -> dict:
        """``cfg`` holds the declared sections (stage_config): the suite file named by checks.<boundary>_suite,
        and the preference_pairs suite where this boundary runs it on the upstream's pairs."""
        extra = {"suite_sha256": sha256_bytes(suite_for(cfg.checks, self.boundary).read_bytes())}
        return {**extra, **pairs_key_extra()} if self.boundary in PAIRS_BOUNDARIES else extra


# Every boundary except the final one, which is the validate stage itself (stage.py).
CHECKS: dict[str, BoundaryCheck] = {
    b: BoundaryCheck(b, stage, ups) for b, (stage, _, ups) in BOUNDARIES.items() if b != "final"
}

_BOUNDARY_MODULES: dict[str, types.ModuleType] = {}


def boundary_module(boundary: str) -> types.ModuleType:
    """The check_<boundary> node as a stage module (STAGE, VERSION, SECTIONS, run, key_extra), for
    callers that take a module (run_stage, stage_key, flows/plan.module). Built from CHECKS."""
    if boundary not in CHECKS:
        raise KeyError(f"unknown validation boundary {boundary!r}; one of {list(CHECKS)}")
    if boundary not in _BOUNDARY_MODULES:
        c = CHECKS[boundary]
        mod = types.ModuleType(f"corpus2model.tasks.validate[{c.stage}]", f"{c.stage}: the {c.title} boundary check")
        mod.STAGE, mod.VERSION, mod.SECTIONS = c.stage, c.version, c.sections
        mod.run, mod.key_extra = c.run, c.key_extra
        _BOUNDARY_MODULES[boundary] = mod
    return _BOUNDARY_MODULES[boundary]
