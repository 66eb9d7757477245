"""Expectation suites as data: reading and checking a suite file, where a suite path resolves to,
which table a suite checks, and severities (the suite's own and config overrides).

A suite is a YAML list of ``{expectation, kwargs, severity, why}`` entries (records), or
``{table: preference_pairs, expectations: [...]}``. ``error`` failures stop the flow, ``warn`` ones
are reported. Great Expectations is imported here first (``import_gx``), so its analytics stay off
wherever the package is entered.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from corpus2model.tasks.common.resources import suites_dir
from corpus2model.tasks.stage import StageError

SEVERITIES = ("error", "warn")
# GE 1.x carries its own severity on each expectation; ours maps onto it so the suite page shows it.
_GX_SEVERITY = {"error": "critical", "warn": "warning"}
_ENTRY_KEYS = {"expectation", "kwargs", "severity", "why"}
TABLE_KINDS = ("records", "preference_pairs")


def import_gx():
    """Great Expectations, with no usage statistics leaving this machine (set before GE reads its config)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    return gx


@dataclass(frozen=True)
class SuiteEntry:
    index: int
    expectation: str
    kwargs: dict
    severity: str
    why: str
    suite_severity: str | None = None  # the suite's own severity when config overrode it

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def resolve_suite_path(suite: str | Path) -> Path:
    """A relative suite path is tried against the working directory, then against the suites shipped
    in the package (``schemas/suites/x.yaml`` or a bare ``x``), so a config written for a checkout
    also runs from an installed wheel."""
    p = Path(suite)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p]
        if p.parts[:2] == ("schemas", "suites") and len(p.parts) == 3:
            candidates.append(suites_dir() / p.name)
        if p.suffix == "" and len(p.parts) == 1:  # a bare name: one of ours, `--suite preference_pairs`
            candidates.append(suites_dir() / f"{p.name}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise StageError(
        f"expectation suite {suite} not found (tried {', '.join(str(c) for c in candidates)}): "
        "set validate.suite to a YAML suite file"
    )


def load_suite(path: Path) -> list[SuiteEntry]:
    """Read and check a suite file; a wrong entry raises StageError naming the file and its index."""
    from great_expectations.expectations.registry import get_expectation_impl

    import_gx()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"expectation suite {path}: cannot read it ({e})") from None
    except UnicodeDecodeError as e:  # a binary file given as --suite
        raise StageError(f"expectation suite {path}: not a UTF-8 YAML file (byte {e.start}); give a suite YAML") from None
    except yaml.YAMLError as e:
        raise StageError(f"expectation suite {path}: not valid YAML: {' '.join(str(e).split())}") from None
    data = _suite_body(path, data)[1]
    if not isinstance(data, list) or not data:
        raise StageError(f"expectation suite {path}: the top level must be a non-empty list of expectations")
    entries = []
    for i, item in enumerate(data):
        where = f"expectation suite {path}, entry {i}"
        if not isinstance(item, dict):
            raise StageError(f"{where}: must be a mapping with keys {sorted(_ENTRY_KEYS)}, got {type(item).__name__}")
        unknown = set(item) - _ENTRY_KEYS
        if unknown:
            raise StageError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
        name = item.get("expectation")
        if not isinstance(name, str) or not name:
            raise StageError(f"{where}: 'expectation' must name a Great Expectations expectation type")
        try:
            get_expectation_impl(name)
        except Exception:
            raise StageError(
                f"{where}: unknown expectation {name!r}; use a Great Expectations 1.x type in snake_case, "
                "e.g. expect_column_values_to_not_be_null"
            ) from None
        severity = item.get("severity")
        if severity not in SEVERITIES:
            raise StageError(f"{where} ({name}): severity must be one of {list(SEVERITIES)}, got {severity!r}")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise StageError(f"{where} ({name}): kwargs must be a mapping, got {type(kwargs).__name__}")
        why = item.get("why")
        if not isinstance(why, str) or not why.strip():
            raise StageError(f"{where} ({name}): 'why' must be a one-line reason for reviewers")
        entries.append(SuiteEntry(i, name, dict(kwargs), severity, why.strip()))
    return entries


