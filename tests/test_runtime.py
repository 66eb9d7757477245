"""How stages execute (runtime section): task options, Dask, and that none of it touches a cache key."""
from __future__ import annotations

import os

import pytest

from corpus2model.schemas.config import ConfigError
from corpus2model.flows.plan import check_runtime
from corpus2model.flows.stages import DAG, STAGES
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
        assert stage_key(STAGES[name], a, [])[0] == stage_key(STAGES[name], b, [])[0], name


def test_dask_runner_settings(make_cfg):
    """The default runner needs no Dask; a local cluster gets single-thread worker processes (units are
    GIL-bound Python) on loopback; an address connects to a cluster someone else runs."""
    pytest.importorskip("prefect_dask")
    from corpus2model.flows.runners import task_runner

    assert task_runner(make_cfg().runtime) is None
    local = task_runner(make_cfg({"runtime": {"task_runner": "dask", "dask_workers": 3}}).runtime)
    assert local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["processes"] is True
    assert local.cluster_kwargs["threads_per_worker"] == 1 and local.cluster_kwargs["host"] == "127.0.0.1"
    remote = task_runner(make_cfg({"runtime": {"task_runner": "dask", "dask_address": "tcp://10.0.0.5:8786"}}).runtime)
    assert remote.address == "tcp://10.0.0.5:8786"


@pytest.mark.slow
def test_dask_runner_spreads_a_stages_units_over_the_cluster_and_matches_threads(tmp_path, make_cfg, prefect_harness):
    """A stage submitted to a Dask worker sends its units to every worker of the cluster (not a process
    pool on its own worker), reports to the flow's API (a progress artifact at 100%) and writes
    byte-identical output to the thread runner's, whose units go to a local process pool."""
    from distributed import Client, LocalCluster, get_task_stream
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    from corpus2model.flows.runners import task_runner
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.flows.prefect_tasks import stage_task
    from corpus2model.tasks.stage import Store

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"doc{i}.txt").write_text(f"Document {i}. " + "Some words that make a document. " * 20, encoding="utf-8")

    def run(runner_cfg, store):
        cfg = make_cfg({"paths": {"raw": str(raw), "store": str(store)}, "ingest": {"workers": 2}, **runner_cfg})
        source = scan_raw(cfg.paths.raw, cfg.ingest.include, Store(cfg.paths.store))

        @flow(name="runner-test")
        def f():  # with the run's task options (timeout, retries, tags), as flows/summary.py submits stages
            return stage_task.with_options(**stage_options("ingest", cfg.runtime)).submit("ingest", [source], cfg).result()

        runner = task_runner(cfg.runtime)
        return (f if runner is None else f.with_options(task_runner=runner))()

    # Workers are spawned processes: they learn the harness's API from the environment (flows/runners.py
    # does the same for `c2m run` with a temporary server). The cluster stands for one that
    # runtime.dask_address names (dask-jobqueue, dask-kubernetes); the test watches its task stream.
    os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            with get_task_stream(client) as stream:
                dask_m = run({"runtime": {"task_runner": "dask", "dask_address": cluster.scheduler_address,
                                  "default_timeout_s": 600}},  # a timed task still finds its worker
                             tmp_path / "store-dask")
            dask_workers = {t["worker"] for t in stream.data if t["key"].startswith("ingest-")}
    finally:
        os.environ.pop("PREFECT_API_URL", None)
    thread_m = run({}, tmp_path / "store-threads")
    assert len(dask_workers) == 2, "the units stayed on the stage's own worker"
    assert dask_m.key == thread_m.key
    assert dask_m.counters["out"] == thread_m.counters["out"] == 6
    assert [(f.path, f.sha256) for f in dask_m.files] == [(f.path, f.sha256) for f in thread_m.files]
    assert "store-dask" in dask_m.path and "store-threads" in thread_m.path
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["progress-ingest"])))
    done = [a for a in arts if a.data == 100 and "6/6 units" in (a.description or "")]
    assert len(done) >= 2, [(a.data, a.description) for a in arts]  # one from each runner
