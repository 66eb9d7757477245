"""Scale bench (issue 17): dedup on corpora larger than memory, side by side with the anchor peers.

    python bench/scale_bench.py                                  # the default: 2 GB, peers and Dask rows at 200 MB
    python bench/scale_bench.py --mb 2000 10000                  # + the 10 GB corpus (hours, ~40 GB of disk)
    python bench/scale_bench.py --mb 200 --peers-mb 200          # a developer's run
    python bench/scale_bench.py --mb 20 --peers-mb 20 --dask-mb 20 --only corpus2model dask   # smoke test

Corpora: ../shared/bench/anchors/gen_corpus.py ($ANCHOR_KIT, else $C2M_SHARED/bench/anchors), seeded,
with planted duplicates and ground truth, generated under --data once and reused. Time and disk on
2 cores: generating 2 GB takes ~15 min, 10 GB over an hour; a corpus takes 0.43x its text size on
disk (JSONL.gz); each ``c2m dedup`` run's store (records cache, sketches, kept parts; deleted after
the run) peaks at ~2.5x the text size: 2 GB needs ~6 GB free, 10 GB ~30 GB. The default command
runs in ~10 min on a quiet 2-core machine once the corpora exist (the 2 GB runs ~2 min each, the
peers ~3 min, the Dask rows ~2 min); ``--mb 2000 10000`` adds ~15 min of runs. Every
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

* ``corpus2model`` ``dask 2 workers vs 1 speedup``: the units of ``c2m dedup`` (parse+sketch per file,
  partitions, verification, kept parts; ``tasks.text.dedup_jsonl.dedup_jsonl_folder``) on a
  dask.distributed LocalCluster of 1 and of 2 single-thread workers, in the same run, interleaved
  ``--dask-repeats`` times (best wall), with the CPU the workers got and a pure-CPU control on the
  same clusters (bench/dask_bench.py measures ingest+clean units the same way). Outputs are checked
  byte-identical between the two clusters.

Rows come from *row producers*: functions ``(Bench) -> list[row]`` registered with ``@producer(name)``
in ``PRODUCERS`` and run in that order (``--only`` picks some). A new row is one more producer; it
gets the corpora, the worker count and the notes through ``Bench``.
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


def _dedup_on(executor, corpus_docs: Path, work: Path, method: str) -> tuple[float, dict]:
    """Wall seconds of the dedup units + merge of ``c2m dedup`` on a fresh store (the raw scan is not
    timed), and the output bytes by file (removed.jsonl, kept parts)."""
    import hashlib
    import time

    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.tasks.stage import Store
    from corpus2model.tasks.text.dedup_jsonl import dedup_jsonl_folder

    shutil.rmtree(work, ignore_errors=True)
    cfg = parse_config({"dedup": {"method": method}})
    store = Store(work / "store")
    src = scan_raw(corpus_docs, cfg.ingest.include, store)
    t0 = time.perf_counter()
    dedup_jsonl_folder(src, work / "out", cfg, store, executor=executor)
    wall = time.perf_counter() - t0
    out = {str(p.relative_to(work / "out")): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted((work / "out").rglob("*")) if p.is_file() and p.suffix in (".parquet", ".jsonl")}
    shutil.rmtree(work, ignore_errors=True)
    return wall, out


@producer("dask")
def dask_rows(b: Bench) -> list[dict]:
    """``c2m dedup``'s units on a LocalCluster of 1 and of 2 workers, in this run (issue 17: >= 1.7x)."""
    if not b.args.dask_mb:
        return []
    import tempfile
    import time

    from dask_bench import _spin, _workers_cpu
    from distributed import Client, LocalCluster

    from corpus2model.tasks.common.executor import DaskUnits

    c = b.corpus(b.args.dask_mb)
    docs = c / "docs"
    work = Path(tempfile.mkdtemp(prefix="scale_dask_"))
    warm = work / "warm"
    warm.mkdir()
    for f in sorted(docs.glob("*.jsonl.gz"))[:2]:
        shutil.copyfile(f, warm / f.name)  # a copy: the raw scan skips links that leave its folder
    opts = dict(threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1")
    walls: dict[int, list[float]] = {1: [], 2: []}
    cores: dict[int, list[float]] = {1: [], 2: []}
    control: dict[int, list[float]] = {1: [], 2: []}
    outputs = {}
    load = [os.getloadavg()[0]]
    try:
        with LocalCluster(n_workers=1, **opts) as c1, Client(c1) as cl1, \
                LocalCluster(n_workers=2, **opts) as c2, Client(c2) as cl2:
            ex = {1: DaskUnits(cl1), 2: DaskUnits(cl2)}
            for n in (1, 2):  # imports and first calls out of the timings
                _dedup_on(ex[n], warm, work / "run", b.args.dask_method)
            for r in range(b.args.dask_repeats):
                for n in (1, 2):
                    cpu0 = _workers_cpu(ex[n])
                    wall, out = _dedup_on(ex[n], docs, work / "run", b.args.dask_method)
                    walls[n].append(round(wall, 2))
                    cores[n].append(round((_workers_cpu(ex[n]) - cpu0) / wall, 2))
                    outputs.setdefault(json.dumps(out, sort_keys=True), []).append(n)
                    print(f"dask repeat {r}: {n} worker(s): {wall:.1f} s", flush=True)
                for n in (1, 2):
                    t0 = time.perf_counter()
                    for _ in ex[n].map(_spin, [0.25] * 16, name="spin"):
                        pass
                    control[n].append(round(time.perf_counter() - t0, 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    if len(outputs) != 1:
        raise SystemExit(f"dask: outputs differ between 1 and 2 workers: {list(outputs.values())}")
    cfg = (f"{b.describe(c)}; c2m dedup {b.args.dask_method} units (parse+sketch, partitions, verification, kept parts) "
           f"+ merge on a dask LocalCluster of 1 vs 2 single-thread workers, interleaved, best of {b.args.dask_repeats}")
    best = {n: min(w) for n, w in walls.items()}
    b.raw["dask"] = {"walls_s": walls, "workers_cores": cores, "control_walls_s": control, "load_average_1min": load}
    mb = json.loads((c / "manifest.json").read_text())["text_bytes"] / 1e6
    rows = [{"system": "corpus2model", "metric": "dask 2 workers vs 1 speedup", "value": round(best[1] / best[2], 2),
             "unit": "x", "config": cfg}]
    for n in (1, 2):
        i = walls[n].index(best[n])
        rows.append({"system": "corpus2model", "metric": f"dask {n} worker{'s' if n > 1 else ''} MB/s",
                     "value": round(mb / best[n], 2), "unit": "MB/s",
                     "config": cfg + f"; the workers got {cores[n][i]} cores (worker CPU s / wall s)"})
    rows.append({"system": "control: pure-CPU units", "metric": "dask 2 workers vs 1 speedup",
                 "value": round(min(control[1]) / min(control[2]), 2), "unit": "x",
                 "config": "16 units of 0.25 s CPU each on the same clusters, same run: what 2 workers could gain here then"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[2000],
                    help="corpus sizes (MB of text) for the corpus2model rows; add 10000 for the 10 GB row (see the doc)")
    ap.add_argument("--peers-mb", type=float, default=200, help="corpus size of the side-by-side peer rows (0: none)")
    ap.add_argument("--dask-mb", type=float, default=200, help="corpus size of the Dask 2 vs 1 worker rows (0: none)")
    ap.add_argument("--dask-method", choices=("minhash", "exact"), default="minhash", help="dedup method of the Dask rows")
    ap.add_argument("--dask-repeats", type=int, default=2, help="interleaved repeats of the Dask rows (best wall counts)")
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
                         f"scale bench (corpus2model at {sizes}; peers at {a.peers_mb:g} MB; Dask rows at {a.dask_mb:g} MB; "
                         f"{a.workers} workers)",
                         extra={"raw": b.raw, "platform": platform.platform(), "args": {k: str(v) for k, v in vars(a).items()}})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
