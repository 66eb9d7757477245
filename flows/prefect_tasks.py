"""The thin Prefect wrappers around the stage contract (one for every stage, one for the scan,
one for registration).

Prefect's cache key is our content key (``cache_key_fn``), and results persist in the project
(PREFECT_LOCAL_STORAGE_PATH), so a new process or a scheduled run gets the hit. Prefect cannot
see that a cached output was damaged after the fact; the flow's plan verifies every output
before the run and passes ``refresh_cache=True`` for any that failed, so the stage recomputes.
"""
from __future__ import annotations

import contextlib
import os
import threading

from prefect import task
from prefect.cache_policies import NO_CACHE

from corpus2model.flows.stages import STAGES
from corpus2model.tasks.stage import Manifest, StageContext, StageError, Store, run_stage, sha256_bytes, stage_key


def _stage_cache_key(context, parameters) -> str:
    """The content key, plus which store holds that content: Prefect's cached value is a manifest
    pointing into one store, so two stores (two projects, two tests) must never share a record."""
    stage, cfg, inputs = parameters["stage"], parameters["cfg"], parameters["inputs"]
    key, _ = stage_key(STAGES[stage], cfg, inputs)
    store_id = sha256_bytes(str(Store(cfg.paths.store).root).encode())[:8]
    return f"c2m-{stage}-{key}-{store_id}"


def retry_transient(task, task_run, state) -> bool:
    """Retry only what can pass by itself (an I/O hiccup on a network filesystem, a timeout); never a
    StageError: bad data, a bad config or a full disk fail the same way every time."""
    try:
        state.result()
    except StageError:
        return False
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False


@task(
    name="stage",
    cache_key_fn=_stage_cache_key,
    persist_result=True,
    # JSON, not pickle: a cached result is read back from files in the project, and unpickling a file
    # runs whatever it says. Prefect's JSON encoder round-trips the Manifest dataclass exactly.
    result_serializer="json",
    task_run_name="{stage}",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_transient,
)
def stage_task(stage: str, inputs: list[Manifest], cfg) -> Manifest:
    from prefect import get_run_logger

    ctx = StageContext(store=Store(cfg.paths.store), log=get_run_logger())
    return run_stage(STAGES[stage], inputs, cfg, ctx)


def stage_options(stage: str, runtime) -> dict:
    """Prefect task options for one stage from the config's runtime section (not hashed: changing a
    timeout or a retry policy never invalidates a cached output)."""
    timeout = runtime.stage_timeout_s.get(stage, runtime.default_timeout_s)
    opts = {
        "retries": runtime.retries,
        "retry_delay_seconds": list(runtime.retry_delays_s) or 0,
        "timeout_seconds": timeout,
        "tags": ["corpus2model", f"stage:{stage}"],
    }
    if stage in runtime.gpu_stages:
        opts["tags"].append(runtime.gpu_tag)
    return opts


def talks_to_real_server() -> bool:
    """True when PREFECT_API_URL names a server the user runs (`c2m server`), not the temporary one
    Prefect (or flows/runners.py for Dask) starts for a single run."""
    url = os.environ.get("PREFECT_API_URL")
    return bool(url) and url != os.environ.get("C2M_TEMPORARY_API_URL")


def ensure_gpu_limit(runtime, log=print) -> int | None:
    """Make sure the tag concurrency limit for accelerator stages exists on the server the flow talks to
    (idempotent: an existing limit is left as the operator set it). Returns the limit in force.

    Only on a real server: a temporary server keeps slot leases in memory, so a run killed while it held
    the slot would leave the slot counted in the project's database with no lease to expire, and every
    later run would wait for it forever. A real server's lease reaper frees a dead run's slot."""
    if not talks_to_real_server():
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            try:
                return client.read_concurrency_limit_by_tag(runtime.gpu_tag).concurrency_limit
            except Exception:  # ObjectNotFound: first run against this server
                client.create_concurrency_limit(tag=runtime.gpu_tag, concurrency_limit=runtime.gpu_concurrency)
                return runtime.gpu_concurrency
    except Exception as e:  # the limit protects a shared GPU; a CPU run must not fail for it
        log(f"could not set the '{runtime.gpu_tag}' concurrency limit: {e}")
        return None


