"""SIGTERM is stopped like Ctrl+C, and nothing this process started outlives it.

Ctrl+C reaches the whole foreground process group; ``kill PID`` (SIGTERM, what systemd, Slurm and
``docker stop`` send) reaches this process only, and its default action ends it without running any
``finally``: pool workers were left computing and holding the stage lock, and the Prefect server
child of ``c2m server`` / the temporary server of ``c2m run`` stayed up for hours.

``install()`` makes SIGTERM:
1. stop the process-pool workers at once (their half-done unit is discarded anyway, nothing of it is
   renamed into the store);
2. raise KeyboardInterrupt in the main thread, the Ctrl+C path: ``finally`` blocks release locks, Prefect
   marks the run crashed and stops its temporary server at exit;
3. after ``grace_s`` (or at a second signal), if the process is still here (a stage thread busy in
   torch, a child that ignores SIGTERM), stop every descendant and exit 143.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_SIGTERM = 128 + signal.SIGTERM

_main_pid: int | None = None
_stopping = threading.Event()


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below ``pid`` (default: this one), children before grandchildren. Linux reads
    /proc; elsewhere only multiprocessing children are known."""
    pid = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not proc.is_dir():
        return [p.pid for p in multiprocessing.active_children()] if pid == os.getpid() else []
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name (field 2) may hold spaces and parentheses: parse after the last ')'
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def stop_descendants(timeout_s: float = 5.0) -> list[int]:
    """SIGTERM every descendant, then SIGKILL what is left after ``timeout_s``. Returns the pids signalled."""
    pids = descendants()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        _reap()
        time.sleep(0.1)
    for pid in pids:
        if _exists(pid):
            _signal(pid, signal.SIGKILL)
    _reap()
    return pids


def install(grace_s: float = 10.0, echo=None) -> None:
    """Handle SIGTERM in this process as described above (a second SIGTERM stops at once); idempotent."""
    global _main_pid
    _main_pid = os.getpid()
    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def on_sigterm(signum, frame):
        if os.getpid() != _main_pid:
            # A forked pool worker inherited this handler: it must die as SIGTERM means, not raise
            # KeyboardInterrupt into the task it runs (the pool would send that back and carry on).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _stopping.is_set():  # second signal: no more patience
            _hard_stop(echo, signum)
        _stopping.set()
        echo(f"stopping (signal {signal.Signals(signum).name}): ending worker processes, releasing locks")
        for child in multiprocessing.active_children():
            child.terminate()
        threading.Thread(target=_deadline, args=(grace_s, echo, signum), name="c2m-stop", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def stopping() -> bool:
    """True once a SIGTERM was received."""
    return _stopping.is_set()


def _deadline(grace_s: float, echo, signum: int) -> None:
    time.sleep(grace_s)
    echo(f"still running {grace_s:.0f} s after the stop request: ending every child process now")
    _hard_stop(echo, signum)


def _hard_stop(echo, signum: int) -> None:
    stop_descendants()
    # Locks are flocks on descriptors this process (not its children: tasks/stage.py) holds: exiting frees them.
    os._exit(128 + signum)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill 0; it holds nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _reap() -> None:
    """Collect our own exited children so they do not linger as zombies."""
    multiprocessing.active_children()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
