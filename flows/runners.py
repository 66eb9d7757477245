"""Where the stage tasks execute: Prefect's default thread pool, or Dask (prefect-dask).

``runtime.task_runner: dask`` runs every submitted stage on a Dask worker: a local cluster of
``runtime.dask_workers`` processes, or an existing scheduler at ``runtime.dask_address``. Two things
make that work here (ENVIRONMENT.md):

* every worker must report to the same Prefect API as the flow, else each one starts its own
  temporary server and the runs vanish from the UI. With no ``PREFECT_API_URL`` exported,
  ``prefect_api`` starts one temporary server for the whole run and exports its URL before the
  cluster is spawned, so the workers inherit it;
* local workers are not daemonic, because a stage fans its files out to a process pool of its own
  (tasks/stage.py gather_units) and daemonic processes cannot have children.

The section is not hashed: switching runners recomputes nothing and the outputs are identical.
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
    # cores. Our DAG is a chain: one stage (one worker) runs at a time, so that pinning only halves
    # finetune on 2 cores. Give every worker the machine's threads instead.
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
            "dashboard_address": None,  # nothing listens beyond what the run needs
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
