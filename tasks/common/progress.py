"""Progress of a long stage: units done / total, MB/s and an ETA, where a person looks.

* In a terminal (stderr is a TTY): one rich progress line, shown only once the work has run for
  ``show_after_s`` (a demo stage that takes 0.2 s prints nothing) and removed when it ends (the run
  log prints the stage's line right after). Not a TTY (a log file, a Slurm job, a Dask worker):
  nothing, so logs stay readable.
* In a Prefect run: a progress artifact (``create_progress_artifact``), updated at most every
  ``artifact_every_s``, whose description carries the same line, so a 100 GB run shows in the UI where
  it is. Outside a Prefect run (tests, ``c2m`` standalone commands with no server): no artifact.

The rate is bytes of input per second since the work started; ETA is the bytes left at that rate
(units left at the unit rate when the caller knows no sizes). A progress report must never fail the
stage: a UI or API error turns the report off, not the run.

A stage whose work runs as several kinds of units (dedup: sketches, partitions, verification, kept
parts) names each kind for people with ``describe(unit_stage, label)``: the line then reads
``dedup 2/4 partitions: 3/8 units, ...`` instead of the unit stage's store name.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("corpus2model")

# unit stage name -> what the progress line calls it (``describe``)
LABELS: dict[str, str] = {}


def describe(unit_stage: str, label: str) -> None:
    """Show the units of ``unit_stage`` as ``label`` (e.g. a phase of a stage) in progress lines."""
    LABELS[unit_stage] = label


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``with Progress("clean", total=40, total_bytes=...) as p: ... p.advance(1, nbytes)``."""

    def __init__(self, name: str, total: int, total_bytes: int = 0, *, show_after_s: float = 1.0,
                 artifact_every_s: float = 5.0, terminal: bool | None = None, artifact: bool = True):
        self.name = name
        self.label = LABELS.get(name, name)
        self.total = total
        self.total_bytes = total_bytes
        self.done = 0
        self.done_bytes = 0
        self.show_after_s = show_after_s
        self.artifact_every_s = artifact_every_s
        self.t0 = time.perf_counter()
        self._terminal = _stderr_is_tty() if terminal is None else terminal
        self._bar = None  # rich Progress once shown
        self._bar_task = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._artifact_id = None
        self._artifact = artifact and total > 0 and _in_prefect_run()
        self._artifact_sent = 0.0
        self._closed = False

    # -- what is reported --------------------------------------------------------------------
    def rate(self) -> float:
        """Bytes per second of input (units per second when no sizes are known)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return (self.done_bytes if self.total_bytes else self.done) / elapsed

    def eta(self) -> float | None:
        r = self.rate()
        left = (self.total_bytes - self.done_bytes) if self.total_bytes else (self.total - self.done)
        return left / r if r > 0 else None

    def line(self) -> str:
        """``clean: 12/40 units, 96.0/320.0 MB, 35.1 MB/s, ETA 0:06``."""
        parts = [f"{self.done}/{self.total} units"]
        if self.total_bytes:
            parts.append(f"{self.done_bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB")
            mbs = self.rate() / 1e6
            parts.append(f"{mbs:.2f} MB/s" if mbs < 10 else f"{mbs:.0f} MB/s")  # clean runs under 1 MB/s a core
        else:
            parts.append(f"{self.rate():.2f} units/s")
        eta = self.eta()
        if self.done < self.total:
            parts.append(f"ETA {_clock(eta)}" if eta is not None and self.done else "ETA unknown")
        else:
            parts.append(f"took {_clock(time.perf_counter() - self.t0)}")
        return f"{self.label}: " + ", ".join(parts)

    def fraction(self) -> float:
        if self.total_bytes:
            return min(1.0, self.done_bytes / self.total_bytes)
        return min(1.0, self.done / self.total) if self.total else 1.0

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(ok=exc_type is None)

    def start(self) -> None:
        if self.total <= 0:
            return
        if self._artifact:
            self._send_artifact(force=True)
        if self._terminal:
            # A timer, not the first advance: the first unit of a big stage may itself take a minute.
            self._timer = threading.Timer(self.show_after_s, self._show)
            self._timer.daemon = True
            self._timer.start()

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self.done += units
            self.done_bytes += nbytes
            if self._bar is not None:
                self._bar.update(self._bar_task, completed=self._completed(), info=self._info())
        if self._artifact:
            self._send_artifact()

    def close(self, ok: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
        if self._artifact and self.total > 0:
            self._send_artifact(force=True, failed=not ok)

    # -- the two outputs ------------------------------------------------------------------
    def _completed(self) -> float:
        return self.done_bytes if self.total_bytes else self.done

    def _info(self) -> str:
        return self.line().split(": ", 1)[1]

    def _show(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
        except ImportError:  # rich comes with Prefect; a data-only install reports through the artifact only
            return
        with self._lock:
            if self._closed:
                return
            # The elapsed clock ticks between units, so a slow unit does not look like a hang.
            bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=True, refresh_per_second=2)
            self._bar_task = bar.add_task(self.label, total=(self.total_bytes or self.total), completed=self._completed(),
                                          info=self._info())
            bar.start()
            self._bar = bar

    def _send_artifact(self, force: bool = False, failed: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._artifact_sent < self.artifact_every_s:
            return
        self._artifact_sent = now
        description = self.line() + (" (stopped by an error)" if failed else "")
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            pct = round(100.0 * self.fraction(), 1)
            if self._artifact_id is None:
                from corpus2model.tasks.common.artifacts import artifact_key

                self._artifact_id = create_progress_artifact(progress=pct, key=artifact_key(f"progress-{self.name}"),
                                                             description=description)
            else:
                update_progress_artifact(self._artifact_id, progress=pct, description=description)
        except Exception as e:  # the run matters more than its progress report
            log.warning("progress artifact for %s turned off: %s", self.name, e)
            self._artifact = False


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _in_prefect_run() -> bool:
    from corpus2model.tasks.common.artifacts import _in_prefect_run as in_run

    return in_run()
