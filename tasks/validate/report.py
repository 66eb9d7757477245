"""What a validation run found: per-expectation results, the report (JSON and markdown), and
``ValidationFailed``, the error that stops the flow with the report attached."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus2model.tasks.stage import StageError
from corpus2model.tasks.validate.suite import overrides_field

# How reports name each boundary (the check_* nodes, the final validate node, DPO's pairs).
BOUNDARY_TITLES = {"raw": "raw documents (ingest)", "clean": "cleaned records (clean + dedup)",
                   "augment": "augmented records", "final": "final training records", "pairs": "preference pairs"}


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
    # "<expectation>:<column>" -> why it was not run on this table (a pairs-only corpus has no training
    # records to count); only in report.json / report.md when there is one, so other reports stay as they were.
    not_applicable: dict = field(default_factory=dict)

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
                {**dataclasses.asdict(r), "reason": r.reason, "observed_value": jsonable(r.observed_value)}
                for r in self.results
            ],
            **({"not_applicable": dict(self.not_applicable)} if self.not_applicable else {}),
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
                f"| {md_cell(r.expectation)} | {md_cell(r.column or '(table)')} | {r.severity} | "
                f"{result_word(r)} | {unexpected_text(r)} |"
            )
        failed = [r for r in self.results if not r.success]
        if failed:
            lines += ["", "Failing expectations:", ""]
            for r in failed:
                ids = ", ".join(f"`{i}`" for i in first_ids(r))
                more = f" (first ids: {ids})" if ids else ""
                if r.failing_where:
                    more += f"; first rows: {where_text(r.failing_where)}"
                if r.suite_severity:
                    more += f" [suite severity {r.suite_severity}, overridden by config]"
                lines.append(f"- **{r.severity}** `{r.expectation}` on `{r.column or 'table'}`: {md_cell(r.why)}{more}")
        if self.not_applicable:
            lines += ["", "Not run on this table:", ""]
            lines += [f"- `{k.rsplit(':', 1)[0]}` on `{k.rsplit(':', 1)[1]}`: {md_cell(why)}"
                      for k, why in self.not_applicable.items()]
        if self.upstream_rejected:
            lines += ["", f"Lines ingest could not read ({sum(self.upstream_rejected.values())}, quarantined by ingest): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(self.upstream_rejected.items(), key=lambda kv: -kv[1]))]
        return "\n".join(lines) + "\n"


def first_ids(r: ExpectationResult, n: int = 5) -> list:
    # A duplicated id fails on every copy; list it once.
    return list(dict.fromkeys(r.failing_ids))[:n]


def jsonable(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def result_word(r: ExpectationResult) -> str:
    if r.exception:
        return "error (exception)"
    return "pass" if r.success else "FAIL"


def unexpected_text(r: ExpectationResult) -> str:
    if r.unexpected_percent is not None:
        return f"{r.unexpected_count} ({r.unexpected_percent:.2f}%)"
    if r.observed_value is not None:
        return f"observed {md_cell(short_text(r.observed_value))}"
    return str(r.unexpected_count)


def short_text(v, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def where_text(where: list[str]) -> str:
    """["a.jsonl:3", "a.jsonl:19", "b.txt"] -> "a.jsonl lines 3, 19; b.txt"."""
    groups: dict[str, list[str]] = {}
    for w in where:
        path, _, line = w.rpartition(":") if w.rpartition(":")[2].isdigit() else (w, "", "")
        groups.setdefault(path, []).append(line)
    return "; ".join(f"{p} line{'s' if len(ls) > 1 else ''} {', '.join(ls)}" if any(ls) else p for p, ls in groups.items())


def failure_message(report: ValidationReport, suite_path: Path, stage: str, folder: Path) -> str:
    # A table-level expectation (row count) has no unexpected rows: say what it observed instead.
    failures = "; ".join(f"{r.expectation}({r.column or 'table'}): "
                         + (f"observed {short_text(r.observed_value)}" if r.column is None and r.observed_value is not None
                            else f"{r.unexpected_count} unexpected")
                         + (f" [{r.exception}]" if r.exception else "") for r in report.failed("error"))
    return (f"{stage}: validation failed: {report.error_failed} error-severity expectation(s) of suite {suite_path} "
            f"failed: {failures}. Report: {folder} (data_docs/index.html, report.md, failing_rows.parquet). Fix the data "
            f"upstream or, if the expectation is wrong, edit the suite (or relax it for this config with "
            f"{overrides_field(report.boundary)}).")
