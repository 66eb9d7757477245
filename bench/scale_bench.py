"""Scale bench (issue 17): dedup on corpora larger than memory, side by side with the anchor peers.

    python bench/scale_bench.py                                  # the lead: 2 GB and 10 GB, peers at 200 MB
    python bench/scale_bench.py --mb 200 --peers-mb 200          # a developer's run
    python bench/scale_bench.py --mb 20 --peers-mb 20 --only corpus2model   # smoke test

Corpora: ../shared/bench/anchors/gen_corpus.py ($ANCHOR_KIT, else $C2M_SHARED/bench/anchors), seeded,
with planted duplicates and ground truth, generated under --data once and reused (2 GB takes ~15 min,
10 GB over an hour on 2 cores; both need ~1.5x their size on disk, plus the run's own store). Every
system is timed and scored by the kit (``project_dedup.py`` for ``c2m dedup``, the peers' own
scripts): wall time of the whole command, MB/s on corpus text bytes, peak RSS of the process tree
(sampled at 5 Hz), precision and recall per Jaccard band.

Rows (system, metric, value, unit, config):

* ``corpus2model``: per corpus size, ``near-dup MB/s``, ``recall@J>=0.8``, ``precision`` and ``peak RSS MB``
  of ``c2m dedup --set dedup.method=minhash``; ``exact MB/s`` and ``peak RSS MB`` of ``dedup.method=exact``.
  The out-of-core index keeps the peak RSS flat in the corpus size (bounded by ``dedup.memory_mb``).
* ``rensa``, ``rensa (14x8)``, ``datatrove``, ``datatrove exact``, ``xxh64 lower-ws (floor)``: the anchor
  kit's peers on the ``--peers-mb`` corpus, in the same run (they need the kit's venv, ``--venv``,
  made by shared/bench/anchors/run_anchor.sh; without it they are skipped and the notes say so).

Rows come from *row producers*: functions ``(Bench) -> list[row]`` registered with ``@producer(name)``
in ``PRODUCERS`` and run in that order (``--only`` picks some). A new row (e.g. a Dask speedup) is one
more producer; it gets the corpora, the worker count and the notes through ``Bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from results_io import RESULTS, ROOT, SHARED, write_results

KIT = Path(os.environ.get("ANCHOR_KIT") or SHARED / "bench" / "anchors")

PRODUCERS: dict[str, Callable] = {}


def producer(name: str):
    """Register a row producer under ``name`` (the order of registration is the order of the rows)."""

    def register(fn):
        PRODUCERS[name] = fn
        return fn

    return register


@dataclass
class Bench:
    """What a producer gets: the arguments, corpora by size, and where to put notes and raw results."""

    args: argparse.Namespace
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def corpus(self, mb: float) -> Path:
        """The kit's corpus of ``mb`` MB (generated once under --data)."""
        out = self.args.data / f"c{mb:g}_s{self.args.seed}"
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([sys.executable, str(KIT / "gen_corpus.py"), "--mb", str(mb), "--seed", str(self.args.seed),
                            "--out-dir", str(out), "--workers", str(self.args.workers)], check=True, stdout=subprocess.DEVNULL)
        return out

    def describe(self, c: Path) -> str:
        m = json.loads((c / "manifest.json").read_text())
        return f"{m['mb']:.0f} MB, {m['docs']} docs, seed {self.args.seed}, {self.args.workers} workers"

    def kit_venv_python(self) -> str | None:
        py = self.args.venv / "bin" / "python"
        return str(py) if os.access(py, os.X_OK) else None


def _json_run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def c2m_dedup(c: Path, method: str, workers: int, extra: str = "") -> dict:
    """``c2m dedup`` on the corpus, timed and scored by the kit (a fresh output folder and store)."""
    cmd = (f"{shlex.quote(sys.executable)} -m corpus2model.flows.standalone dedup {{in}} {{out}} --workers {workers} "
           f"--set dedup.method={method} {extra}")
    return _json_run([sys.executable, str(KIT / "project_dedup.py"), "--in", str(c), "--name", f"corpus2model-{method}",
                      "--cmd", cmd])


def near_rows(system: str, r: dict, config: str) -> list[dict]:
    ev = r.get("eval", {})
    return [{"system": system, "metric": "near-dup MB/s", "value": r["mb_per_s"], "unit": "MB/s", "config": config},
            {"system": system, "metric": "recall@J>=0.8", "value": ev.get("recall_j_ge_0.8"), "unit": "", "config": config},
            {"system": system, "metric": "precision", "value": ev.get("precision"), "unit": "", "config": config},
            {"system": system, "metric": "peak RSS MB", "value": r.get("peak_tree_rss_mb"), "unit": "MB", "config": config}]


