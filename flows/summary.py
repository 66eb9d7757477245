"""How a flow runs its stages, and what it says about them afterwards.

``guarded_run`` is what every flow (``c2m run``, ``c2m tune``) does around its stages: log redaction,
the runtime-section checks, the GPU concurrency limit, the raw scan and the plan first, the run record
last (so the next run can say what changed). ``RunLog`` runs stages from the table (flows/stages.py)
through their Prefect tasks and keeps one row per stage. The run summary (per stage ran/cached and
why, seconds, records in/out) is printed, written as markdown + JSON next to the run record, and
published as Prefect table + markdown artifacts with the links a person opens next."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from corpus2model.flows.plan import RunRecord, StepPlan, check_runtime, plan
from corpus2model.flows.stages import STAGES
from corpus2model.tasks.common.artifacts import publish_link, publish_markdown, publish_table
from corpus2model.tasks.common.security import install_log_redaction
from corpus2model.tasks.stage import Manifest, StageError, Store


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
    if s.get("pairs_skipped"):  # tokenize counts training records; the pairs go on to DPO / the reward model
        parts.append(f"{s['pairs_skipped']} preference pairs not packed (finetune reads them from shard)")
    if s.get("skipped"):  # ingest: raw files left out (links leaving the folder, names not included, ...)
        parts.append("skipped files: " + ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())))
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
        why=step.why if status != "cached" or step.why.startswith("cached (") else "",  # keep a code-change note
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

    def __init__(self, steps: list[StepPlan], cfg, echo=print, store: Store | None = None,
                 source: Manifest | None = None):
        self.steps = {s.stage: s for s in steps}
        self.cfg = cfg
        self.store = store or Store(cfg.paths.store)
        self.source = source
        self.rows: list[Row] = []
        self.manifests: dict[str, Manifest] = {}
        self.echo = echo

    def run(self, names: list[str]) -> dict[str, Manifest]:
        """The named stages of the table in order, each on its declared inputs; a validation node
        also gets its distribution checks. Returns the manifests by stage."""
        for name in names:
            st = STAGES[name]
            inputs = [self.source if u == "source" else self.manifests[u] for u in st.inputs]
            if st.validation:
                self.check(name, inputs, self.store.root)
            else:
                self.stage(name, inputs)
        return self.manifests

    def stage(self, name: str, inputs: list[Manifest]) -> Manifest:
        from corpus2model.flows.prefect_tasks import stage_options, stage_task

        step = self.steps[name]
        t0 = time.perf_counter()
        try:
            # An output that failed verification must not come back from Prefect's cache.
            opts = stage_options(name, self.cfg.runtime)
            if step.cached:
                # A verified output needs no slot. Any tag makes Prefect acquire that tag's concurrency
                # slots from the server before its cache lookup: a synchronous round trip that stalled
                # ~2 s whenever the temporary server was busy writing (every few seconds), which was most
                # of a cached rerun's stage time; and a cached finetune must not queue for the GPU slot.
                opts["tags"] = []
            task = stage_task.with_options(refresh_cache=not step.cached, **opts)
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


class ExplainedFailureFilter(logging.Filter):
    """A StageError (a validation refusal, unreadable input, a bad config value) is an outcome the
    message already explains: it names the stage, the file or report and the fix. Prefect logs every
    exception that leaves a task or the flow with its traceback, which buries that one line under
    a hundred lines of engine frames; keep the line, drop the frames. Any other exception is a bug
    and keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageError):
            record.exc_info = None
            record.exc_text = None
        return True


def install_explained_failures(names: tuple[str, ...] = ("prefect.flow_runs", "prefect.task_runs")) -> None:
    """On the loggers Prefect's flow and task engines log failures to (not their handlers: the records
    are made there, so a logger filter sees them before any handler, the API's included). Idempotent."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExplainedFailureFilter) for f in logger.filters):
            logger.addFilter(ExplainedFailureFilter())


@contextlib.contextmanager
def guarded_run(cfg, echo=print) -> Iterator[RunLog]:
    """The guards every flow run has (``c2m run`` and ``c2m tune`` alike): secrets redacted from the
    logs, runtime stage names checked, the GPU tag's concurrency limit in place; then the raw scan and
    the plan; and, however the stages end, the run record of the stages that finished."""
    from prefect.runtime import flow_run

    from corpus2model.flows.prefect_tasks import (ensure_gpu_limit, recover_gpu_slots,  # Prefect: only inside a flow
                                                  reporting_gpu_waits, scan_task)

    install_log_redaction()
    install_explained_failures()  # a refusal reads as its one line, not an engine traceback
    check_runtime(cfg.runtime)
    ensure_gpu_limit(cfg.runtime)
    recover_gpu_slots(cfg.runtime, echo)  # a run killed while it held the GPU slot must not block this one
    store = Store(cfg.paths.store)
    source = scan_task(cfg)
    steps = plan(cfg, store, source)
    run = RunLog(steps, cfg, echo=echo, store=store, source=source)
    try:
        with reporting_gpu_waits(cfg.runtime, flow_run.id, log=echo):  # a stage waiting for the slot says so
            yield run
    finally:
        RunRecord(store, cfg.name).save(source, [s for s in steps if s.stage in run.manifests])


def _report(m: Manifest) -> str:
    return str(m.dir / m.stats.get("docs_index", "data_docs/index.html"))


def run_links(manifests: dict[str, Manifest], registered: dict) -> dict[str, str]:
    """What a person opens after a run: the validation reports, the evaluation table, the registered
    version and whether it passed the deploy gate."""
    links = {
        "validation report": _report(manifests["validate"]),
        "evaluation table": str(manifests["evaluate"].dir / "eval.md"),
        "registered model": registered["path"],
        "production": str(registered.get("production")),
        "gate": "passed" if registered["gate"]["passed"] else "failed",
    }
    for name, st in STAGES.items():  # the boundary reports, beside the final one
        if st.validation and name != "validate" and name in manifests:
            links[f"{name} report"] = _report(manifests[name])
    return links


def publish_summary(run: RunLog, links: dict[str, str]) -> Path:
    """Write the summary next to the run record, publish it as Prefect artifacts, print it; returns
    the markdown file."""
    name = run.cfg.name
    md_path, _ = write_summary(run.store.root, name, run.rows, links)
    publish_table("run-summary", [r.__dict__ for r in run.rows], description=f"{name}: what ran, what was cached, and why")
    publish_markdown("run-summary-md", as_markdown(run.rows, f"Run summary: {name}") + "\n"
                     + "\n".join(f"- {k}: `{v}`" for k, v in links.items()))
    if "validation report" in links:
        publish_link("validation-report", "file://" + links["validation report"], "Great Expectations Data Docs")
    run.echo("\n" + as_text(run.rows))
    return md_path


def write_summary(store_root: Path, name: str, rows: list[Row], extra: dict) -> tuple[Path, Path]:
    folder = Path(store_root) / "_runs"
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / f"{name}.summary.md"
    js = folder / f"{name}.summary.json"
    md.write_text(as_markdown(rows, f"Run summary: {name}") + "\n" + "\n".join(f"- {k}: {v}" for k, v in extra.items()) + "\n", encoding="utf-8")
    js.write_text(json.dumps({"rows": [asdict(r) for r in rows], **extra}, indent=1, default=str), encoding="utf-8")
    return md, js
