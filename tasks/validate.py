"""validate: check training records against an expectation suite (Great Expectations 1.x).

The suite is data (``schemas/suites/training_records.yaml``): each entry names a GE expectation,
its kwargs, a severity and a one-line reason. ``error`` failures stop the flow before any
downstream stage runs (``ValidationFailed``, with the report copied to
``<store>/reports/validate-failed-<hash>/`` because the stage's own folder is discarded on error);
``warn`` failures are recorded and the run continues. Validation never drops records: the data
parts pass through as hard links, and failing rows are *copied* to ``failing_rows.parquet``
(quarantine schema, one row per failing record and expectation) so a person can look at them.

Outputs in the stage folder::

    parts/<upstream part name>.parquet   role data        the upstream parts, hard-linked, unchanged
    failing_rows.parquet                 role quarantine  reason "expectation:<type>:<column>", detail = severity
    report.json / report.md              role report      per-expectation results with severities
    data_docs/index.html, ...            role report      GE Data Docs, post-processed to read offline

GE's Data Docs pull Bootstrap, jQuery, Font Awesome and vega from CDNs and fill the index table
with JavaScript, so offline they render as an empty, unstyled page. We strip every remote
stylesheet/script (and GE's tracking logo), inline a small stylesheet, drop the unused static
assets (3.6 MB of GIFs and fonts per run) and write our own ``index.html``: the summary table with
severities and reasons, linking GE's validation-result and suite pages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import logging
import numbers
import os
import re
import shutil
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from corpus2model.schemas.records import METADATA_FIELDS, QUARANTINE_SCHEMA, RECORD_SCHEMA, quarantine_row
from corpus2model.tasks.common.artifacts import publish_link, publish_markdown
from corpus2model.tasks.common.resources import suites_dir
from corpus2model.tasks.stage import (
    FileEntry,
    Manifest,
    StageContext,
    StageError,
    canonical_json,
    link_or_copy,
    sha256_bytes,
)

STAGE = "validate"
VERSION = "2"
SECTIONS = ("validate",)

SEVERITIES = ("error", "warn")
# GE 1.x carries its own severity on each expectation; ours maps onto it so the suite page shows it.
_GX_SEVERITY = {"error": "critical", "warn": "warning"}
_ENTRY_KEYS = {"expectation", "kwargs", "severity", "why"}
SUITE_NAME = "training_records"
# Long unexpected values (a 120k-character input) would otherwise be copied into the HTML verbatim.
_MAX_HTML_TEXT = 300


class ValidationFailed(StageError):
    """At least one error-severity expectation failed; the message names the surviving report.
    ``report`` is the ValidationReport (None for a drift failure), ``folder`` where it was written."""

    def __init__(self, message: str, report: "ValidationReport | None" = None, folder: Path | None = None):
        super().__init__(message)
        self.report = report
        self.folder = folder

    def failing_ids(self, severity: str = "error") -> list[str]:
        """Ids of the records/pairs that failed an expectation of this severity (to drop or fix them)."""
        if self.report is None:
            return []
        return sorted({i for r in self.report.failed(severity) for i in r.failing_ids if i is not None})

    def __reduce__(self):  # Prefect pickles task exceptions; keep the message, drop the report
        return (type(self), (str(self),))


# ---------------------------------------------------------------------------------------------
# the suite as data
# ---------------------------------------------------------------------------------------------
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


def key_extra(cfg) -> dict:
    """The suite's bytes are part of the cache key: editing the suite reruns validation."""
    path = resolve_suite_path(cfg.validate.suite)
    return {"suite_sha256": sha256_bytes(path.read_bytes())}


def load_suite(path: Path) -> list[SuiteEntry]:
    """Read and check a suite file; a wrong entry raises StageError naming the file and its index."""
    from great_expectations.expectations.registry import get_expectation_impl

    _import_gx()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"expectation suite {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise StageError(f"expectation suite {path}: not valid YAML: {e}") from None
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


TABLE_KINDS = ("records", "preference_pairs")


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
    except (OSError, yaml.YAMLError):
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
        raise ValueError(f"{_overrides_field(boundary)} {stale} match no expectation of the {boundary} suite; "
                         f"keys look like one of {names} (optionally prefixed by the boundary, e.g. raw:)")
    return out


def _overrides_field(boundary: str) -> str:
    """Where a boundary's severity overrides live in the config."""
    if boundary == "pairs":
        return "the severity_overrides argument (or validate.severity_overrides for c2m validate)"
    return "checks.severity_overrides" if boundary in ("raw", "clean", "augment") else "validate.severity_overrides"


def _gx_expectation(entry: SuiteEntry, path: Path):
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


# ---------------------------------------------------------------------------------------------
# the table GE sees
# ---------------------------------------------------------------------------------------------
def records_frame(data) -> "pd.DataFrame":  # noqa: F821
    """Records (a RECORD_SCHEMA pyarrow Table or a DataFrame with a ``metadata`` column of dicts)
    -> a DataFrame with ``metadata`` flattened into ``metadata_<field>`` columns, rows 0..n-1."""
    import pandas as pd

    if isinstance(data, pa.Table):
        cols = {name: data.column(name).to_pandas() for name in ("id", "input", "target") if name in data.column_names}
        if "metadata" in data.column_names:
            md = data.column("metadata").combine_chunks()
            for i, f in enumerate(md.type):
                cols[f"metadata_{f.name}"] = md.field(i).to_pandas()
        df = pd.DataFrame(cols)
    elif isinstance(data, pd.DataFrame):
        df = data.reset_index(drop=True)
        if "metadata" in df.columns:
            md = pd.DataFrame([m if isinstance(m, dict) else {} for m in df["metadata"]], index=df.index)
            md.columns = [f"metadata_{c}" for c in md.columns]
            df = pd.concat([df.drop(columns=["metadata"]), md], axis=1)
    else:
        raise TypeError(f"validate_table needs a pyarrow Table or a pandas DataFrame, got {type(data).__name__}")
    # Every known metadata field exists (all-null if absent) so suites can name it on any input.
    for name, _ in METADATA_FIELDS:
        if f"metadata_{name}" not in df.columns:
            df[f"metadata_{name}"] = None
    df = df.reset_index(drop=True)
    _derive_record_columns(df)
    return df


RAW_COLUMNS = ("raw_id_type", "raw_metadata_absent", "raw_metadata_missing_fields", "raw_extra_keys")
REQUIRED_SFT_METADATA = ("task_type", "domain", "source")
_SFT_KEYS = {"id", "input", "target", "metadata", "lang"}
_TEXT_KEYS = {"id", "text", "metadata", "lang"}