def exact_rows(system: str, r: dict, config: str) -> list[dict]:
    ev = r.get("eval", {})
    ws = ev.get("recall_per_band", {}).get("1.0", {}).get("recall")
    return [{"system": system, "metric": "exact MB/s", "value": r["mb_per_s"], "unit": "MB/s", "config": config},
            {"system": system, "metric": "recall J=1.0 (exact + whitespace copies)", "value": ws, "unit": "", "config": config},
            {"system": system, "metric": "precision", "value": ev.get("precision"), "unit": "", "config": config},
            {"system": system, "metric": "peak RSS MB", "value": r.get("peak_tree_rss_mb"), "unit": "MB", "config": config}]


@producer("corpus2model")
def corpus2model_rows(b: Bench) -> list[dict]:
    """``c2m dedup`` minhash and exact on every corpus size (and on the peers' corpus)."""
    rows = []
    sizes = sorted(set(b.args.mb) | ({b.args.peers_mb} if b.args.peers_mb else set()))
    for mb in sizes:
        c = b.corpus(mb)
        cfg = b.describe(c)
        b.raw[f"corpus2model-minhash-{mb:g}"] = r = c2m_dedup(c, "minhash", b.args.workers)
        rows += near_rows("corpus2model", r, f"{cfg}; c2m dedup minhash (word 5-grams, one-permutation MinHash 18x5 LSH, "
                                             f"exact Jaccard >= 0.8), out-of-core index, dedup.memory_mb default")
        b.raw[f"corpus2model-exact-{mb:g}"] = r = c2m_dedup(c, "exact", b.args.workers)
        rows += exact_rows("corpus2model", r, f"{cfg}; c2m dedup exact (sha256 of NFKC-casefolded whitespace-collapsed text), "
                                              f"hash-partitioned")
    return rows


@producer("peers")
def peer_rows(b: Bench) -> list[dict]:
    """The anchor kit's peers on the --peers-mb corpus, in the same run as corpus2model."""
    if not b.args.peers_mb:
        return []
    py = b.kit_venv_python()
    if py is None:
        b.notes.append(f"peers skipped: no anchor venv at {b.args.venv} (bash {KIT}/run_anchor.sh creates it)")
        return []
    c = b.corpus(b.args.peers_mb)
    cfg = b.describe(c)
    rows = []
    for name, script, extra, kind, how in [
        ("rensa", "rensa_minhash.py", [], "near", "rensa 0.5 R-MinHash, 128 perms, LSH 9x13, verify estimated J >= 0.8"),
        ("rensa (14x8)", "rensa_minhash.py", ["--bands", "14", "--rows", "8", "--verify-threshold", "0"], "near",
         "rensa, LSH 14x8, no verification"),
        ("datatrove", "datatrove_minhash.py", ["--tokenizer", "split"], "near",
         "datatrove 0.10.1 MinHash stages 1-4, whitespace tokenizer, 14x8"),
        ("datatrove exact", "datatrove_exact.py", [], "exact", "datatrove exact dedup (signature, find, filter)"),
        ("xxh64 lower-ws (floor)", "exact_baseline.py", ["--normalize", "lower-ws"], "exact",
         "xxh64 of lower-cased whitespace-collapsed text, per-string Python: the kit's floor"),
    ]:
        try:
            b.raw[name] = r = _json_run([py, str(KIT / script), "--in", str(c), "--workers", str(b.args.workers), *extra])
        except RuntimeError as e:
            b.notes.append(f"{name} failed: {str(e)[:300]}")
            continue
        rows += (near_rows if kind == "near" else exact_rows)(name, r, f"{cfg}; {how}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[2000, 10000], help="corpus sizes for the corpus2model rows")
    ap.add_argument("--peers-mb", type=float, default=200, help="corpus size of the side-by-side peer rows (0: none)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path("/tmp/anchorkit-data"))
    ap.add_argument("--venv", type=Path, default=Path("/tmp/anchorkit-venv"))
    ap.add_argument("--only", nargs="+", choices=list(PRODUCERS), help="run only these row producers")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (writes scale_bench.json and .md)")
    a = ap.parse_args(argv)
    b = Bench(args=a)
    rows = []
    for name, fn in PRODUCERS.items():
        if a.only is None or name in a.only:
            rows += fn(b)
    sizes = ", ".join(f"{m:g} MB" for m in a.mb)
    path = write_results("scale_bench", rows, "; ".join(b.notes) or "all systems ran", a.out,
                         f"scale bench (corpus2model at {sizes}; peers at {a.peers_mb:g} MB; {a.workers} workers)",
                         extra={"raw": b.raw, "platform": platform.platform(), "args": {k: str(v) for k, v in vars(a).items()}})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
