"""The whole DAG, top-down: raw corpus -> records -> shards -> tokens -> model -> registry.

Run it with ``c2m run configs/demo.yaml`` (or as a Prefect deployment with the same parameter).
Every stage is a cached Prefect task keyed by content (tasks/stage.py); the plan computed first
says which stages will run and why, and the run ends with a summary artifact.
"""
from __future__ import annotations

from prefect import flow

from corpus2model.schemas.config import load_config
from corpus2model.tasks.common.artifacts import publish_link, publish_markdown, publish_table
from corpus2model.flows.plan import RunRecord, check_runtime, plan
from corpus2model.flows.prefect_tasks import ensure_gpu_limit, register_task, scan_task
from corpus2model.tasks.common.security import install_log_redaction
from corpus2model.tasks.stage import Store
from corpus2model.flows.summary import RunLog, as_markdown, as_text, write_summary
from corpus2model.tasks.validate import save_stats


@flow(name="corpus2model", log_prints=True)
def pipeline(config_path: str, overrides: dict | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    install_log_redaction()
    check_runtime(cfg.runtime)
    ensure_gpu_limit(cfg.runtime)
    store = Store(cfg.paths.store)
    source = scan_task(cfg)
    steps = plan(cfg, store, source)
    run = RunLog(steps, cfg)
    try:
        ingest = run.stage("ingest", [source])
        run.check("check_raw", [source, ingest], store.root)  # each boundary stops the flow on an error
        clean = run.stage("clean", [ingest])
        dedup = run.stage("dedup", [clean])
        run.check("check_clean", [dedup], store.root)
        augment = run.stage("augment", [dedup])
        run.check("check_augment", [augment], store.root)
        validate = run.check("validate", [augment], store.root)
        shard = run.stage("shard", [validate])
        tokenize = run.stage("tokenize", [shard])
        finetune = run.stage("finetune", [tokenize])
        quantize = run.stage("quantize", [finetune])
        evaluate = run.stage("evaluate", [shard, tokenize, finetune, quantize])
        registered = register_task({"source": source, **run.manifests}, cfg)
        save_stats(store.root, cfg.name, run.manifests)  # the baseline for the next run's distribution checks
    finally:
        RunRecord(store, cfg.name).save(source, [s for s in steps if s.stage in run.manifests])

    links = {
        "validation report": str(validate.dir / validate.stats.get("docs_index", "data_docs/index.html")),
        "evaluation table": str(evaluate.dir / "eval.md"),
        "registered model": registered["path"],
        "production": str(registered.get("production")),
        "gate": "passed" if registered["gate"]["passed"] else "failed",
    }
    for stage in ("check_raw", "check_clean", "check_augment"):  # the boundary reports, beside the final one
        m = run.manifests[stage]
        links[f"{stage} report"] = str(m.dir / m.stats.get("docs_index", "data_docs/index.html"))
    md_path, _ = write_summary(store.root, cfg.name, run.rows, links)
    publish_table("run-summary", [r.__dict__ for r in run.rows], description=f"{cfg.name}: what ran, what was cached, and why")
    publish_markdown("run-summary-md", as_markdown(run.rows, f"Run summary: {cfg.name}") + "\n" + "\n".join(f"- {k}: `{v}`" for k, v in links.items()))
    publish_link("validation-report", "file://" + links["validation report"], "Great Expectations Data Docs")
    print("\n" + as_text(run.rows))
    return {"rows": [r.__dict__ for r in run.rows], "links": links, "registered": registered, "summary": str(md_path)}
