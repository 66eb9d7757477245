"""The whole DAG, top-down: raw corpus -> records -> shards -> tokens -> model -> registry.

Run it with ``c2m run configs/demo.yaml`` (or as a Prefect deployment with the same parameter).
Every stage is a cached Prefect task keyed by content (tasks/stage.py), run in the order of the
stage table (flows/stages.py); the plan computed first says which stages will run and why, and the
run ends with a summary artifact (flows/summary.py: the run guards, the run log and the summary).
"""
from __future__ import annotations

from prefect import flow

from corpus2model.flows.prefect_tasks import register_task
from corpus2model.flows.stages import TABLE
from corpus2model.flows.summary import guarded_run, publish_summary, run_links
from corpus2model.schemas.config import load_config
from corpus2model.tasks.validate import save_stats


@flow(name="corpus2model", log_prints=True)
def pipeline(config_path: str, overrides: dict | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    with guarded_run(cfg) as run:
        # The stage table in order (flows/stages.py); each validation boundary stops the flow on an error.
        manifests = run.run([s.name for s in TABLE])
        registered = register_task({"source": run.source, **manifests}, cfg)
        save_stats(run.store.root, cfg.name, manifests)  # the baseline for the next run's distribution checks
    links = run_links(manifests, registered)
    md_path = publish_summary(run, links)
    return {"rows": [r.__dict__ for r in run.rows], "links": links, "registered": registered, "summary": str(md_path)}
