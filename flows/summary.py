"""The run summary: per stage ran/cached and why, seconds, records in/out; printed, written as
markdown + JSON next to the run record, and published as Prefect table + markdown artifacts."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corpus2model.flows.plan import StepPlan
from corpus2model.tasks.stage import Manifest


@dataclass
class Row:
    stage: str
    status: str  # ran | cached | failed | skipped
    why: str
    seconds: float
    records_in: int | None = None
    records_out: int | None = None
    rejected: int | None = None
    duplicates: int | None = None
    detail: str = ""
    key: str = ""


def _detail(m: Manifest, cached: bool = False) -> str:
    s = m.stats
    parts = []
    if "units" in s and not cached:  # a cached output did not compute anything in this run
        parts.append(f"{s.get('units_computed', 0)}/{s['units']} units computed")
        if s.get("computed_files") and s.get("units_computed", 0) <= 3:
            parts.append(", ".join(s["computed_files"]))
    rej = m.counters.get("rejected") or {}
    if rej:
        parts.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(rej.items(), key=lambda kv: -kv[1])))
    if m.counters.get("added"):
        parts.append(f"added {m.counters['added']}")
    for k in ("final_eval_loss", "warns_failed", "size_ratio"):
        if k in s:
            v = s[k]
            parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
    return "; ".join(parts)


def row_for(step: StepPlan, m: Manifest | None, status: str, seconds: float) -> Row:
    c = (m.counters if m else {}) or {}
    return Row(
        stage=step.stage,
        status=status,
        why="" if status == "cached" else step.why,
        seconds=round(seconds, 2),
        records_in=c.get("in"),
        records_out=c.get("out"),
        rejected=sum((c.get("rejected") or {}).values()) if c else None,
        duplicates=c.get("duplicates") if c else None,
        detail=_detail(m, status == "cached") if m else "",
        key=step.key[:10],
    )


def _cell(v) -> str:
    return "" if v is None else str(v)


COLUMNS = ["stage", "status", "why", "seconds", "records_in", "records_out", "rejected", "duplicates", "detail"]


def as_markdown(rows: list[Row], title: str = "") -> str:
    head = f"### {title}\n\n" if title else ""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        d = asdict(r)
        lines.append("| " + " | ".join(_cell(d[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"


def as_text(rows: list[Row]) -> str:
    """A fixed-width table for the terminal; long 'why'/'detail' cells are cut, the markdown keeps them."""
    widths = {"stage": 9, "status": 7, "why": 44, "seconds": 7, "records_in": 6, "records_out": 6, "rejected": 5, "duplicates": 4, "detail": 60}
    labels = {"records_in": "in", "records_out": "out", "rejected": "rej", "duplicates": "dup", "seconds": "sec"}
    def fit(text: str, w: int) -> str:
        return text if len(text) <= w else text[: w - 1] + "…"
    out = ["  ".join(fit(labels.get(c, c), widths[c]).ljust(widths[c]) for c in COLUMNS)]
    for r in rows:
        d = asdict(r)
        out.append("  ".join(fit(_cell(d[c]), widths[c]).ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(out)


class RunLog:
    """Runs each stage through its Prefect task the way the plan says and keeps one row per stage."""

    def __init__(self, steps: list[StepPlan], cfg, echo=print):
        self.steps = {s.stage: s for s in steps}
        self.cfg = cfg
        self.rows: list[Row] = []
        self.manifests: dict[str, Manifest] = {}
        self.echo = echo

    def stage(self, name: str, inputs: list[Manifest]) -> Manifest:
        from corpus2model.flows.prefect_tasks import stage_options, stage_task

        step = self.steps[name]
        t0 = time.perf_counter()
        try:
            # An output that failed verification must not come back from Prefect's cache.
            task = stage_task.with_options(refresh_cache=not step.cached, **stage_options(name, self.cfg.runtime))
            # Submitted, so the flow's task runner (threads, or Dask workers) executes it.
            future = task.submit(name, inputs, self.cfg)
            future.wait()
            state = future.state
            m = state.result()
        except Exception:
            self.rows.append(row_for(step, None, "failed", time.perf_counter() - t0))
            self.echo(f"[{name}] FAILED ({step.why})")
            raise
        cached = state.name == "Cached" or m.stats.get("cache") == "hit"
        row = row_for(step, m, "cached" if cached else "ran", time.perf_counter() - t0)
        self.rows.append(row)
        self.manifests[name] = m
        self.echo(f"[{name}] {row.status}{'' if cached else ' (' + step.why + ')'} {row.seconds:.2f}s {row.detail}".rstrip())
        return m

    def check(self, name: str, inputs: list[Manifest], store_root: Path) -> Manifest:
        """A validation boundary node, then its distribution checks against the last successful run
        of this config (outside the cached stage: they depend on history, not on content). A drift
        beyond validate.max_* is noted in the row; with validate.drift_severity error it stops the run."""
        from corpus2model.tasks.validate import check_drift

        m = self.stage(name, inputs)
        row = self.rows[-1]
        try:
            _, note = check_drift(store_root, self.cfg.name, m.stats.get("boundary", name), m, self.cfg.validate_)
        except Exception:
            row.status = "failed"
            row.why = "distribution drift"
            self.echo(f"[{name}] FAILED (distribution drift)")
            raise
        if note:
            row.detail = f"{row.detail}; {note}" if row.detail else note
            self.echo(f"[{name}] {note}")
        return m


def write_summary(store_root: Path, name: str, rows: list[Row], extra: dict) -> tuple[Path, Path]:
    folder = Path(store_root) / "_runs"
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{name}.summary.md"
    js = folder / f"{name}.summary.json"
    md.write_text(as_markdown(rows, f"Run summary: {name}") + "\n" + "\n".join(f"- {k}: {v}" for k, v in extra.items()) + "\n", encoding="utf-8")
    js.write_text(json.dumps({"rows": [asdict(r) for r in rows], **extra}, indent=1, default=str), encoding="utf-8")
    return md, js
