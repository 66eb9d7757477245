"""Schedules: the pipeline as a Prefect deployment with a cron schedule on a real Prefect server.

``c2m deploy CONFIG --cron "0 3 * * *"`` registers the deployment (parameter: the config path,
absolute) and then serves it: this process is the runner that executes the scheduled runs, which
appear in the UI like any other run. ``--no-serve`` only registers it (for a worker elsewhere).
A temporary server cannot hold schedules, so a real one must be running (``c2m server``).
"""
from __future__ import annotations

import os
from pathlib import Path


class DeployError(RuntimeError):
    pass


def deployment_for(config_path: str | Path, cron: str, name: str | None = None):
    from corpus2model.flows.runners import flow_for
    from corpus2model.schemas.config import load_config

    cfg = load_config(config_path)  # refuse a bad config now, not at 3 a.m.
    path = str(Path(config_path).resolve())
    # The served flow carries the config's task runner (Dask or threads): scheduled runs execute alike.
    return flow_for(cfg).to_deployment(
        name=name or cfg.name,
        cron=cron,
        parameters={"config_path": path},
        tags=["corpus2model", cfg.name],
        description=f"corpus2model DAG for {path}; reruns only what changed since the last run",
    )


def deploy(config_path: str | Path, cron: str, name: str | None = None, serve: bool = True) -> str:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise DeployError(
            "a schedule needs a running Prefect server: start `c2m server` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, then deploy again"
        )
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise DeployError(f"--cron {cron!r} is not a valid cron expression (e.g. '0 3 * * *' for 03:00 daily)") from None
    deployment = deployment_for(config_path, cron, name)
    deployment_id = str(deployment.apply())
    from corpus2model.schemas.config import load_config
    from corpus2model.flows.prefect_tasks import ensure_gpu_limit

    runtime = load_config(config_path).runtime
    limit = ensure_gpu_limit(runtime)
    if limit is not None:
        print(f"concurrency limit '{runtime.gpu_tag}': {limit} (stages {', '.join(runtime.gpu_stages)})")
    print(f"deployment {deployment.flow_name}/{deployment.name} ({deployment_id}) scheduled '{cron}' on {api}")
    if serve:
        from prefect import serve as prefect_serve

        print("serving it: scheduled runs execute in this process (Ctrl+C stops; the schedule stays)")
        prefect_serve(deployment)
    return deployment_id