def _derive_record_columns(df) -> None:
    """Columns no stage stores but suites check: ``source_record`` (one original record per source id
    and file; record ids are content hashes and cannot show it), ``aug_parent_missing`` (an augmented
    record whose original is not in the table) and the raw_* columns (null unless filled from raw files)."""
    original = df["metadata_parent_id"].isna() & df["metadata_aug_method"].isna()
    has_sid = df["metadata_source_id"].notna() & original
    df["source_record"] = None
    if has_sid.any():
        df.loc[has_sid, "source_record"] = (
            df.loc[has_sid, "metadata_source_path"].fillna("?").astype(str) + "#" + df.loc[has_sid, "metadata_source_id"].astype(str)
        )
    ids = set(df["id"].dropna())
    augmented = df["metadata_aug_method"].notna()
    parents = df["metadata_parent_id"]
    missing = augmented & (parents.isna() | ~parents.isin(ids))
    df["aug_parent_missing"] = None
    if missing.any():
        df.loc[missing, "aug_parent_missing"] = parents[missing].fillna("(null)")
    for name in RAW_COLUMNS:
        if name not in df.columns:
            df[name] = None


def raw_shape(obj) -> dict:
    """What a raw JSON record says that ingest does not keep: the id's JSON type, a missing metadata
    object or required field (ingest fills defaults), and keys it does not map (ingest drops them)."""
    if not isinstance(obj, dict):
        return {}
    sft = "input" in obj or "target" in obj
    out: dict[str, Any] = {"raw_id_type": _json_type(obj["id"]) if "id" in obj else None}
    md = obj.get("metadata")
    if sft and "metadata" not in obj:
        out["raw_metadata_absent"] = "metadata"
    elif sft and isinstance(md, dict):
        gone = [f for f in REQUIRED_SFT_METADATA if f not in md]
        out["raw_metadata_missing_fields"] = ",".join(gone) or None
    extra = sorted(set(obj) - (_SFT_KEYS if sft else _TEXT_KEYS))
    out["raw_extra_keys"] = ",".join(extra) or None
    return out


