"""Where per-unit work runs (DESIGN.md, "Scale"): in this process, a local process pool, or a Dask cluster.

A unit is one call ``fn(args) -> info`` (tasks/stage.py gather_units/map_units): it reads its input from
the store path in ``args``, writes its result into the store, and returns a small dict. Nothing else
crosses the process boundary, so the same call runs anywhere that sees the store at the same path, and
its output does not depend on where it ran.

* ``LocalUnits(workers)``: a ``ProcessPoolExecutor`` of ``workers`` processes (in this process when 1).
* ``DaskUnits(client)``: every unit is a Dask task, spread over all the cluster's workers. Used by
  ``unit_executor`` whenever the stage itself runs on a Dask worker (``runtime.task_runner: dask``: the
  flow's DaskTaskRunner shipped it there): the stage leaves its worker thread while it waits
  (``secede``), so its units use every worker thread of the cluster, its own included.
"""
from __future__ import annotations

import contextlib
import sys
import uuid
from typing import Any, Callable, Iterator


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """In a unit worker: let glibc keep memory a unit freed for the next unit instead of returning it.

    Each unit allocates and frees tens of MB (an inflated file, its lines, joined text for hashing,
    Arrow buffers); by default glibc serves each such block by mmap and unmaps it on free, so the next
    unit page-faults all of it in again: on the anchor corpus that was a third of ``c2m dedup``'s CPU
    as kernel time. With a high mmap threshold and no trimming, a worker's RSS stays at its largest
    unit's working set (bounded by the unit, as before) and the faults drop ~6x. A no-op off glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


class LocalUnits:
    """Units in a process pool of ``workers`` (in this process when ``workers`` is 1 or there is one unit)."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def __repr__(self) -> str:
        return f"LocalUnits(workers={self.workers})"

    def map(self, fn: Callable, items: list, name: str = "unit") -> Iterator[tuple[int, Any]]:
        """Yield (index, result) for every item, as they finish."""
        if self.workers > 1 and len(items) > 1:
            from concurrent.futures import ProcessPoolExecutor

            # pool.map keeps the items in order and ships them in chunks (a unit can be a 1 KB file): its
            # results still arrive one by one, in order, which is what progress needs.
            chunk = max(1, len(items) // (4 * self.workers))
            with ProcessPoolExecutor(min(self.workers, len(items)), initializer=keep_freed_memory) as pool:
                try:
                    yield from enumerate(pool.map(fn, items, chunksize=chunk))
                except BaseException:  # a unit failed, or the caller stopped reading: drop what is queued
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        else:
            for i, item in enumerate(items):
                yield i, fn(item)


class DaskUnits:
    """Units as tasks of a dask.distributed cluster.

    ``client``: a ``distributed.Client``; None: the cluster this process is a worker of. At most
    ``in_flight`` units (default: 4 per worker thread) are submitted at a time, so a million-unit stage
    does not put a million tasks and their arguments on the scheduler at once."""

    def __init__(self, client=None, in_flight: int | None = None):
        self.client = client
        self.in_flight = in_flight

    def __repr__(self) -> str:
        return f"DaskUnits({self.client!r})" if self.client is not None else "DaskUnits(this worker's cluster)"

    @contextlib.contextmanager
    def _client(self):
        if self.client is not None:
            yield self.client
            return
        from distributed import get_client, rejoin, secede

        client = get_client()
        try:
            # Leave the worker's thread pool while this stage only waits for its units: a 1-thread worker
            # then runs units too, instead of holding its only thread for a coordinator that sleeps.
            secede()
            seceded = True
        except Exception:  # not on a task thread of the worker (e.g. a thread Prefect started): keep it
            seceded = False
        try:
            yield client
        finally:
            if seceded:
                rejoin()

    def map(self, fn: Callable, items: list, name: str = "unit") -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        if not items:
            return
        with self._client() as client:
            window = self.in_flight or max(2, 4 * sum(client.nthreads().values()))
            # Unique task keys: a unit submitted again (a rerun, a second run on the same cluster) is a new
            # task, never a stale or failed result the scheduler still holds. The dashboard groups tasks
            # by the key's prefix, so each stage's units show as one group.
            run = uuid.uuid4().hex[:8]
            index: dict = {}

            def submit(i: int):
                fut = client.submit(fn, items[i], key=f"{name}-{run}-{i}")
                index[fut.key] = i
                return fut

            todo = iter(range(len(items)))
            pending = as_completed([submit(i) for _, i in zip(range(window), todo)])
            try:
                for fut in pending:
                    i = index.pop(fut.key)
                    result = fut.result()  # raises the unit's own exception, with its traceback
                    fut.release()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.add(submit(nxt))
                    yield i, result
            finally:
                left = list(pending.futures)  # submitted, not yet yielded
                if left:  # an error or an interrupt: do not leave the cluster computing units nobody reads
                    client.cancel(left)


def on_dask_worker() -> bool:
    """True when this code runs inside a dask.distributed worker (``runtime.task_runner: dask``)."""
    if "distributed" not in sys.modules:  # cheap: a worker has imported it long before a stage runs
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def unit_executor(workers: int = 1, chosen=None):
    """The executor for a stage's units: ``chosen`` (StageContext.executor) if given, else the Dask
    cluster this stage runs on, else a local pool of the stage's ``workers``."""
    if chosen is not None:
        return chosen
    if on_dask_worker():
        return DaskUnits()
    return LocalUnits(workers)
