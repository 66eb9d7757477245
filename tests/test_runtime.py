"""How stages execute (runtime section): task options, Dask, and that none of it touches a cache key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from corpus2model.schemas.config import ConfigError
from corpus2model.flows.plan import DAG, check_runtime, module
from corpus2model.flows.prefect_tasks import stage_options
from corpus2model.tasks.stage import stage_key


def test_stage_options_carry_timeout_retries_and_gpu_tag(make_cfg):
    cfg = make_cfg({"runtime": {"stage_timeout_s": {"finetune": 900}, "default_timeout_s": 120, "retries": 1,
                                "retry_delays_s": [2]}})
    ft = stage_options("finetune", cfg.runtime)
    assert ft["timeout_seconds"] == 900 and ft["retries"] == 1 and ft["retry_delay_seconds"] == [2]
    assert "c2m-gpu" in ft["tags"] and "stage:finetune" in ft["tags"]
    ingest = stage_options("ingest", cfg.runtime)
    assert ingest["timeout_seconds"] == 120 and "c2m-gpu" not in ingest["tags"]


def test_runtime_names_unknown_stages(make_cfg):
    with pytest.raises(ConfigError, match="runtime.gpu_stages: unknown stage.*'finetun'"):
        check_runtime(make_cfg({"runtime": {"gpu_stages": ["finetun"]}}).runtime)
    with pytest.raises(ConfigError, match="runtime.stage_timeout_s"):
        check_runtime(make_cfg({"runtime": {"stage_timeout_s": {"nope": 5}}}).runtime)
    check_runtime(make_cfg({"runtime": {"stage_timeout_s": {name: 5 for name, _ in DAG}}}).runtime)


def test_runtime_section_never_changes_a_stage_key(make_cfg):
    """Switching to Dask or changing a timeout must recompute nothing."""
    a = make_cfg()
    b = make_cfg({"runtime": {"task_runner": "dask", "dask_workers": 3, "default_timeout_s": 60, "retries": 0}})
    for name, _ in DAG:
        assert stage_key(module(name), a, [])[0] == stage_key(module(name), b, [])[0], name


@pytest.mark.slow
def test_dask_runner_runs_a_stage_with_its_process_pool_and_matches_threads(tmp_path, make_cfg, prefect_harness):
    """A stage submitted to a Dask worker (non-daemonic, so its own process pool works) reports to the
    flow's API and writes byte-identical output to the thread runner's."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    from corpus2model.flows.runners import task_runner
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.flows.prefect_tasks import stage_task
    from corpus2model.tasks.stage import Store

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        (raw / f"doc{i}.txt").write_text(f"Document {i}. " + "Some words that make a document. " * 20, encoding="utf-8")

    def run(runner_cfg, store):
        cfg = make_cfg({"paths": {"raw": str(raw), "store": str(store)}, "ingest": {"workers": 2}, **runner_cfg})
        source = scan_raw(cfg.paths.raw, cfg.ingest.include, Store(cfg.paths.store))

        @flow(name="runner-test")
        def f():
            return stage_task.submit("ingest", [source], cfg).result()

        runner = task_runner(cfg.runtime)
        return (f if runner is None else f.with_options(task_runner=runner))()

    # Workers are spawned processes: they learn the harness's API from the environment (flows/runners.py
    # does the same for `c2m run` with a temporary server).
    os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
    try:
        dask_m = run({"runtime": {"task_runner": "dask", "dask_workers": 1}}, tmp_path / "store-dask")
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    thread_m = run({}, tmp_path / "store-threads")
    assert dask_m.key == thread_m.key
    assert dask_m.counters["out"] == thread_m.counters["out"] == 4
    assert [(f.path, f.sha256) for f in dask_m.files] == [(f.path, f.sha256) for f in thread_m.files]
    assert "store-dask" in dask_m.path and "store-threads" in thread_m.path
