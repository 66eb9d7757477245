"""Progress a person can watch (issue 17 item 4): units done / total, MB/s and an ETA on a terminal,
nothing on a non-terminal, and one report per finished unit from the unit runner."""
from __future__ import annotations

import io
import re
import sys

import pytest

from corpus2model.tasks.common import progress as progress_mod
from corpus2model.tasks.common.executor import LocalUnits
from corpus2model.tasks.common.progress import Progress
from corpus2model.tasks.stage import StageContext, Store, Unit, compute_units


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_says_units_megabytes_rate_and_eta():
    p = Progress("clean", total=4, total_bytes=4_000_000, terminal=False, artifact=False)
    assert "0/4 units" in p.line() and "ETA unknown" in p.line()
    p.advance(1, 1_000_000)
    line = p.line()
    assert line.startswith("clean: 1/4 units, 1.0/4.0 MB, ")
    assert re.search(r"[\d.]+ MB/s, ETA \d+:\d\d$", line), line
    assert p.fraction() == 0.25
    p.advance(3, 3_000_000)
    assert re.search(r"4/4 units, 4.0/4.0 MB, .* took \d+:\d\d$", p.line())


def test_without_sizes_it_counts_units():
    p = Progress("tokenize", total=3, terminal=False, artifact=False)
    p.advance()
    assert "1/3 units" in p.line() and "units/s" in p.line() and "MB" not in p.line()
    assert p.fraction() == pytest.approx(1 / 3)


@pytest.mark.parametrize("tty", [True, False])
def test_terminal_bar_only_on_a_tty(monkeypatch, tty):
    err = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress("ingest", total=2, total_bytes=2_000_000, show_after_s=0.0, artifact=False) as p:
        # The bar appears from a timer thread; wait for it rather than for a fixed time.
        for _ in range(200):
            if p._bar is not None or not tty:
                break
            __import__("time").sleep(0.01)
        p.advance(1, 1_000_000)
        p.advance(1, 1_000_000)
    out = err.getvalue()
    if tty:
        assert "ingest" in out and "2/2 units, 2.0/2.0 MB" in out
    else:
        assert out == ""


def test_a_short_stage_prints_nothing(monkeypatch):
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress("shard", total=1, show_after_s=60.0, artifact=False) as p:
        p.advance()
    assert err.getvalue() == ""


def _double(x: int) -> dict:
    return {"value": 2 * x}


def test_compute_units_reports_every_unit_with_its_bytes(monkeypatch, tmp_path):
    seen = []

    class Recording(Progress):
        def __init__(self, name, total, total_bytes=0, **kw):
            super().__init__(name, total, total_bytes, terminal=False, artifact=False)
            seen.append(("start", name, total, total_bytes))

        def advance(self, units=1, nbytes=0):
            super().advance(units, nbytes)
            seen.append(("unit", units, nbytes))

    monkeypatch.setattr(progress_mod, "Progress", Recording)
    units = [Unit(key=f"k{i}", stem=f"s{i}", label=f"f{i}", args=i, bytes=100 * (i + 1)) for i in range(3)]
    units.append(units[0])  # the same unit twice: computed once, counted once
    ctx = StageContext(store=Store(tmp_path / "store"), executor=LocalUnits(1))
    done = compute_units("demo", units, _double, ctx)
    assert done == {"k0": {"value": 0}, "k1": {"value": 2}, "k2": {"value": 4}}
    assert seen[0] == ("start", "demo", 3, 600)
    assert sorted(s[2] for s in seen[1:]) == [100, 200, 300]


def test_described_unit_stages_show_their_label():
    """A unit stage named for people (``describe``) shows that label in the line; others their name."""
    progress_mod.describe("test-phase-units", "demo 2/3 merge")
    try:
        p = Progress("test-phase-units", total=2, total_bytes=2_000_000, terminal=False, artifact=False)
        p.advance(1, 1_000_000)
        assert p.line().startswith("demo 2/3 merge: 1/2 units, 1.0/2.0 MB, ")
        assert Progress("other-units", total=1, terminal=False, artifact=False).line().startswith("other-units: ")
    finally:
        progress_mod.LABELS.pop("test-phase-units")