def _json_type(v) -> str:
    return {str: "str", bool: "bool", int: "int", float: "float", list: "list", dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def raw_shapes(data: bytes, rel: str) -> dict[int, dict]:
    """source_line -> raw_shape for one raw JSON/JSONL file (optionally .gz), numbered the way ingest
    numbers them (physical 1-based lines; items of a .json array). Unreadable lines are skipped:
    ingest already quarantined them with their reason. Non-JSON files give {}."""
    import gzip

    from corpus2model.tasks.ingest import JSON_EXT

    name = rel.lower()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return {}
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    if ext not in JSON_EXT:
        return {}
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: dict[int, dict] = {}
    if ext == ".json":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        for i, item in enumerate(obj if isinstance(obj, list) else [obj], start=1):
            out[i] = raw_shape(item)
        return out
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out[i] = raw_shape(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return out


def raw_columns(table: pa.Table, read_raw) -> dict[str, list]:
    """The raw_* columns for records, row-aligned: ``read_raw(source_path) -> bytes | None`` reads
    each raw file once (None: not available, e.g. a record Parquet validated on its own)."""
    if "metadata" not in table.column_names or table.num_rows == 0:
        return {}
    md = table.column("metadata").combine_chunks()
    paths = md.field("source_path").to_pylist()
    lines = md.field("source_line").to_pylist()
    shapes: dict[str, dict[int, dict]] = {}
    for rel in sorted({p for p in paths if p}):
        data = read_raw(rel)
        shapes[rel] = raw_shapes(data, rel) if data is not None else {}
    cols: dict[str, list] = {name: [] for name in RAW_COLUMNS}
    for rel, line in zip(paths, lines):
        shape = shapes.get(rel, {}).get(line, {}) if rel and line is not None else {}
        for name in RAW_COLUMNS:
            cols[name].append(shape.get(name))
    return cols


def file_reader(root: Path):
    """``read_raw`` for raw_columns: files below ``root`` by their source_path, None when absent."""
    root = Path(root)

    def read(rel: str) -> bytes | None:
        p = root / rel
        return p.read_bytes() if p.is_file() else None

    return read


PAIR_TEXT = ("prompt", "chosen", "rejected")


def pairs_frame(data) -> "pd.DataFrame":  # noqa: F821
    """Preference pairs (a pyarrow Table, DataFrame, list of dicts or a JSONL path) -> the frame the
    preference_pairs suite sees: id, prompt, chosen, rejected, metadata_<key>, chosen_equals_rejected."""
    import pandas as pd

    if isinstance(data, (str, Path)):
        data = read_pairs(data)
    if isinstance(data, pa.Table):
        data = data.to_pylist()
    if isinstance(data, pd.DataFrame):
        data = data.to_dict("records")
    if not isinstance(data, list):
        raise TypeError(f"preference pairs must be a path, pyarrow Table, DataFrame or list of dicts, got {type(data).__name__}")
    rows = []
    for obj in data:
        row = {k: obj.get(k) for k in ("id", *PAIR_TEXT)}
        for k, v in (obj.get("metadata") or {}).items():
            row[f"metadata_{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["id", *PAIR_TEXT])
    for k in ("id", *PAIR_TEXT):
        if k not in df.columns:
            df[k] = None
    df["chosen_equals_rejected"] = [c is not None and c == r for c, r in zip(df["chosen"], df["rejected"])]
    return df


def read_pairs(path: str | Path) -> list[dict]:
    """A preference-pairs JSONL (optionally .gz); a line that is not a JSON object is a clear error."""
    import gzip

    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    out = []
    for i, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}:{i}: not valid JSON ({e}); preference pairs are one JSON object a line") from None
        if not isinstance(obj, dict):
            raise StageError(f"{path}:{i}: a preference pair must be a JSON object with prompt/chosen/rejected")
        out.append(obj)
    return out


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------
@dataclass
class ExpectationResult:
    index: int  # position in the suite file
    expectation: str
    column: str | None
    severity: str
    success: bool
    unexpected_count: int
    unexpected_percent: float | None
    why: str
    suite_severity: str | None = None  # the suite's own severity when config overrode it
    kwargs: dict = field(default_factory=dict)
    observed_value: Any = None
    failing_rows: list[int] = field(default_factory=list)  # row positions, first max_failing_rows
    failing_ids: list[str | None] = field(default_factory=list)
    # "<source_path>:<line>" of the first failing rows, where records know it: what a person opens.
    failing_where: list[str] = field(default_factory=list)
    exception: str | None = None

    @property
    def reason(self) -> str:
        return f"expectation:{self.expectation}:{self.column or 'table'}"


@dataclass
class ValidationReport:
    suite: str
    suite_sha256: str
    rows: int
    results: list[ExpectationResult]
    docs_index: Path | None = None
    docs_pages: dict[str, str] = field(default_factory=dict)  # "validation"/"suite" -> path relative to docs
    boundary: str = "final"
    kind: str = "records"
    profile: dict = field(default_factory=dict)  # distribution statistics (profile()), compared run to run
    drift: list = field(default_factory=list)  # DriftResult, filled by the flow (compare_profiles)
    upstream_rejected: dict = field(default_factory=dict)  # raw boundary: ingest's unreadable lines by reason

    def failed(self, severity: str) -> list[ExpectationResult]:
        return [r for r in self.results if not r.success and r.severity == severity]

    @property
    def error_failed(self) -> int:
        return len(self.failed("error"))

    @property
    def warn_failed(self) -> int:
        return len(self.failed("warn"))

    @property
    def success(self) -> bool:
        """True when no error-severity expectation failed (warnings do not stop the flow)."""
        return self.error_failed == 0

    def to_dict(self) -> dict:
        return {
            "suite": self.suite,
            "suite_sha256": self.suite_sha256,
            "rows": self.rows,
            "success": self.success,
            "expectations": len(self.results),
            "error_failed": self.error_failed,
            "warn_failed": self.warn_failed,
            "results": [
                {**dataclasses.asdict(r), "reason": r.reason, "observed_value": _jsonable(r.observed_value)}
                for r in self.results
            ],
        }

    def to_markdown(self) -> str:
        status = "passed" if self.success else "FAILED"
        lines = [
            f"## Validation {status}: {BOUNDARY_TITLES.get(self.boundary, self.boundary)}, suite `{Path(self.suite).name}` "
            f"on {self.rows} {'pairs' if self.kind == 'preference_pairs' else 'records'}",
            "",
            f"{len(self.results)} expectations; {self.error_failed} error-severity and "
            f"{self.warn_failed} warn-severity failed.",
            "",
            "| expectation | column | severity | result | unexpected |",
            "|---|---|---|---|---|",
        ]
        for r in self.results:
            lines.append(
                f"| {_md(r.expectation)} | {_md(r.column or '(table)')} | {r.severity} | "
                f"{_result_word(r)} | {_unexpected_text(r)} |"
            )
        failed = [r for r in self.results if not r.success]
        if failed:
            lines += ["", "Failing expectations:", ""]
            for r in failed:
                ids = ", ".join(f"`{i}`" for i in _first_ids(r))
                more = f" (first ids: {ids})" if ids else ""
                if r.failing_where:
                    more += f"; first rows: {_where_text(r.failing_where)}"
                if r.suite_severity:
                    more += f" [suite severity {r.suite_severity}, overridden by config]"
                lines.append(f"- **{r.severity}** `{r.expectation}` on `{r.column or 'table'}`: {_md(r.why)}{more}")
        if self.upstream_rejected:
            lines += ["", f"Lines ingest could not read ({sum(self.upstream_rejected.values())}, quarantined by ingest): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(self.upstream_rejected.items(), key=lambda kv: -kv[1]))]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# distribution checks against the last successful run
# ---------------------------------------------------------------------------------------------
def profile(df) -> dict:
    """What a boundary's data looks like, small enough to keep per run: row count, task_type mix and
    the length distribution (characters of input+target, or prompt+chosen for pairs) as a histogram
    over power-of-two bins plus quantiles. Bins make a KS statistic possible without the rows."""
    import numpy as np

    if "target" in df.columns:
        lengths = df["input"].fillna("").str.len() + df["target"].fillna("").str.len()
    elif "prompt" in df.columns:
        lengths = df["prompt"].fillna("").str.len() + df["chosen"].fillna("").str.len()
    else:
        lengths = df.iloc[:0, 0]
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = np.floor(np.log2(lengths + 1)).astype(int) if len(lengths) else np.array([], dtype=int)
    hist = {str(b): int(n) for b, n in zip(*np.unique(bins, return_counts=True))}
    q = {f"p{int(p * 100)}": float(np.quantile(lengths, p)) for p in (0.1, 0.5, 0.9)} if len(lengths) else {}
    tt = df["metadata_task_type"].fillna("(none)").value_counts() if "metadata_task_type" in df.columns else {}
    return {"rows": int(len(df)), "task_types": {str(k): int(v) for k, v in dict(tt).items()},
            "length_hist": hist, "length_quantiles": q}


@dataclass
class DriftResult:
    check: str  # rows | length | task_type
    value: float
    threshold: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.value <= self.threshold


def _ks(a: dict, b: dict) -> float:
    """Two-sample KS statistic on the binned length distributions (max CDF gap over the bins)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    ca = cb = 0.0
    worst = 0.0
    for k in sorted({int(x) for x in (*a, *b)}):
        ca += a.get(str(k), 0) / na
        cb += b.get(str(k), 0) / nb
        worst = max(worst, abs(ca - cb))
    return worst


def _tvd(a: dict, b: dict) -> float:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def compare_profiles(prev: dict, cur: dict, vcfg) -> list[DriftResult]:
    """Row count change (fraction of the previous count), length-distribution KS statistic and
    task_type total variation distance, each against its validate.max_* threshold."""
    n0, n1 = prev.get("rows", 0), cur.get("rows", 0)
    change = abs(n1 - n0) / max(n0, 1)
    q0, q1 = prev.get("length_quantiles", {}), cur.get("length_quantiles", {})
    medians = f"median {q0.get('p50', 0):.0f} → {q1.get('p50', 0):.0f} chars, p90 {q0.get('p90', 0):.0f} → {q1.get('p90', 0):.0f}"
    t0, t1 = prev.get("task_types", {}), cur.get("task_types", {})
    shift = sorted(set(t0) | set(t1), key=lambda k: -abs(t1.get(k, 0) / max(n1, 1) - t0.get(k, 0) / max(n0, 1)))[:3]
    mix = ", ".join(f"{k} {t0.get(k, 0) / max(n0, 1):.0%} → {t1.get(k, 0) / max(n1, 1):.0%}" for k in shift)
    return [
        DriftResult("rows", round(change, 4), vcfg.max_row_change, f"{n0} → {n1} rows ({(n1 - n0) / max(n0, 1):+.1%})"),
        DriftResult("length", round(_ks(prev.get("length_hist", {}), cur.get("length_hist", {})), 4), vcfg.max_length_ks,
                    f"KS statistic over log2 length bins; {medians}"),
        DriftResult("task_type", round(_tvd(t0, t1), 4), vcfg.max_task_type_tvd, f"total variation distance; {mix}"),
    ]


def stats_path(store_root: Path, name: str, boundary: str) -> Path:
    return Path(store_root) / "_stats" / name / f"{boundary}.json"


def drift_markdown(boundary: str, results: list[DriftResult], prev_at: str | None, severity: str) -> str:
    if prev_at is None:
        return f"### Distribution checks ({boundary})\n\nno previous run: these statistics become the baseline once this run succeeds.\n"
    lines = [f"### Distribution checks ({boundary}) against the last successful run ({prev_at})", "",
             f"Severity `{severity}`.", "", "| check | value | threshold | result | detail |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check} | {r.value:.3f} | {r.threshold:.3f} | {'pass' if r.ok else 'DRIFT'} | {_md(r.detail)} |")
    return "\n".join(lines) + "\n"


def check_drift(store_root: Path, name: str, boundary: str, manifest, vcfg) -> tuple[list[DriftResult], str]:
    """Compare a boundary's profile with the last successful run of config ``name``; publish the
    result as a markdown artifact; raise ValidationFailed when validate.drift_severity is error and a
    threshold is exceeded. Returns (results, a one-line note for the run summary)."""
    cur = (manifest.stats or {}).get("profile")
    if not cur:
        return [], ""
    path = stats_path(store_root, name, boundary)
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        prev = None
    results = compare_profiles(prev["profile"], cur, vcfg) if prev else []
    md = drift_markdown(boundary, results, prev.get("at") if prev else None, vcfg.drift_severity)
    drifted = [r for r in results if not r.ok]
    publish_markdown(f"drift-{boundary}", md, description=f"{len(drifted)} distribution check(s) exceeded" if drifted else "")
    if prev is None:
        note = "drift: no previous run"
    else:
        note = "drift: " + ", ".join(f"{r.check} {r.value:.2f}{'!' if not r.ok else ''}" for r in results)
    if drifted and vcfg.drift_severity == "error":
        raise ValidationFailed(
            f"distribution drift at the {boundary} boundary against the last successful run of {name!r}: "
            + "; ".join(f"{r.check} {r.value:.3f} > {r.threshold} ({r.detail})" for r in drifted)
            + ". If the change is intended, run once with validate.drift_severity=warn to make this the new baseline."
        )
    return results, note


def save_stats(store_root: Path, name: str, manifests: dict) -> list[Path]:
    """After a successful run: each boundary's profile becomes the baseline the next run compares with."""
    from corpus2model.tasks.stage import write_json_atomic

    written = []
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for stage, m in manifests.items():
        prof = (getattr(m, "stats", None) or {}).get("profile")
        boundary = (m.stats or {}).get("boundary")
        if prof and boundary:
            path = stats_path(store_root, name, boundary)
            write_json_atomic(path, {"at": at, "stage": stage, "key": m.key, "profile": prof})
            written.append(path)
    return written


def _first_ids(r: ExpectationResult, n: int = 5) -> list:
    # A duplicated id fails on every copy; list it once.
    return list(dict.fromkeys(r.failing_ids))[:n]


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _result_word(r: ExpectationResult) -> str:
    if r.exception:
        return "error (exception)"
    return "pass" if r.success else "FAIL"


def _unexpected_text(r: ExpectationResult) -> str:
    if r.unexpected_percent is not None:
        return f"{r.unexpected_count} ({r.unexpected_percent:.2f}%)"
    if r.observed_value is not None:
        return f"observed {_md(_short(r.observed_value))}"
    return str(r.unexpected_count)


def _short(v, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# running Great Expectations
# ---------------------------------------------------------------------------------------------
def _import_gx():
    # No usage statistics leave this machine (set before GE reads its config).
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    return gx


@contextlib.contextmanager
def _quiet():
    """GE logs config chatter at INFO/WARNING; the stage reports through its own outputs."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def validate_table(data, suite_path: str | Path, docs_dir: Path | None = None,
                   max_failing_rows: int = 1000, *, raw: dict[str, list] | None = None,
                   severity_overrides: dict | None = None, boundary: str = "final",
                   upstream_rejected: dict | None = None) -> ValidationReport:
    """Validate records (pyarrow Table or DataFrame) or, for a ``table: preference_pairs`` suite,
    preference pairs against a suite file; write Data Docs to ``docs_dir`` (``index.html`` there)
    when given. ``raw`` holds row-aligned raw_* columns (raw_columns). Pure: reads nothing else,
    writes only docs_dir."""
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_path = Path(suite_path)
    entries = apply_severity(load_suite(suite_path), severity_overrides, boundary)
    kind = suite_kind(suite_path)
    df = pairs_frame(data) if kind == "preference_pairs" else records_frame(data)
    for name, values in (raw or {}).items():
        if len(values) != len(df):
            raise ValueError(f"raw column {name} has {len(values)} values for {len(df)} rows")
        df[name] = values
    for e in entries:
        for col in [e.kwargs.get("column"), *(e.kwargs.get("column_list") or [])]:
            if col is not None and col not in df.columns:
                raise StageError(
                    f"expectation suite {suite_path}, entry {e.index} ({e.expectation}): column {col!r} is not in "
                    f"the {kind} table; columns: {', '.join(df.columns)}"
                )

    with tempfile.TemporaryDirectory(prefix="c2m-gx-") as tmp, _quiet():
        # A throwaway file context: nothing of GE's state outlives the call or leaks between runs.
        context = gx.get_context(mode="file", project_root_dir=tmp)
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        suite = gx.ExpectationSuite(name=suite_path.stem, meta={"source_file": str(suite_path), "boundary": boundary})
        for e in entries:
            suite.add_expectation(_gx_expectation(e, suite_path))
        suite = context.suites.add_or_update(suite)
        batch_def = (
            context.data_sources.add_or_update_pandas("records")
            .add_dataframe_asset("records")
            .add_batch_definition_whole_dataframe("all")
        )
        vdef = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name="records", data=batch_def, suite=suite)
        )
        actions = [UpdateDataDocsAction(name="data_docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name="validate",
                validation_definitions=[vdef],
                actions=actions,
                # COMPLETE gives every failing row index (we keep max_failing_rows of them); the
                # sample values shown in Data Docs stay at 20 per expectation.
                result_format={"result_format": "COMPLETE", "partial_unexpected_count": 20,
                               "return_unexpected_index_query": False, "include_unexpected_rows": False},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name="validate"))
        (vres,) = run.run_results.values()
        results = _collect(vres.results, entries, df, max_failing_rows)
        report = ValidationReport(
            suite=str(suite_path),
            suite_sha256=sha256_bytes(suite_path.read_bytes()),
            rows=len(df),
            results=results,
            boundary=boundary,
            kind=kind,
            profile=profile(df),
            upstream_rejected=dict(upstream_rejected or {}),
        )
        if docs_dir is not None:
            site = Path(tmp) / "gx" / "uncommitted" / "data_docs" / "local_site"
            report.docs_pages = _publish_docs(site, Path(docs_dir), report)
            report.docs_index = Path(docs_dir) / "index.html"
    return report


def _collect(gx_results, entries: list[SuiteEntry], df, max_failing_rows: int) -> list[ExpectationResult]:
    by_index: dict[int, Any] = {}
    for r in gx_results:
        by_index[int((r.expectation_config.meta or {})["suite_index"])] = r
    ids = df["id"]
    out = []
    for e in entries:  # suite order, whatever order GE ran them in
        r = by_index[e.index]
        res = dict(r.result or {})
        # Row positions (the frame has a 0..n-1 index); multi-column expectations may report dicts.
        listed = [i for i in (res.get("unexpected_index_list") or []) if isinstance(i, numbers.Integral)]
        rows = [int(i) for i in listed[:max_failing_rows]]
        exc = None
        info = r.exception_info or {}
        if info.get("raised_exception"):
            exc = info.get("exception_message")
        elif isinstance(info, dict):
            # GE 1.x keys exception info by metric when several metrics fail.
            for v in info.values():
                if isinstance(v, dict) and v.get("raised_exception"):
                    exc = v.get("exception_message")
                    break
        out.append(
            ExpectationResult(
                index=e.index,
                expectation=e.expectation,
                column=e.column,
                severity=e.severity,
                suite_severity=e.suite_severity,
                success=bool(r.success),
                unexpected_count=int(res.get("unexpected_count") or 0),
                unexpected_percent=res.get("unexpected_percent"),
                why=e.why,
                kwargs=e.kwargs,
                observed_value=res.get("observed_value"),
                failing_rows=rows,
                failing_ids=[None if _isnull(ids.iat[i]) else str(ids.iat[i]) for i in rows],
                failing_where=_where(df, rows[:5]),
                exception=exc,
            )
        )
    return out


def _where_text(where: list[str]) -> str:
    """["a.jsonl:3", "a.jsonl:19", "b.txt"] -> "a.jsonl lines 3, 19; b.txt"."""
    groups: dict[str, list[str]] = {}
    for w in where:
        path, _, line = w.rpartition(":") if w.rpartition(":")[2].isdigit() else (w, "", "")
        groups.setdefault(path, []).append(line)
    return "; ".join(f"{p} line{'s' if len(ls) > 1 else ''} {', '.join(ls)}" if any(ls) else p for p, ls in groups.items())


def _where(df, rows: list[int]) -> list[str]:
    if "metadata_source_path" not in df.columns or "metadata_source_line" not in df.columns:
        return []
    out = []
    for i in rows:
        path, line = df["metadata_source_path"].iat[i], df["metadata_source_line"].iat[i]
        if not _isnull(path):
            out.append(f"{path}:{int(line)}" if not _isnull(line) else str(path))
    return out


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


# ---------------------------------------------------------------------------------------------
# Data Docs that read offline
# ---------------------------------------------------------------------------------------------
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;margin:0;background:#fff}
a{color:#0b5cad}
nav.navbar{padding:8px 24px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
.breadcrumb{list-style:none;display:flex;gap:6px;margin:0;padding:0}
.breadcrumb-item+.breadcrumb-item::before{content:"/";color:#6e7781;margin-right:6px}
.c2m-brand{font-weight:600}
.container-fluid{padding:12px 24px;box-sizing:border-box}
.row{display:flex;flex-wrap:wrap;gap:0}
.row>*{box-sizing:border-box;min-width:0;padding:4px 8px}
.col-12{flex:0 0 100%}.col-6{flex:0 0 50%}.col-4{flex:0 0 33.3%}.col-3{flex:0 0 25%}
.col-lg-2,.col-md-2{flex:0 0 18%}.col-lg-10,.col-md-10{flex:0 0 82%}
.sticky{position:sticky;top:8px}
.card{border:1px solid #d0d7de;border-radius:6px;margin-bottom:12px}
.card-header{background:#f6f8fa;padding:6px 10px;border-bottom:1px solid #d0d7de}
.card-body{padding:8px 10px}
.card:has(.btn-group-toggle),.btn-group,.btn-group-toggle,.ge-walkthrough-modal,.modal,footer,#ge-cta-footer{display:none!important}
.nav{list-style:none;padding:0;margin:0}.nav-link{display:block;padding:2px 4px;text-decoration:none}
.alert{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;margin:8px 0;background:#f6f8fa}
.alert-secondary{background:#eef1f4}
.ge-section{margin-bottom:24px}
table{border-collapse:collapse;margin:6px 0;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 8px;vertical-align:top;text-align:left}
thead th{background:#f6f8fa}
.show-scrollbars{max-height:240px;overflow:auto;word-break:break-word}
code,pre,.code-snippet{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;background:#f6f8fa;padding:1px 4px;border-radius:4px}
.badge,.badge-info,.badge-secondary{font-family:ui-monospace,monospace;font-size:12px;background:#eaeef2;border-radius:4px;padding:0 4px}
.text-danger{color:#cf222e}.text-success{color:#1a7f37}.text-warning{color:#9a6700}.text-muted{color:#6e7781}
.fas,.fa{font-style:normal}
.fa-check-circle::before,.fa-check::before{content:"\\2714 "}
.fa-times-circle::before,.fa-times::before{content:"\\2718 "}
.fa-exclamation-triangle::before{content:"\\26A0 "}
.fa-question-circle{display:none}
.cooltip{position:relative}.cooltip .top{display:none;position:absolute;z-index:10;background:#24292f;color:#fff;padding:6px 10px;border-radius:6px;white-space:pre-wrap;min-width:240px}
.cooltip:hover .top{display:block}
.c2m-truncated{color:#6e7781;font-style:italic}
.c2m-fail{color:#cf222e;font-weight:600}.c2m-pass{color:#1a7f37}
.c2m-sev-error{font-weight:600}.c2m-sev-warn{color:#9a6700}
.c2m-bar{display:inline-block;height:10px;background:#0b5cad;border-radius:2px}
"""

_REMOTE_LINK = re.compile(r"<link\b[^>]*>", re.I)
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script\s*>", re.I | re.S)
_STYLE_TAG = re.compile(r"<style\b[^>]*>.*?</style\s*>", re.I | re.S)
_FOOTER = re.compile(r"<footer\b.*?</footer\s*>", re.I | re.S)
_REMOTE_IMG = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']https?://[^>]*>", re.I)
_LONG_TEXT = re.compile(r">([^<]{%d,})<" % (_MAX_HTML_TEXT + 1))
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")


def offline_html(page: str) -> str:
    """Make one GE Data Docs page self-contained: no CDN CSS/JS, no remote images, our stylesheet."""
    page = _SCRIPT.sub("", page)  # every script needs jQuery/Bootstrap from a CDN
    page = _REMOTE_LINK.sub("", page)  # CDN stylesheets and the favicon from static/
    page = _STYLE_TAG.sub("", page)  # GE's overrides assume Bootstrap; ours replaces them
    page = _FOOTER.sub("", page)  # newsletter and tutorial banners
    # GE's logo is fetched from S3 with the data context id in the query string.
    page = _REMOTE_IMG.sub('<span class="c2m-brand">Great Expectations Data Docs</span>', page)

    def _trim(m: re.Match) -> str:
        text = m.group(1)
        if not text.strip():
            return m.group(0)
        head = text[:_MAX_HTML_TEXT]
        amp = head.rfind("&")
        if amp >= 0 and ";" not in head[amp:]:
            head = head[:amp]  # do not cut an entity such as &amp; in half
        return f'>{head}<span class="c2m-truncated">… ({len(text)} characters, truncated)</span><'

    page = _LONG_TEXT.sub(_trim, page)
    # The failing values themselves may hold NUL, ESC, zero-width marks: show them, do not emit them.
    page = _INVISIBLE.sub(lambda m: f"[U+{ord(m.group(0)):04X}]", page)
    return re.sub(r"<head\b[^>]*>", lambda m: f"{m.group(0)}\n<style>{_STYLE}</style>", page, count=1, flags=re.I)


def _publish_docs(site: Path, docs_dir: Path, report: ValidationReport) -> dict[str, str]:
    """Post-process GE's site into ``docs_dir`` and write our index; returns the GE pages' paths."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    pages: dict[str, str] = {}
    for src in sorted(site.rglob("*.html")):
        rel = src.relative_to(site)
        if rel.as_posix() == "index.html":
            continue  # GE's index is an empty JS table offline; ours below replaces it
        dst = docs_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(offline_html(src.read_text(encoding="utf-8")), encoding="utf-8")
        if rel.parts[0] == "validations":
            pages["validation"] = rel.as_posix()
        elif rel.parts[0] == "expectations":
            pages["suite"] = rel.as_posix()
    (docs_dir / "index.html").write_text(_index_html(report, pages), encoding="utf-8")
    return pages


def _index_html(report: ValidationReport, pages: dict[str, str]) -> str:
    e = html.escape
    status = "passed" if report.success else "FAILED"
    noun = "pairs" if report.kind == "preference_pairs" else "records"
    rows = []
    for r in report.results:
        word = _result_word(r)
        cls = "c2m-pass" if r.success else "c2m-fail"
        kwargs = ", ".join(f"{k}={_kwarg_text(v)}" for k, v in r.kwargs.items() if k != "column")
        sample = ", ".join(e(str(i)) for i in _first_ids(r))
        where = _where_text(r.failing_where)
        if where:
            sample += f"<br>first rows: {e(where)}"
        relaxed = (f"<br><span class=\"text-muted\">suite says {r.suite_severity}; set by "
                   f"{_overrides_field(report.boundary)}</span>") if r.suite_severity else ""
        rows.append(
            f"<tr><td><code>{e(r.expectation)}</code><br><span class=\"text-muted\">{e(kwargs)}</span></td>"
            f"<td>{e(r.column or '(table)')}</td><td class=\"c2m-sev-{r.severity}\">{r.severity}{relaxed}</td>"
            f"<td class=\"{cls}\">{e(word)}</td><td>{e(_unexpected_text(r))}</td>"
            f"<td>{e(r.why)}{('<br><span class=text-muted>first ids: ' + sample + '</span>') if sample else ''}</td></tr>"
        )
    links = []
    if "validation" in pages:
        links.append(f"<li><a href=\"{e(pages['validation'])}\">Great Expectations validation result</a> "
                     "(every expectation with observed values and sample unexpected values)</li>")
    if "suite" in pages:
        links.append(f"<li><a href=\"{e(pages['suite'])}\">Expectation suite</a> (as Great Expectations renders it)</li>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Validation {status}: {e(Path(report.suite).name)}</title>
<style>{_STYLE}</style></head>
<body><nav class="navbar"><span class="c2m-brand">corpus2model · validate · Data Docs</span></nav>
<div class="container-fluid">
<h2>Validation <span class="{'c2m-pass' if report.success else 'c2m-fail'}">{status}</span>: {e(BOUNDARY_TITLES.get(report.boundary, report.boundary))}</h2>
<p>Suite <code>{e(_display_path(report.suite))}</code> (sha256 <code>{report.suite_sha256[:16]}</code>) on {report.rows} {noun}:
{len(report.results)} expectations, <span class="c2m-sev-error">{report.error_failed} error-severity</span> and
<span class="c2m-sev-warn">{report.warn_failed} warn-severity</span> failed.
Error failures stop the flow; warn failures are recorded and the run continues.</p>
<ul>{''.join(links)}</ul>
<table><thead><tr><th>expectation</th><th>column</th><th>severity</th><th>result</th><th>unexpected</th><th>why</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{_rejected_html(report.upstream_rejected)}
{_profile_html(report.profile)}
</div></body></html>
"""


def _rejected_html(rejected: dict) -> str:
    if not rejected:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{v}</td></tr>"
                   for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
    return (f"<h3>Lines ingest could not read ({sum(rejected.values())})</h3><p>Not validated above: ingest quarantined "
            f"them with these reasons (ingest's quarantine Parquet has each line).</p>"
            f"<table><thead><tr><th>reason</th><th>lines</th></tr></thead><tbody>{rows}</tbody></table>")


def _kwarg_text(v) -> str:
    """A regex as written in the suite (repr would double every backslash), lists without quotes."""
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ", ".join(_kwarg_text(x) if not isinstance(x, str) else x for x in v) + "]"
    return str(v)


def _display_path(path: str) -> str:
    """Our shipped suites are shown as schemas/suites/<name>, suites under the working directory
    relative to it, others in full."""
    p = Path(path).resolve()
    for root, prefix in ((suites_dir().resolve(), "schemas/suites/"), (Path.cwd().resolve(), "")):
        try:
            return prefix + p.relative_to(root).as_posix()
        except ValueError:
            continue
    return str(path)


def _profile_html(prof: dict) -> str:
    """The statistics the next run's distribution checks compare against, as a person reads them."""
    if not prof:
        return ""
    e = html.escape
    q = prof.get("length_quantiles") or {}
    tt = prof.get("task_types") or {}
    n = max(prof.get("rows", 0), 1)
    mix = "".join(f"<tr><td>{e(k)}</td><td>{v}</td><td>{v / n:.1%}</td></tr>" for k, v in sorted(tt.items(), key=lambda kv: -kv[1]))
    hist = prof.get("length_hist") or {}
    peak = max(hist.values(), default=1)
    bars = "".join(
        f"<tr><td>{2 ** int(b) - 1}–{2 ** (int(b) + 1) - 2}</td><td>{c}</td>"
        f"<td><span class=\"c2m-bar\" style=\"width:{max(1, round(200 * c / peak))}px\"></span></td></tr>"
        for b, c in sorted(hist.items(), key=lambda kv: int(kv[0])))
    quant = ", ".join(f"{k} {v:.0f}" for k, v in q.items())
    mix_table = (f"<table><thead><tr><th>task_type</th><th>rows</th><th>share</th></tr></thead><tbody>{mix}</tbody></table>"
                 if mix else "")
    return (f"<h3>Statistics</h3><p>Compared with the last successful run of the same config by the flow's distribution "
            f"checks (row count, length distribution, task_type mix). Length in characters: {e(quant)}.</p>"
            f"<div class=\"row\"><div class=\"col-4\">{mix_table}</div><div class=\"col-6\"><table><thead><tr><th>length</th>"
            f"<th>rows</th><th></th></tr></thead><tbody>{bars}</tbody></table></div></div>")


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def failing_rows_table(report: ValidationReport, table: pa.Table, stage: str = STAGE) -> pa.Table:
    """One quarantine row per (failing record, expectation), in suite order; the records are copies."""
    rows = []
    for r in report.results:
        if not r.failing_rows:
            continue
        for rec in table.take(pa.array(r.failing_rows, type=pa.int64())).to_pylist():
            rows.append(quarantine_row(stage, r.reason, detail=r.severity, record=rec))
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _read_records(up: Manifest, stage: str) -> tuple[pa.Table, list[tuple[Path, str, int]]]:
    paths = up.files_with("data")
    names = [p.name for p in paths]
    unique = len(set(names)) == len(names)
    tables, parts = [], []
    for i, p in enumerate(paths):
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"{stage}: cannot read upstream part {p} ({e}); rerun the {up.stage} stage") from None
        missing = set(RECORD_SCHEMA.names) - set(t.column_names)
        if missing:
            raise StageError(f"{stage}: upstream part {p} lacks record columns {sorted(missing)}")
        t = t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
        tables.append(t)
        parts.append((p, f"parts/{p.name if unique else f'{i:06d}-{p.name}'}", t.num_rows))
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    return table, parts


# The boundaries: node name, suite config field, upstream stages (the last one holds the records).
# The final one reads the `validate` section, the check_* nodes the `checks` section.
BOUNDARIES = {
    "raw": ("check_raw", "raw_suite", ("source", "ingest")),
    "clean": ("check_clean", "clean_suite", ("dedup",)),
    "augment": ("check_augment", "augment_suite", ("augment",)),
    "final": ("validate", "suite", ("augment",)),
}
CHECK_SECTIONS = ("checks",)
BOUNDARY_TITLES = {"raw": "raw documents (ingest)", "clean": "cleaned records (clean + dedup)",
                   "augment": "augmented records", "final": "final training records", "pairs": "preference pairs"}


def _suite_for(vcfg, boundary: str) -> Path:
    return resolve_suite_path(getattr(vcfg, BOUNDARIES[boundary][1]))


def _run_boundary(boundary: str, inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """Validate one boundary. ``final`` passes the records through (shard reads them); the check_*
    nodes write reports only. Error-severity failures raise ValidationFailed, report kept."""
    stage, _, ups = BOUNDARIES[boundary]
    if len(inputs) != len(ups):
        raise StageError(f"{stage} takes upstream manifests {list(ups)}, got {[u.stage for u in inputs]}")
    vcfg = cfg.validate if boundary == "final" else cfg.checks
    suite_path = _suite_for(vcfg, boundary)
    table, parts = _read_records(inputs[-1], stage)
    raw = raw_columns(table, file_reader(Path(inputs[0].path))) if boundary == "raw" else None
    docs_dir = out_dir / "data_docs"
    try:
        report = validate_table(table, suite_path, docs_dir, max_failing_rows=vcfg.max_failing_rows, raw=raw,
                                severity_overrides=vcfg.severity_overrides, boundary=boundary,
                                upstream_rejected=(inputs[-1].counters.get("rejected") or {}) if boundary == "raw" else None)
    except ValueError as e:
        raise StageError(f"{stage}: {e}") from None

    files: list[FileEntry] = []
    n = table.num_rows
    if boundary == "final":
        for src, rel, k in parts:
            link_or_copy(src, out_dir / rel)
            files.append(FileEntry(rel, role="data", records=k))
    # The rows that failed, copies with the expectation that failed (validation never drops a record).
    failing = failing_rows_table(report, table, stage)
    pq.write_table(failing, out_dir / "failing_rows.parquet")
    files.append(FileEntry("failing_rows.parquet", role="quarantine", records=failing.num_rows))
    upstream_rejected = {}
    if boundary == "raw":
        upstream_rejected = dict(inputs[-1].counters.get("rejected") or {})
    summary = report.to_dict()
    summary.update(docs_index="data_docs/index.html", boundary=boundary, upstream_rejected=upstream_rejected)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    markdown = report.to_markdown()
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    files += [FileEntry("report.json", role="report"), FileEntry("report.md", role="report")]
    files += [FileEntry(p.relative_to(out_dir).as_posix(), role="report")
              for p in sorted(docs_dir.rglob("*")) if p.is_file()]

    if not report.success:
        folder = _keep_failed_report(out_dir, inputs, report, ctx, stage)
        publish_markdown(f"{stage}-summary", markdown, description=f"{BOUNDARY_TITLES[boundary]}: validation FAILED")
        publish_link(f"{stage}-data-docs", "file://" + str(folder / "data_docs" / "index.html"),
                     text=f"Data Docs: {BOUNDARY_TITLES[boundary]} (failed)")
        raise ValidationFailed(_failure_message(report, suite_path, stage, folder), report=report, folder=folder)

    final = ctx.final_dir or out_dir  # links in artifacts must name the folder that outlives this run
    publish_markdown(f"{stage}-summary", markdown,
                     description=f"{report.warn_failed} warn-severity expectation(s) failed" if report.warn_failed else "")
    publish_link(f"{stage}-data-docs", "file://" + str(final / "data_docs" / "index.html"),
                 text=f"Data Docs: {BOUNDARY_TITLES[boundary]}")
    ctx.info("%s: %d rows, %d expectations, %d warnings failed", stage, report.rows, len(report.results), report.warn_failed)
    return Manifest(
        stage=stage,
        files=files,
        counters={"in": n, "out": n, "rejected": {}, "duplicates": 0},
        stats={
            "boundary": boundary,
            "rows": n,
            "expectations": len(report.results),
            "errors_failed": report.error_failed,
            "warns_failed": report.warn_failed,
            "failed": [r.reason for r in report.results if not r.success],
            "failing_rows": failing.num_rows,
            "suite": str(suite_path),
            "suite_sha256": report.suite_sha256,
            "profile": report.profile,
            # Relative: out_dir is renamed into the store after run returns.
            "docs_index": "data_docs/index.html",
        },
    )


def _failure_message(report: ValidationReport, suite_path: Path, stage: str, folder: Path) -> str:
    failures = "; ".join(f"{r.expectation}({r.column or 'table'}): {r.unexpected_count} unexpected"
                         + (f" [{r.exception}]" if r.exception else "") for r in report.failed("error"))
    return (f"{stage}: validation failed: {report.error_failed} error-severity expectation(s) of suite {suite_path} "
            f"failed: {failures}. Report: {folder} (data_docs/index.html, report.md, failing_rows.parquet). Fix the data "
            f"upstream or, if the expectation is wrong, edit the suite (or relax it for this config with "
            f"{_overrides_field(report.boundary)}).")


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """The final boundary (training records, before shard): records pass through as hard links."""
    return _run_boundary("final", inputs, cfg, out_dir, ctx)


def _keep_failed_report(out_dir: Path, inputs: list[Manifest], report: ValidationReport, ctx: StageContext,
                        stage: str = STAGE) -> Path:
    """out_dir is deleted when the stage raises: copy the evidence where a person can open it."""
    digest = hashlib.sha256(
        canonical_json({"upstream": [f"{u.stage}:{u.key}" for u in inputs], "suite": report.suite_sha256}).encode()
    ).hexdigest()[:12]
    folder = ctx.store.root / "reports" / f"{stage}-failed-{digest}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("report.json", "report.md", "failing_rows.parquet"):
        shutil.copy2(out_dir / name, folder / name)
    shutil.copytree(out_dir / "data_docs", folder / "data_docs")
    return folder


_BOUNDARY_MODULES: dict[str, types.ModuleType] = {}


def boundary_module(boundary: str) -> types.ModuleType:
    """The check_<boundary> DAG node as a stage module (STAGE, VERSION, SECTIONS, run, key_extra):
    one implementation, one cached node per boundary, each keyed by its upstream and its suite file."""
    if boundary not in BOUNDARIES or boundary == "final":
        raise KeyError(f"unknown validation boundary {boundary!r}; one of {[b for b in BOUNDARIES if b != 'final']}")
    if boundary not in _BOUNDARY_MODULES:
        stage = BOUNDARIES[boundary][0]
        mod = types.ModuleType(f"corpus2model.tasks.validate[{stage}]", f"{stage}: the {BOUNDARY_TITLES[boundary]} boundary check")
        mod.STAGE, mod.VERSION, mod.SECTIONS = stage, VERSION, CHECK_SECTIONS
        mod.run = lambda inputs, cfg, out_dir, ctx, _b=boundary: _run_boundary(_b, inputs, cfg, out_dir, ctx)
        mod.key_extra = lambda cfg, _b=boundary: {"suite_sha256": sha256_bytes(_suite_for(cfg.checks, _b).read_bytes())}
        _BOUNDARY_MODULES[boundary] = mod
    return _BOUNDARY_MODULES[boundary]


# ---------------------------------------------------------------------------------------------
# preference pairs (the DPO loader calls this)
# ---------------------------------------------------------------------------------------------
def validate_preference_pairs(table_or_path, out_dir: str | Path, suite: str | Path = "preference_pairs",
                              severity_overrides: dict | None = None, max_failing_rows: int = 1000) -> ValidationReport:
    """Validate DPO preference pairs (a JSONL path, pyarrow Table, DataFrame or list of dicts) with the
    preference_pairs suite. Writes ``out_dir``: data_docs/index.html, report.md, report.json and
    failing_rows.parquet (quarantine schema, one row per failing pair and expectation). Raises
    ValidationFailed (``.report`` holds the results, ``.failing_ids()`` the pairs to drop) when an
    error-severity expectation fails; warn failures are only reported."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite_path = resolve_suite_path(suite)
    if suite_kind(suite_path) != "preference_pairs":
        raise StageError(f"{suite_path} is not a preference-pairs suite (it needs 'table: preference_pairs')")
    rows = read_pairs(table_or_path) if isinstance(table_or_path, (str, Path)) else table_or_path
    report = validate_table(rows, suite_path, out_dir / "data_docs", max_failing_rows,
                            severity_overrides=severity_overrides, boundary="pairs")
    records = _rows_as_dicts(rows)
    q = []
    for r in report.results:
        for i in r.failing_rows:
            q.append(quarantine_row("validate_pairs", r.reason, detail=r.severity, record=records[i]))
    pq.write_table(pa.Table.from_pylist(q, schema=QUARANTINE_SCHEMA), out_dir / "failing_rows.parquet")
    summary = {**report.to_dict(), "docs_index": "data_docs/index.html", "source": str(table_or_path) if isinstance(table_or_path, (str, Path)) else None}
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    markdown = report.to_markdown()
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    publish_markdown("validate-pairs-summary", markdown, description="" if report.success else "validation FAILED")
    publish_link("validate-pairs-data-docs", "file://" + str((out_dir / "data_docs" / "index.html").resolve()),
                 text="Data Docs: preference pairs")
    if not report.success:
        raise ValidationFailed(_failure_message(report, suite_path, "validate_preference_pairs", out_dir),
                               report=report, folder=out_dir)
    return report


def _rows_as_dicts(rows) -> list[dict]:
    import pandas as pd

    if isinstance(rows, pa.Table):
        return rows.to_pylist()
    if isinstance(rows, pd.DataFrame):
        return rows.to_dict("records")
    return list(rows)


def validate_pairs_path(path: Path, out_dir: Path, suite_path: Path, vcfg) -> dict:
    """``c2m validate PATH --suite preference_pairs``: the validate_path summary for a pairs file."""
    try:
        report = validate_preference_pairs(path, out_dir, suite_path, vcfg.severity_overrides, vcfg.max_failing_rows)
    except ValidationFailed as e:
        if e.report is None:
            raise
        report = e.report
    # Pairs have no ingest step: nothing is "unreadable" here (a non-JSON line is a StageError).
    pq.write_table(QUARANTINE_SCHEMA.empty_table(), out_dir / "unreadable.parquet")
    summary = {"path": str(path), "suite": str(suite_path), "records": report.rows, "unreadable": 0,
               "unreadable_reasons": {}, "errors_failed": report.error_failed, "warns_failed": report.warn_failed,
               "docs_index": str(out_dir / "data_docs" / "index.html")}
    # The same report.json shape as validate_path writes for records.
    (out_dir / "report.json").write_text(json.dumps({**summary, "report": report.to_dict()}, indent=1, default=str),
                                         encoding="utf-8")
    return {**summary, "markdown": report.to_markdown()}


_SUITE_BOUNDARY = {"raw_documents": "raw", "cleaned_records": "clean", "augmented_records": "augment",
                   "preference_pairs": "pairs"}


def suite_boundary(suite_path: str | Path) -> str:
    """The boundary a suite file belongs to (for severity_overrides prefixes and report titles)."""
    return _SUITE_BOUNDARY.get(Path(suite_path).stem, "final")