def _suite_body(path, data) -> tuple[str, Any]:
    """A suite is a list of expectations (records), or ``{table: <kind>, expectations: [...]}``."""
    if isinstance(data, dict):
        unknown = set(data) - {"table", "expectations"}
        kind = data.get("table", "records")
        if unknown or kind not in TABLE_KINDS:
            raise StageError(f"expectation suite {path}: a mapping suite has keys 'table' (one of {list(TABLE_KINDS)}) "
                             f"and 'expectations' (the list); got keys {sorted(data)} and table {kind!r}")
        return kind, data.get("expectations")
    return "records", data


def suite_kind(path: str | Path) -> str:
    """Which table a suite checks: "records" (RECORD_SCHEMA rows) or "preference_pairs"."""
    try:
        return _suite_body(path, yaml.safe_load(Path(path).read_text(encoding="utf-8")))[0]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "records"  # load_suite reports the real problem


def apply_severity(entries: list[SuiteEntry], overrides: dict | None, boundary: str) -> list[SuiteEntry]:
    """Config can relax (or tighten) one expectation without editing the reviewed suite: keys are
    ``<expectation>:<column>`` (every boundary) or ``<boundary>:<expectation>:<column>``; ``table``
    names a table-level expectation's column. Raises ValueError for a key that matches nothing."""
    if not overrides:
        return entries
    out, used = [], set()
    for e in entries:
        sev = e.severity
        for key in (f"{e.expectation}:{e.column or 'table'}", f"{boundary}:{e.expectation}:{e.column or 'table'}"):
            if key in overrides:
                sev = overrides[key]
                used.add(key)
        out.append(dataclasses.replace(e, severity=sev, suite_severity=e.severity) if sev != e.severity else e)
    # A boundary-prefixed key must match its suite (a typo would otherwise relax nothing, silently);
    # an unprefixed key may belong to another boundary's suite.
    stale = [k for k in overrides if k not in used and k.count(":") == 2 and k.split(":", 1)[0] == boundary]
    if stale:
        names = sorted({f"{e.expectation}:{e.column or 'table'}" for e in entries})
        raise ValueError(f"{overrides_field(boundary)} {stale} match no expectation of the {boundary} suite; "
                         f"keys look like one of {names} (optionally prefixed by the boundary, e.g. raw:)")
    return out


def overrides_field(boundary: str) -> str:
    """Where a boundary's severity overrides live in the config."""
    if boundary == "pairs":
        return "the severity_overrides argument (or validate.severity_overrides for c2m validate)"
    return "checks.severity_overrides" if boundary in ("raw", "clean", "augment") else "validate.severity_overrides"


def gx_expectation(entry: SuiteEntry, path: Path):
    from great_expectations.expectations.registry import get_expectation_impl

    cls = get_expectation_impl(entry.expectation)
    extra: dict[str, Any] = {"notes": f"[{entry.severity}] {entry.why}",
                             "meta": {"severity": entry.severity, "why": entry.why, "suite_index": entry.index}}
    if "severity" in getattr(cls, "__fields__", {}):
        extra["severity"] = _GX_SEVERITY[entry.severity]
    try:
        return cls(**entry.kwargs, **extra)
    except Exception as e:  # pydantic's message names the bad argument
        msg = " ".join(str(e).split())
        raise StageError(f"expectation suite {path}, entry {entry.index} ({entry.expectation}): bad kwargs: {msg}") from None


_SUITE_BOUNDARY = {"raw_documents": "raw", "cleaned_records": "clean", "augmented_records": "augment",
                   "preference_pairs": "pairs"}


def suite_boundary(suite_path: str | Path) -> str:
    """The boundary a suite file belongs to (for severity_overrides prefixes and report titles)."""
    return _SUITE_BOUNDARY.get(Path(suite_path).stem, "final")
