"""The whole DAG, top-down: raw corpus -> records -> shards -> tokens -> model -> registry.

Run it with ``c2m run configs/demo.yaml`` (or as a Prefect deployment with the same parameter).
Every stage is a cached Prefect task keyed by content (tasks/stage.py), run in the order of the
stage table (flows/stages.py); the plan computed first says which stages will run and why, and the
run ends with a summary artifact (flows/summary.py: the run guards, the run log and the summary).
"""
from __future__ import annotations

import dataclasses

from prefect import flow

from corpus2model.flows.prefect_tasks import register_task
from corpus2model.flows.stages import TABLE, Node, ablated_config, nodes
from corpus2model.flows.summary import RunLog, guarded_run, publish_summary, run_links
from corpus2model.schemas.config import load_config
from corpus2model.tasks.validate import save_stats


@flow(name="corpus2model", log_prints=True)
def pipeline(config_path: str, overrides: dict | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    with guarded_run(cfg) as run:
        # The stage table in order (flows/stages.py); each validation boundary stops the flow on an error.
        # With evaluate.ablate, each ablation branch runs just before evaluate, which also scores its model.
        for node in nodes(cfg.evaluate.ablate):
            if node.ablation is None and node.inputs == node.stage.inputs:
                run.run([node.label])
            else:
                run_node(run, node)
        # The model's own lineage and the next run's drift baselines: the branch outputs are neither.
        manifests = {s.name: run.manifests[s.name] for s in TABLE}
        registered = register_task({"source": run.source, **manifests}, cfg)
        save_stats(run.store.root, cfg.name, manifests)  # the baseline for the next run's distribution checks
    links = run_links(manifests, registered)
    md_path = publish_summary(run, links)
    return {"rows": [r.__dict__ for r in run.rows], "links": links, "registered": registered, "summary": str(md_path)}


def run_node(run: RunLog, node: Node):
    """A node the table alone does not describe. evaluate with the ablated models as extra inputs runs as
    itself; a branch node runs its stage through a RunLog of the ablated config (same Prefect task, same
    cache keys as the plan's), shown and recorded under its label. A branch's validate gets no drift
    check: its baseline is the main run's validate, which it differs from by design."""
    inputs = [run.source if u == "source" else run.manifests[u] for u in node.inputs]
    if node.ablation is None:
        return run.stage(node.label, inputs)
    name = node.stage.name
    branch = RunLog([dataclasses.replace(run.steps[node.label], stage=name)], ablated_config(run.cfg, node.ablation),
                    echo=lambda msg: run.echo(msg.replace(f"[{name}]", f"[{node.label}]", 1)),
                    store=run.store, source=run.source)
    try:
        m = branch.stage(name, inputs)
    finally:  # a failed branch stage is a row of this run's summary too
        for row in branch.rows:
            row.stage = node.label
        run.rows += branch.rows
    run.manifests[node.label] = m  # the run record keeps the branch's keys for the next run's "why"
    return m
