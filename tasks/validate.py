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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from schemas.records import METADATA_FIELDS, QUARANTINE_SCHEMA, RECORD_SCHEMA, quarantine_row
from tasks.artifacts import publish_link, publish_markdown
from tasks.stage import (
    FileEntry,
    Manifest,
    StageContext,
    StageError,
    canonical_json,
    link_or_copy,
    sha256_bytes,
)

STAGE = "validate"
VERSION = "1"
SECTIONS = ("validate",)

SEVERITIES = ("error", "warn")
# GE 1.x carries its own severity on each expectation; ours maps onto it so the suite page shows it.
_GX_SEVERITY = {"error": "critical", "warn": "warning"}
_ENTRY_KEYS = {"expectation", "kwargs", "severity", "why"}
SUITE_NAME = "training_records"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Long unexpected values (a 120k-character input) would otherwise be copied into the HTML verbatim.
_MAX_HTML_TEXT = 300


class ValidationFailed(StageError):
    """At least one error-severity expectation failed; the message names the surviving report."""


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

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def resolve_suite_path(suite: str | Path) -> Path:
    """A relative suite path is tried against the working directory, then the project root (the
    folder holding ``schemas/``), so it works from a checkout and from an installed package."""
    p = Path(suite)
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, PROJECT_ROOT / p]
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
    return df.reset_index(drop=True)


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
    kwargs: dict = field(default_factory=dict)
    observed_value: Any = None
    failing_rows: list[int] = field(default_factory=list)  # row positions, first max_failing_rows
    failing_ids: list[str | None] = field(default_factory=list)
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
            f"## Validation {status}: suite `{Path(self.suite).name}` on {self.rows} records",
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
                lines.append(f"- **{r.severity}** `{r.expectation}` on `{r.column or 'table'}`: {_md(r.why)}{more}")
        return "\n".join(lines) + "\n"


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
                   max_failing_rows: int = 1000) -> ValidationReport:
    """Validate records (pyarrow Table or DataFrame) against a suite file; write Data Docs to
    ``docs_dir`` (``index.html`` there) when given. Pure: reads nothing else, writes only docs_dir."""
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_path = Path(suite_path)
    entries = load_suite(suite_path)
    df = records_frame(data)
    for e in entries:
        for col in [e.kwargs.get("column"), *(e.kwargs.get("column_list") or [])]:
            if col is not None and col not in df.columns:
                raise StageError(
                    f"expectation suite {suite_path}, entry {e.index} ({e.expectation}): column {col!r} is not in "
                    f"the records table; columns: {', '.join(df.columns)}"
                )

    with tempfile.TemporaryDirectory(prefix="c2m-gx-") as tmp, _quiet():
        # A throwaway file context: nothing of GE's state outlives the call or leaks between runs.
        context = gx.get_context(mode="file", project_root_dir=tmp)
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        suite = gx.ExpectationSuite(name=SUITE_NAME, meta={"source_file": str(suite_path)})
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
                success=bool(r.success),
                unexpected_count=int(res.get("unexpected_count") or 0),
                unexpected_percent=res.get("unexpected_percent"),
                why=e.why,
                kwargs=e.kwargs,
                observed_value=res.get("observed_value"),
                failing_rows=rows,
                failing_ids=[None if _isnull(ids.iat[i]) else str(ids.iat[i]) for i in rows],
                exception=exc,
            )
        )
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
    rows = []
    for r in report.results:
        word = _result_word(r)
        cls = "c2m-pass" if r.success else "c2m-fail"
        kwargs = ", ".join(f"{k}={v!r}" for k, v in r.kwargs.items() if k != "column")
        sample = ", ".join(e(str(i)) for i in _first_ids(r))
        rows.append(
            f"<tr><td><code>{e(r.expectation)}</code><br><span class=\"text-muted\">{e(kwargs)}</span></td>"
            f"<td>{e(r.column or '(table)')}</td><td class=\"c2m-sev-{r.severity}\">{r.severity}</td>"
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
<h2>Validation <span class="{'c2m-pass' if report.success else 'c2m-fail'}">{status}</span></h2>
<p>Suite <code>{e(report.suite)}</code> (sha256 <code>{report.suite_sha256[:16]}</code>) on {report.rows} records:
{len(report.results)} expectations, <span class="c2m-sev-error">{report.error_failed} error-severity</span> and
<span class="c2m-sev-warn">{report.warn_failed} warn-severity</span> failed.
Error failures stop the flow; warn failures are recorded and the run continues.</p>
<ul>{''.join(links)}</ul>
<table><thead><tr><th>expectation</th><th>column</th><th>severity</th><th>result</th><th>unexpected</th><th>why</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</div></body></html>
"""


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def failing_rows_table(report: ValidationReport, table: pa.Table) -> pa.Table:
    """One quarantine row per (failing record, expectation), in suite order; the records are copies."""
    rows = []
    for r in report.results:
        if not r.failing_rows:
            continue
        for rec in table.take(pa.array(r.failing_rows, type=pa.int64())).to_pylist():
            rows.append(quarantine_row(STAGE, r.reason, detail=r.severity, record=rec))
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _read_parts(inputs: list[Manifest]) -> tuple[pa.Table, list[tuple[Path, str, int]]]:
    if len(inputs) != 1:
        raise StageError(f"validate takes one upstream manifest (augment), got {len(inputs)}")
    (up,) = inputs
    paths = up.files_with("data")
    names = [p.name for p in paths]
    unique = len(set(names)) == len(names)
    tables, parts = [], []
    for i, p in enumerate(paths):
        try:
            t = pq.read_table(p)
        except (OSError, pa.ArrowInvalid) as e:
            raise StageError(f"validate: cannot read upstream part {p} ({e}); rerun the {up.stage} stage") from None
        missing = set(RECORD_SCHEMA.names) - set(t.column_names)
        if missing:
            raise StageError(f"validate: upstream part {p} lacks record columns {sorted(missing)}")
        t = t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
        tables.append(t)
        parts.append((p, f"parts/{p.name if unique else f'{i:06d}-{p.name}'}", t.num_rows))
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    return table, parts


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    vcfg = cfg.validate
    suite_path = resolve_suite_path(vcfg.suite)
    table, parts = _read_parts(inputs)
    docs_dir = out_dir / "data_docs"
    report = validate_table(table, suite_path, docs_dir, max_failing_rows=vcfg.max_failing_rows)

    files: list[FileEntry] = []
    for src, rel, n in parts:
        link_or_copy(src, out_dir / rel)
        files.append(FileEntry(rel, role="data", records=n))

    failing = failing_rows_table(report, table)
    pq.write_table(failing, out_dir / "failing_rows.parquet")
    files.append(FileEntry("failing_rows.parquet", role="quarantine", records=failing.num_rows))
    summary = report.to_dict()
    summary["docs_index"] = "data_docs/index.html"
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    markdown = report.to_markdown()
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    files += [FileEntry("report.json", role="report"), FileEntry("report.md", role="report")]
    files += [FileEntry(p.relative_to(out_dir).as_posix(), role="report")
              for p in sorted(docs_dir.rglob("*")) if p.is_file()]

    if not report.success:
        folder = _keep_failed_report(out_dir, inputs, report, ctx)
        publish_markdown("validate-summary", markdown, description="validation FAILED")
        publish_link("validate-data-docs", "file://" + str(folder / "data_docs" / "index.html"),
                     text="Data Docs (failed validation)")
        failures = "; ".join(f"{r.expectation}({r.column or 'table'}): {r.unexpected_count} unexpected"
                             + (f" [{r.exception}]" if r.exception else "") for r in report.failed("error"))
        raise ValidationFailed(
            f"validation failed: {report.error_failed} error-severity expectation(s) of suite {suite_path} failed: "
            f"{failures}. Report: {folder} (data_docs/index.html, report.md, failing_rows.parquet). Fix the data "
            "upstream or, if the expectation is wrong, edit the suite."
        )

    final = ctx.final_dir or out_dir  # links in artifacts must name the folder that outlives this run
    publish_markdown("validate-summary", markdown,
                     description=f"{report.warn_failed} warn-severity expectation(s) failed" if report.warn_failed else "")
    publish_link("validate-data-docs", "file://" + str(final / "data_docs" / "index.html"), text="Data Docs")
    ctx.info("validate: %d rows, %d expectations, %d warnings failed", report.rows, len(report.results), report.warn_failed)
    n = table.num_rows
    return Manifest(
        stage=STAGE,
        files=files,
        counters={"in": n, "out": n, "rejected": {}, "duplicates": 0},
        stats={
            "rows": n,
            "expectations": len(report.results),
            "errors_failed": report.error_failed,
            "warns_failed": report.warn_failed,
            "failed": [r.reason for r in report.results if not r.success],
            "failing_rows": failing.num_rows,
            "suite": str(suite_path),
            "suite_sha256": report.suite_sha256,
            # Relative: out_dir is renamed into the store after run returns.
            "docs_index": "data_docs/index.html",
        },
    )


def _keep_failed_report(out_dir: Path, inputs: list[Manifest], report: ValidationReport, ctx: StageContext) -> Path:
    """out_dir is deleted when the stage raises: copy the evidence where a person can open it."""
    digest = hashlib.sha256(
        canonical_json({"upstream": [f"{u.stage}:{u.key}" for u in inputs], "suite": report.suite_sha256}).encode()
    ).hexdigest()[:12]
    folder = ctx.store.root / "reports" / f"validate-failed-{digest}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in ("report.json", "report.md", "failing_rows.parquet"):
        shutil.copy2(out_dir / name, folder / name)
    shutil.copytree(out_dir / "data_docs", folder / "data_docs")
    return folder