def recover_gpu_slots(runtime, log=print) -> dict | None:
    """Free the accelerator slots that no live run holds, and say who holds the others.

    Prefect counts a tag limit's occupied slots in its database and keeps one lease per holder (60 s,
    renewed while the holder lives). A run killed with -9 never releases its slot; on a server without
    the lease reaper (every temporary server) the count stayed at 1 and each later run waited at
    finetune forever, silently. Leases persist in the project (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE,
    flows/cli.py) so every server of the project sees every live holder: occupied slots beyond the live
    leases belong to runs that are gone, and are released here.

    Returns {"limit", "held_by": [task run ids], "released"}, or None when no limit exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = f"tag:{runtime.gpu_tag}"
    try:
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:  # no limit on this server: nothing can wait on it
                return None
            holders = [str(h) for h in client.read_concurrency_limit_by_tag(runtime.gpu_tag).active_slots]
            stale = limit.active_slots - len(holders)
            if stale > 0:
                # occupancy only feeds slot decay (rate limits, not ours); the API wants it > 0
                client.release_concurrency_slots(names=[name], slots=stale, occupancy_seconds=0.001)
                log(f"released {stale} '{runtime.gpu_tag}' slot(s) held by runs that are gone (no live lease)")
            return {"limit": limit.limit, "held_by": holders, "released": max(stale, 0)}
    except Exception as e:  # never fail a run for the bookkeeping of a shared GPU
        log(f"could not check the '{runtime.gpu_tag}' concurrency slots: {e}")
        return None


@contextlib.contextmanager
def reporting_gpu_waits(runtime, flow_run_id, every_s: float = 30.0, log=print):
    """While the body runs, every ``every_s``: free slots of dead runs, and if a stage of this flow run is
    waiting for the accelerator slot, say so, for how long, and who holds it. Prefect's own wait says
    nothing, which made a stuck slot look like a hung run."""
    stop = threading.Event()

    def watch():
        waited = 0.0
        while not stop.wait(every_s):
            state = recover_gpu_slots(runtime, log)
            pending = _pending_gpu_task_runs(runtime, flow_run_id) if state else []
            if pending and len(state["held_by"]) >= state["limit"]:
                waited += every_s
                log(f"{', '.join(pending)} waiting {waited:.0f} s for the '{runtime.gpu_tag}' slot "
                    f"(limit {state['limit']}), held by task run(s) {', '.join(state['held_by'])}; "
                    f"a dead holder's slot is freed within {LEASE_SECONDS + every_s:.0f} s")
            else:
                waited = 0.0

    thread = threading.Thread(target=watch, name="c2m-gpu-wait", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


LEASE_SECONDS = 60  # the task engine's lease on a tag slot (prefect/task_engine.py), renewed while it runs


def _pending_gpu_task_runs(runtime, flow_run_id) -> list[str]:
    """Names of this flow run's task runs tagged for the accelerator that have not started (waiting for a slot)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType, TaskRunFilterTags)
    from prefect.client.schemas.objects import StateType

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[runtime.gpu_tag]),
                                              state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.PENDING]))))
    except Exception:
        return []
    # the stage tag (stage_options): a pending run does not carry its custom name yet
    return [next((t.split(":", 1)[1] for t in r.tags if t.startswith("stage:")), r.name) for r in runs]


@task(name="scan-raw", cache_policy=NO_CACHE, task_run_name="source")
def scan_task(cfg) -> Manifest:
    """Always runs: it is how a run learns that a raw file was added or edited (cheap: stat cache)."""
    from corpus2model.tasks.ingest import scan_raw

    return scan_raw(cfg.paths.raw, cfg.ingest.include, Store(cfg.paths.store))


@task(name="register", cache_policy=NO_CACHE, task_run_name="register")
def register_task(manifests: dict[str, Manifest], cfg) -> dict:
    """Idempotent: a rerun finds the version with the same lineage and registers nothing new."""
    from corpus2model.tasks.registry import register

    return register(manifests, cfg)
