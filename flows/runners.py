"""Where the stage tasks and their units execute: Prefect's default thread pool, or Dask (prefect-dask).

``runtime.task_runner: dask`` runs every submitted stage on a Dask worker: a local cluster of
``runtime.dask_workers`` processes, or an existing scheduler at ``runtime.dask_address`` (dask-jobqueue
on Slurm, dask-kubernetes: README "Running on a cluster"). A unit-based stage that finds itself on a
Dask worker submits its units (files, parts, shards) one by one to the same cluster and leaves its
worker thread while it waits (tasks/common/executor.py), so the units spread over every worker instead
of one stage per worker. With the default runner the units go to a local process pool of the stage's
``workers``. Three things make Dask work here (ENVIRONMENT.md):

* every worker must report to the same Prefect API as the flow, else each one starts its own
  temporary server and the runs vanish from the UI. With no ``PREFECT_API_URL`` exported,
  ``prefect_api`` starts one temporary server for the whole run and exports its URL before the
  cluster is spawned, so the workers inherit it;
* every worker sees the store at the same path (paths.store on a shared filesystem): a unit reads its
  input and writes its result there, and only paths and small dicts travel through Dask;
* local workers are not daemonic, because code that has not moved to units yet keeps a process pool of
  its own (dedup's sketches, tasks/text/dedup_jsonl.py) and daemonic processes cannot have children.

The section is not hashed: switching runners recomputes nothing and the outputs are byte-identical
(tests/test_executors.py).
"""
from __future__ import annotations

import contextlib
import os


def task_runner(runtime):
    """The Prefect task runner for ``runtime`` (None: the flow's default)."""
    if runtime.task_runner != "dask":
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise SystemExit("runtime.task_runner: dask needs prefect-dask: pip install -e '.[flow]'") from None
    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    import dask

    # Dask pins each worker's BLAS/OpenMP pools to one thread so that workers do not oversubscribe the
    # cores. Units (ingest/clean/dedup/shard/tokenize) are pure-Python text work that uses no BLAS pool,
    # and the stages that do (finetune, quantize, evaluate) run one at a time, so that pinning only
    # halves finetune on 2 cores. Give every worker the machine's threads instead.
    threads = str(os.cpu_count() or 1)
    dask.config.set({
        "distributed.worker.daemon": False,
        "distributed.nanny.pre-spawn-environ": {
            "MALLOC_TRIM_THRESHOLD_": 65536, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
        },
    })
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runtime.dask_workers,
            "threads_per_worker": runtime.dask_threads_per_worker,
            "processes": True,
            # Loopback only. The dashboard shows every unit task as it runs (8787, or a free port when
            # taken: Prefect logs the link); None would not turn it off, it means the default ":8787".
            "dashboard_address": "127.0.0.1:8787",
            "host": "127.0.0.1",
        },
    )


def flow_for(cfg):
    """The pipeline flow with the task runner the config asks for."""
    from corpus2model.flows.pipeline import pipeline

    runner = task_runner(cfg.runtime)
    return pipeline if runner is None else pipeline.with_options(task_runner=runner)


@contextlib.contextmanager
def prefect_api(cfg, echo=print):
    """Yield the API URL the run talks to. For Dask with no server configured, start one temporary
    server for the run (and stop it after), so the flow and all workers share it."""
    url = os.environ.get("PREFECT_API_URL")
    if url or cfg.runtime.task_runner != "dask" or cfg.runtime.dask_address:
        # A remote scheduler's workers cannot reach a temporary server on this machine's loopback:
        # they need a real one (`c2m server`), which PREFECT_API_URL names.
        if cfg.runtime.dask_address and not url:
            raise SystemExit("runtime.dask_address needs a real Prefect server the workers can reach: "
                             "start `c2m server` and export PREFECT_API_URL=http://HOST:4200/api")
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    os.environ["PREFECT_API_URL"] = os.environ["C2M_TEMPORARY_API_URL"] = server.api_url
    echo(f"temporary Prefect server for this Dask run: {server.api_url}")
    try:
        yield server.api_url
    finally:
        # Send the queued logs and events while the server is still up: at interpreter exit Prefect
        # would otherwise keep retrying them against the stopped server.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):
            try:
                service.drain_all(timeout=10)
            except Exception:
                pass
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop("C2M_TEMPORARY_API_URL", None)
        server.stop()
