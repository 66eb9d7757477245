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
  ``prefect_api`` starts one temporary server for the whole run (any runner: see TemporaryServer for
  why not Prefect's own) and exports its URL before the cluster is spawned, so the workers inherit it;
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


class TemporaryServer:
    """The temporary Prefect API server a run gets when no PREFECT_API_URL is set: the same process
    Prefect's ephemeral mode starts (``prefect.server.api.server.SubprocessASGIServer``: uvicorn with
    ``create_app``, UI off, on 127.0.0.1, over the project's database in PREFECT_HOME), so the run is an
    ordinary flow run that ``c2m server`` shows later. Started by us rather than by Prefect's client
    because Prefect starts it only at the flow's first API call and then waits for it to boot: 3-4 s of
    server start-up plus 3 s to import the server module in the run's own process, all serial. Here the
    process is launched before the run imports Prefect, boots while the run imports its code, and the
    run waits only for what is left (``wait``)."""

    def __init__(self):
        import subprocess
        import sys
        from importlib.util import find_spec

        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        app_dir = os.path.dirname(os.path.dirname(find_spec("prefect").origin))  # site-packages, as Prefect passes it
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> None:
        """Block until the server answers /health; a clear error if it exits or does not come up."""
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the temporary Prefect server exited with code {self.proc.returncode} before it "
                                 f"answered (port {self.port}); start one with `c2m server` and export PREFECT_API_URL")
            try:
                with urllib.request.urlopen(self.api_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                         "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); start one with `c2m server` and "
                         "export PREFECT_API_URL")

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _configured_api_url() -> str | None:
    """The API URL the run would use as things stand: the environment, or, once Prefect is imported in
    this process (a test harness, an embedding program), Prefect's current settings."""
    import sys

    url = os.environ.get("PREFECT_API_URL")
    if url or "prefect.settings" not in sys.modules:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@contextlib.contextmanager
def prefect_api(cfg, echo=print, before_wait=None):
    """Yield the API URL the run talks to. With no server configured, start one temporary server for the
    run (and stop it after): the flow, its task runs and, with Dask, every worker share it.
    ``before_wait()`` runs after the server process is launched and before waiting for it to answer:
    the caller's imports and other start-up overlap the server's boot."""
    url = _configured_api_url()
    if url or cfg.runtime.dask_address:
        # A remote scheduler's workers cannot reach a temporary server on this machine's loopback:
        # they need a real one (`c2m server`), which PREFECT_API_URL names.
        if cfg.runtime.dask_address and not url:
            raise SystemExit("runtime.dask_address needs a real Prefect server the workers can reach: "
                             "start `c2m server` and export PREFECT_API_URL=http://HOST:4200/api")
        if before_wait is not None:
            before_wait()
        yield url
        return
    server = TemporaryServer()
    # Exported before Prefect is imported: Prefect reads its settings from the environment once.
    os.environ["PREFECT_API_URL"] = os.environ["C2M_TEMPORARY_API_URL"] = server.api_url
    try:
        if before_wait is not None:
            before_wait()
        server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    except BaseException:
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop("C2M_TEMPORARY_API_URL", None)
        server.stop()
        raise
    echo(f"temporary Prefect server for this run: {server.api_url} (export PREFECT_API_URL to use your own)")
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
