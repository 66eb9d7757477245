"""Issue 18: a stopped or killed run leaves no orphan process and no lock that blocks the next run;
a waiting lock says whom it waits for. Each test drives a real child process with a bounded timeout."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from corpus2model.flows.interrupts import descendants
from corpus2model.tasks.stage import Store

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an orphan reaped by init vanishes; a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _acquire_within(store: Store, name: str, seconds: float, say=None) -> bool:
    got = threading.Event()

    def take():
        with store.lock(name, say=say or (lambda m: None), poll_s=0.05):
            got.set()

    threading.Thread(target=take, daemon=True).start()
    return got.wait(seconds)


# A holder: takes the store lock, fans sleeping work out to a 2-worker fork pool (what ingest does), and
# prints its workers' pids. The workers never finish on their own.
HOLDER = textwrap.dedent("""
    import json, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from corpus2model.flows import interrupts
    from corpus2model.tasks.stage import Store
    interrupts.install(grace_s=5)
    with Store(sys.argv[1]).lock("ingest-key"):
        with ProcessPoolExecutor(2) as pool:
            futures = [pool.submit(time.sleep, 600) for _ in range(4)]
            time.sleep(1.0)
            print(json.dumps([p for p in pool._processes]), flush=True)
            futures[0].result()
""")


def _start_holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "store")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    workers = json.loads(proc.stdout.readline())
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    return proc, workers


def test_sigterm_stops_pool_workers_and_frees_the_lock(tmp_path):
    proc, workers = _start_holder(tmp_path)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        for p in workers:  # never leave them behind, even when the test fails
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "pool workers outlived a SIGTERM'd parent"
    assert _acquire_within(Store(tmp_path / "store"), "ingest-key", 5)
    assert "stopping (signal SIGTERM)" in proc.stderr.read()


def test_a_killed_holders_pool_workers_do_not_keep_its_lock(tmp_path):
    """kill -9 runs no handler: the workers live on, but they must not hold the lock (they close their
    inherited copy at fork), so the next run proceeds."""
    proc, workers = _start_holder(tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=10)
        assert any(_alive(p) for p in workers)  # the orphans are still there...
        assert _acquire_within(Store(tmp_path / "store"), "ingest-key", 5)  # ...yet the lock is free
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_waiter_names_the_holder_and_says_when_it_got_the_lock(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from corpus2model.tasks.stage import Store
        with Store(sys.argv[1]).lock("k"):
            print("held", flush=True)
            time.sleep(1.5)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said: list[str] = []
    assert _acquire_within(Store(tmp_path / "store"), "k", 15, say=said.append)
    holder.wait(timeout=10)
    assert f"held by pid {holder.pid} on {socket.gethostname()} since " in said[0]
    assert said[-1].startswith("lock ") and "acquired after" in said[-1]


def test_a_lock_whose_holder_died_on_this_host_is_taken_over(tmp_path):
    """An orphan from older code (or another pool) still has the file locked, but the pid in the note is gone."""
    import fcntl

    store = Store(tmp_path / "store")
    path = store.root / "_locks" / "k.lock"
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: conflicts like another process's would
    os.write(fd, json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z"}).encode())
    said: list[str] = []
    try:
        assert _acquire_within(store, "k", 5, say=said.append)
    finally:
        os.close(fd)
    assert f"held for pid {dead.pid}, which is gone" in said[0] and "taking it over" in said[0]


def test_descendants_lists_grandchildren():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not descendants(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        found = descendants()
        assert child.pid in found and len([p for p in found if p != child.pid]) >= 1
        assert set(descendants(child.pid)) < set(found)  # a subtree: the grandchild, not the child
    finally:
        # Only this test's subtree: this pytest process has other children (the session's Prefect
        # server), and killing them broke every later flow test.
        for p in [*descendants(child.pid), child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        child.wait()


def test_sigterm_to_c2m_server_leaves_no_server_process(tmp_path):
    """`c2m server` runs `python -m prefect server start`, which starts its own children. A stand-in
    `prefect` module (same shape: a child that starts a grandchild and ignores SIGTERM) shows that a
    SIGTERM'd `c2m server` leaves none of them."""
    fake = tmp_path / "fake" / "prefect"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(g.pid, flush=True)
        time.sleep(600)
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    script = ("import sys; from corpus2model.flows.cli import main; sys.exit(main(['server', '--port', '1']))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("Prefect UI:")
        grandchild = int(proc.stdout.readline())
        children = descendants(proc.pid)
        assert grandchild in children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) != 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if _alive(p)], "the server's processes outlived `c2m server`"
    finally:
        for p in descendants(proc.pid) if proc.poll() is None else []:
            os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


# -- the accelerator slot (runtime.gpu_tag): a killed holder never blocks later runs, a wait says so --------
def _runtime(tag: str):
    from corpus2model.schemas.config import parse_config

    return parse_config({"runtime": {"gpu_tag": tag}}).runtime


@pytest.mark.flow
def test_a_slot_left_by_a_killed_run_is_released(prefect_harness):
    """kill -9 on a temporary server: the database counts the slot, no lease will ever expire it."""
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from corpus2model.flows.prefect_tasks import recover_gpu_slots

    tag = f"gpu-{uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=1)
        client.increment_concurrency_slots(names=[f"tag:{tag}"], slots=1, mode="concurrency")
    said: list[str] = []
    state = recover_gpu_slots(_runtime(tag), said.append)
    assert state == {"limit": 1, "held_by": [], "released": 1}, said
    assert said == [f"released 1 '{tag}' slot(s) held by runs that are gone (no live lease)"]
    with concurrency(f"tag:{tag}", occupy=1, timeout_seconds=10):  # today: waits forever
        pass


@pytest.mark.flow
def test_a_live_holder_keeps_its_slot_and_a_waiting_stage_says_so(prefect_harness):
    from uuid import uuid4

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    from corpus2model.flows.prefect_tasks import recover_gpu_slots, reporting_gpu_waits

    tag, holder = f"gpu-{uuid4().hex[:8]}", uuid4()
    runtime = _runtime(tag)
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=1)
        lease = client.increment_concurrency_slots_with_lease(
            names=[f"tag:{tag}"], slots=1, mode="concurrency", lease_duration=60,
            holder=ConcurrencyLeaseHolder(type="task_run", id=holder)).json()["lease_id"]
    assert recover_gpu_slots(runtime, print) == {"limit": 1, "held_by": [str(holder)], "released": 0}

    said: list[str] = []

    def release_later():
        time.sleep(4)
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease)

    @task(tags=[tag, "stage:finetune"])
    def gpu_stage():
        return "ran"

    @flow
    def waits():
        threading.Thread(target=release_later, daemon=True).start()
        with reporting_gpu_waits(runtime, flow_run.id, every_s=1, log=said.append):
            return gpu_stage()

    assert waits() == "ran"
    waiting = [m for m in said if "waiting" in m]
    assert waiting and waiting[0].startswith("finetune waiting 1 s for the") and str(holder) in waiting[0]
