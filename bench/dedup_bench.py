"""Dedup benchmark: this project's ``c2m dedup`` against the anchor peers, side by side, one corpus.

    python bench/dedup_bench.py --mb 200 --workers 2                 # full run (lead, quiet machine)
    python bench/dedup_bench.py --mb 200 --workers 2 --rss-mb 2000   # + peak RSS on a 2 GB corpus
    python bench/dedup_bench.py --mb 5 --workers 2 --no-peers        # smoke test

Corpus: ../shared/bench/anchors/gen_corpus.py ($ANCHOR_KIT, else $C2M_SHARED/bench/anchors) (seeded, planted duplicates, ground truth), scored
with its evaluate.py through project_dedup.py, which times any command that writes removed.jsonl
(wall time of the whole command, MB/s on corpus text bytes, peak RSS of the process tree).

Rows (one per system): ``near-dup MB/s``, ``recall@J>=0.8``, ``precision``, ``peak RSS MB`` for
near-dup systems; ``exact MB/s`` (+ recall of the whitespace-only copies, band "1.0") for exact
ones; ``incremental rerun % of cold`` after adding ~5% new documents, for the pipeline's
ingest+clean+dedup stages and for ``c2m dedup --store`` (rows "corpus2model pipeline" and
"corpus2model c2m dedup"); ``--rss-mb 2000`` adds the peak RSS of ``c2m dedup`` on a 2 GB corpus
(bench/scale_bench.py has the 2 GB / 10 GB rows of issue 17).
Peers (rensa, datatrove MinHash with the split tokenizer, datatrove exact, xxh64 baseline) run
with the anchor kit's venv (``--venv``, created by shared/bench/anchors/run_anchor.sh); without it
they are skipped and the notes say so.
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
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, ROOT, SHARED, write_results

KIT = Path(os.environ.get("ANCHOR_KIT") or SHARED / "bench" / "anchors")


def _json_run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def corpus(mb: float, seed: int, data: Path, workers: int) -> Path:
    out = data / f"c{mb:g}_s{seed}"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, str(KIT / "gen_corpus.py"), "--mb", str(mb), "--seed", str(seed), "--out-dir", str(out),
                        "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL)
    return out


def project(c: Path, method: str, workers: int, name: str) -> dict:
    cmd = (f"{shlex.quote(sys.executable)} -m corpus2model.flows.standalone dedup {{in}} {{out}} --workers {workers} "
           f"--set dedup.method={method}")
    return _json_run([sys.executable, str(KIT / "project_dedup.py"), "--in", str(c), "--name", name, "--cmd", cmd])


def standalone_incremental(c: Path, workers: int, new_fraction: float) -> dict:
    """``c2m dedup`` (minhash) cold on all shards but the last ~new_fraction, then the same
    command on the grown folder with the same --store (only the new files are parsed and
    sketched), against a cold run of the grown folder."""
    shards = sorted((c / "docs").glob("*.jsonl*"))
    n_new = max(1, round(len(shards) * new_fraction))
    work = Path(tempfile.mkdtemp(prefix="c2m_sincr_"))
    raw = work / "raw"
    raw.mkdir()
    for s in shards[:-n_new]:
        os.symlink(s, raw / s.name)

    def run(store: Path) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "corpus2model.flows.standalone", "dedup", str(raw), str(work / "out"), "--store", str(store),
                        "--workers", str(workers), "--set", "dedup.method=minhash"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    run(work / "store")
    for s in shards[-n_new:]:
        os.symlink(s, raw / s.name)
    rerun = run(work / "store")
    cold_all = run(work / "store-cold")
    shutil.rmtree(work, ignore_errors=True)
    return {"cold_s": round(cold_all, 3), "rerun_s": round(rerun, 3), "percent_of_cold": round(100 * rerun / cold_all, 1),
            "new_shards": n_new, "shards": len(shards)}


def peer(py: str, script: str, c: Path, workers: int, extra=()) -> dict:
    return _json_run([py, str(KIT / script), "--in", str(c), "--workers", str(workers), *extra])


def incremental(c: Path, workers: int, new_fraction: float) -> dict:
    """Cold ingest+clean+dedup (minhash) on all shards but the last ones (~new_fraction of the
    docs), then add them and rerun against the same store."""
    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks import clean, dedup, ingest
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.tasks.stage import StageContext, Store, run_stage

    shards = sorted((c / "docs").glob("*.jsonl*"))
    n_new = max(1, round(len(shards) * new_fraction))
    work = Path(tempfile.mkdtemp(prefix="c2m_incr_"))
    raw = work / "raw"
    raw.mkdir()
    for s in shards[:-n_new]:
        os.symlink(s, raw / s.name)
    cfg = parse_config({"paths": {"raw": str(raw), "store": str(work / "store")},
                        "ingest": {"workers": workers}, "clean": {"workers": workers},
                        "dedup": {"method": "minhash", "workers": workers}})
    ctx = StageContext(store=Store(work / "store"))

    def chain() -> tuple[float, dict]:
        t0 = time.perf_counter()
        src = scan_raw(raw, cfg.ingest.include, ctx.store)
        m = run_stage(ingest, [src], cfg, ctx)
        m = run_stage(clean, [m], cfg, ctx)
        m = run_stage(dedup, [m], cfg, ctx)
        return time.perf_counter() - t0, m.stats

    cold, _ = chain()
    for s in shards[-n_new:]:
        os.symlink(s, raw / s.name)
    rerun, st = chain()
    # a fair cold baseline for the grown corpus: everything from scratch
    shutil.rmtree(work / "store")
    cold_all, _ = chain()
    shutil.rmtree(work, ignore_errors=True)
    return {"cold_s": round(cold_all, 3), "cold_before_s": round(cold, 3), "rerun_s": round(rerun, 3),
            "percent_of_cold": round(100 * rerun / cold_all, 1), "new_shards": n_new, "shards": len(shards),
            "sketch_units_computed": st.get("sketch_units_computed"), "sketch_units_reused": st.get("sketch_units_reused")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path("/tmp/anchorkit-data"))
    ap.add_argument("--venv", type=Path, default=Path("/tmp/anchorkit-venv"))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--new-fraction", type=float, default=0.05)
    ap.add_argument("--no-incremental", action="store_true", help="skip the two incremental measurements")
    ap.add_argument("--rss-mb", type=float, default=0, help="also run c2m dedup (minhash) on a corpus this large "
                    "(e.g. 2000) and report its peak RSS; the corpus is generated under --data first")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (writes dedup_bench.json and .md)")
    a = ap.parse_args()
    c = corpus(a.mb, a.seed, a.data, a.workers)
    manifest = json.loads((c / "manifest.json").read_text())
    config = f"{manifest['mb']} MB, {manifest['docs']} docs, seed {a.seed}, {a.workers} workers"
    rows, notes, raw = [], [], {}

    def near_rows(system: str, r: dict, cfg: str) -> None:
        ev = r.get("eval", {})
        rows.extend([
            {"system": system, "metric": "near-dup MB/s", "value": r["mb_per_s"], "unit": "MB/s", "config": cfg},
            {"system": system, "metric": "recall@J>=0.8", "value": ev.get("recall_j_ge_0.8"), "unit": "", "config": cfg},
            {"system": system, "metric": "precision", "value": ev.get("precision"), "unit": "", "config": cfg},
            {"system": system, "metric": "peak RSS MB", "value": r.get("peak_tree_rss_mb"), "unit": "MB", "config": cfg},
        ])

    def exact_rows(system: str, r: dict, cfg: str) -> None:
        ev = r.get("eval", {})
        ws = ev.get("recall_per_band", {}).get("1.0", {}).get("recall")
        rows.extend([
            {"system": system, "metric": "exact MB/s", "value": r["mb_per_s"], "unit": "MB/s", "config": cfg},
            {"system": system, "metric": "recall J=1.0 (exact + whitespace copies)", "value": ws, "unit": "", "config": cfg},
            {"system": system, "metric": "precision", "value": ev.get("precision"), "unit": "", "config": cfg},
            {"system": system, "metric": "peak RSS MB", "value": r.get("peak_tree_rss_mb"), "unit": "MB", "config": cfg},
        ])

    raw["corpus2model-minhash"] = r = project(c, "minhash", a.workers, "corpus2model-minhash")
    near_rows("corpus2model", r, f"{config}; c2m dedup (JSONL direct: records + sketch in one pass), word 5-grams, "
                                 f"one-permutation MinHash 18x5 LSH, exact Jaccard >= 0.8, out-of-core index "
                                 f"(hash partitions from dedup.memory_mb)")
    raw["corpus2model-exact"] = r = project(c, "exact", a.workers, "corpus2model-exact")
    exact_rows("corpus2model exact", r, f"{config}; c2m dedup, sha256 of NFKC-casefolded whitespace-collapsed text")
    if not a.no_incremental:
        raw["incremental"] = inc = incremental(c, a.workers, a.new_fraction)
        rows.append({"system": "corpus2model pipeline", "metric": "incremental rerun % of cold", "value": inc["percent_of_cold"],
                     "unit": "%", "config": f"{config}; ingest+clean+dedup(minhash) stages, +{inc['new_shards']}/{inc['shards']} shards"})
        raw["incremental-standalone"] = inc = standalone_incremental(c, a.workers, a.new_fraction)
        rows.append({"system": "corpus2model c2m dedup", "metric": "incremental rerun % of cold", "value": inc["percent_of_cold"],
                     "unit": "%", "config": f"{config}; c2m dedup --store, +{inc['new_shards']}/{inc['shards']} shards"})
    if a.rss_mb:
        big = corpus(a.rss_mb, a.seed, a.data, a.workers)
        bm = json.loads((big / "manifest.json").read_text())
        raw["corpus2model-minhash-big"] = r = project(big, "minhash", a.workers, "corpus2model-minhash-big")
        rows.append({"system": f"corpus2model ({bm['mb']:.0f} MB corpus)", "metric": "peak RSS MB",
                     "value": r.get("peak_tree_rss_mb"), "unit": "MB",
                     "config": f"{bm['mb']} MB, {bm['docs']} docs, c2m dedup minhash, {a.workers} workers"})
        rows.append({"system": f"corpus2model ({bm['mb']:.0f} MB corpus)", "metric": "near-dup MB/s", "value": r["mb_per_s"],
                     "unit": "MB/s", "config": f"{bm['mb']} MB"})

    py = str(a.venv / "bin" / "python")
    if a.no_peers or not os.access(py, os.X_OK):
        notes.append("peers skipped" + ("" if a.no_peers else f": no anchor venv at {a.venv} (bash {KIT}/run_anchor.sh creates it)"))
    else:
        for name, script, extra, kind in [
            ("rensa (9x13, verify est. J)", "rensa_minhash.py", [], "near"),
            ("rensa (14x8)", "rensa_minhash.py", ["--bands", "14", "--rows", "8", "--verify-threshold", "0"], "near"),
            ("datatrove minhash (split tokenizer)", "datatrove_minhash.py", ["--tokenizer", "split"], "near"),
            ("datatrove exact", "datatrove_exact.py", [], "exact"),
            ("xxh64 baseline (lower-ws)", "exact_baseline.py", ["--normalize", "lower-ws"], "exact"),
        ]:
            try:
                raw[name] = r = peer(py, script, c, a.workers, extra)
            except RuntimeError as e:
                notes.append(f"{name} failed: {str(e)[:300]}")
                continue
            (near_rows if kind == "near" else exact_rows)(name, r, config)

    path = write_results("dedup_bench", rows, "; ".join(notes) or "all systems ran", a.out, f"dedup bench ({config})",
                         extra={"raw": raw, "platform": platform.platform()})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
