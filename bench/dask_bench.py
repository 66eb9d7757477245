"""Unit work on a Dask cluster: 1 worker vs 2 workers, beside the local process pool.

    python bench/dask_bench.py                      # ingest + clean units of a generated 12 MB corpus
    python bench/dask_bench.py --mb 48 --repeats 3  # bigger, more repeats
    python bench/dask_bench.py --demo               # also the whole demo DAG, thread vs Dask runner (cold, minutes)

The corpus comes from the anchor kit's generator (shared/bench/anchors/gen_corpus.py, stdlib only):
``--shards`` JSONL.gz files of Markov-chain English prose, so ingest and clean have one unit per file.
Each executor runs ingest then clean on a fresh store, every unit computed (tasks/stage.py
compute_units): a dask.distributed LocalCluster of 1 and of 2 single-thread worker processes
(tasks/common/executor.py DaskUnits), and, for reference, the local process pool with 2 workers. The clusters start and import the stage code before any timing (a warm-up
run on two files); the stage coordinator runs here, as it does on a worker under ``runtime.task_runner:
dask``. Configurations run interleaved, ``--repeats`` times; a row is the best (lowest) wall time, since
on a shared machine other processes only ever add time. Outputs are checked byte-identical across
executors (tests/test_executors.py asserts the same).

Then the per-core rate of every unit stage (ingest, clean, dedup, shard, tokenize), in one process, as CPU
seconds per MB of text (a shared machine's other load does not move CPU time much), which docs/scale.md
turns into hours for 1 TB.

``--demo`` adds the earlier whole-DAG comparison (`c2m run configs/demo.yaml` with the thread runner and
with the Dask runner, each cold on its own store). Results: bench/results/dask_bench.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, ROOT, SHARED, write_results

GEN = SHARED / "bench" / "anchors" / "gen_corpus.py"
STAGES_RUN = ("ingest", "clean")


def make_corpus(work: Path, mb: float, shards: int) -> tuple[Path, int]:
    """(raw folder, bytes of text) from the anchor kit's generator."""
    out = work / "corpus"
    subprocess.run([sys.executable, str(GEN), "--mb", str(mb), "--shards", str(shards), "--out-dir", str(out),
                    "--seed", "1234", "--workers", "2"], check=True, capture_output=True)
    raw = work / "raw"
    (raw / "docs").mkdir(parents=True)
    for p in sorted((out / "docs").glob("*.jsonl.gz")):
        shutil.copyfile(p, raw / "docs" / p.name)
    return raw, json.loads((out / "manifest.json").read_text())["text_bytes"]


def run_units(raw: Path, store: Path, executor) -> tuple[float, dict]:
    """Wall seconds of ingest + clean on a fresh store, every unit computed on ``executor``; and the
    output files (path -> sha256) per stage."""
    from corpus2model.flows.stages import STAGES
    from corpus2model.schemas.config import load_config
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.tasks.stage import StageContext, Store, run_stage

    cfg = load_config(ROOT / "configs" / "demo.yaml", {"paths.raw": str(raw), "paths.store": str(store),
                                                       "paths.registry": str(store.parent / "registry")})
    st = Store(store)
    ctx = StageContext(store=st, executor=executor)
    m = scan_raw(cfg.paths.raw, cfg.ingest.include, st)
    files = {}
    t0 = time.perf_counter()
    for name in STAGES_RUN:
        m = run_stage(STAGES[name], [m], cfg, ctx)
        assert m.stats.get("units_computed") == m.stats.get("units"), f"{name}: a unit came from the cache"
        files[name] = sorted((f.path, f.sha256) for f in m.files)
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    return wall, files


def _cpu_seconds() -> float:
    """CPU seconds this process has used (run on each Dask worker through client.run)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _workers_cpu(executor) -> float:
    """CPU seconds used so far by the processes that run ``executor``'s units: the Dask workers, or this
    process's finished children (a process pool's workers are reaped when the stage ends)."""
    import resource

    if getattr(executor, "client", None) is not None:
        return sum(executor.client.run(_cpu_seconds).values())
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _spin(seconds: float) -> float:
    """A unit of pure CPU work and nothing else: the control for what 2 workers can gain here."""
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < seconds:
        x += 1
    return seconds


def bench_units(args, work: Path) -> tuple[list[dict], dict]:
    from distributed import Client, LocalCluster

    from corpus2model.tasks.common.executor import DaskUnits, LocalUnits

    raw, text_bytes = make_corpus(work, args.mb, args.shards)
    warm = work / "raw-warm"
    (warm / "docs").mkdir(parents=True)
    for p in sorted((raw / "docs").glob("*"))[:2]:
        shutil.copyfile(p, warm / "docs" / p.name)

    load = [os.getloadavg()[0]]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as c1, \
            Client(c1) as client1, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", host="127.0.0.1") as c2, \
            Client(c2) as client2:
        systems = {
            "dask LocalCluster, 1 worker": DaskUnits(client1),
            "dask LocalCluster, 2 workers": DaskUnits(client2),
            "local process pool, 2 workers": LocalUnits(2),
        }
        for name, ex in systems.items():  # imports and first-call costs out of the timings
            run_units(warm, work / "store-warm", ex)
        control: dict[str, list[float]] = {}
        # CPU the unit workers got per second of wall time: on a shared machine, how many cores a run
        # really had, which is what its wall time says about the code and what it says about the host.
        cores: dict[str, list[float]] = {}
        walls: dict[str, list[float]] = {s: [] for s in systems}
        loads: dict[str, list[float]] = {}  # 1-minute load average after each run: how busy the machine was
        outputs = {}
        for r in range(args.repeats):
            for name, ex in systems.items():
                cpu0 = _workers_cpu(ex)
                wall, files = run_units(raw, work / f"store-{r}", ex)
                walls[name].append(wall)
                cores.setdefault(name, []).append(round((_workers_cpu(ex) - cpu0) / wall, 2))
                loads.setdefault(name, []).append(round(os.getloadavg()[0], 2))
                outputs.setdefault(json.dumps(files), []).append(name)
                print(f"repeat {r}: {name}: {wall:.1f} s", flush=True)
            for name in ("dask LocalCluster, 1 worker", "dask LocalCluster, 2 workers"):
                t0 = time.perf_counter()
                for _ in systems[name].map(_spin, [0.25] * args.shards, name="spin"):
                    pass
                control.setdefault(name, []).append(round(time.perf_counter() - t0, 2))
    load.append(os.getloadavg()[0])
    if len(outputs) != 1:
        raise SystemExit(f"outputs differ between executors: {list(outputs.values())}")

    best = {s: min(w) for s, w in walls.items()}
    mb = text_bytes / 1e6
    cfgtxt = (f"ingest+clean units, {args.shards} JSONL.gz files, {mb:.1f} MB of text, demo.yaml settings, "
              f"best of {args.repeats}")
    rows = []
    for s, w in best.items():
        rows.append({"system": s, "metric": "unit work wall s", "value": round(w, 2), "unit": "s", "config": cfgtxt})
        rows.append({"system": s, "metric": "cores the workers got (best run)", "value": cores[s][walls[s].index(w)],
                     "unit": "cores", "config": cfgtxt + "; worker CPU seconds / wall seconds"})
        rows.append({"system": s, "metric": "throughput", "value": round(mb / w, 2), "unit": "MB/s", "config": cfgtxt})
    speedup = best["dask LocalCluster, 1 worker"] / best["dask LocalCluster, 2 workers"]
    rows.append({"system": "dask LocalCluster, 2 workers", "metric": "dask 2 workers vs 1 speedup",
                 "value": round(speedup, 2), "unit": "x", "config": cfgtxt})
    ceiling = min(control["dask LocalCluster, 1 worker"]) / min(control["dask LocalCluster, 2 workers"])
    rows.append({"system": "control: pure-CPU units", "metric": "dask 2 workers vs 1 speedup",
                 "value": round(ceiling, 2), "unit": "x",
                 "config": f"{args.shards} units of 0.25 s CPU each, same clusters, same run, best of {args.repeats}: "
                           f"the most 2 workers could gain on this machine at that time"})
    return rows, {"walls_s": walls, "workers_cores": cores, "control_walls_s": control, "load_average_1min": load,
                  "load_after_each_run": loads, "text_bytes": text_bytes}


RATE_STAGES = ("ingest", "clean", "dedup", "shard", "tokenize")


def bench_rates(args, work: Path) -> tuple[list[dict], dict]:
    """Per-core rate of each unit-based stage: CPU seconds of this process (every unit in-process) per
    MB of text, so other processes on a shared machine do not move it; and the peak RSS of the process."""
    import resource

    from corpus2model.flows.stages import STAGES
    from corpus2model.schemas.config import load_config
    from corpus2model.tasks.common.executor import LocalUnits
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.tasks.stage import StageContext, Store, run_stage

    raw, text_bytes = make_corpus(work / "rates", args.rates_mb, args.shards)
    store = work / "rates" / "store"
    cfg = load_config(ROOT / "configs" / "demo.yaml", {
        "paths.raw": str(raw), "paths.store": str(store), "paths.registry": str(work / "rates" / "registry"),
        "dedup.workers": 1, "shard.target_bytes": 8_000_000})
    st = Store(store)
    ctx = StageContext(store=st, executor=LocalUnits(1))
    m = scan_raw(cfg.paths.raw, cfg.ingest.include, st)
    mb = text_bytes / 1e6
    cfgtxt = f"{mb:.1f} MB of text ({args.shards} JSONL.gz files), demo.yaml settings, one process, CPU time"
    rows, cpu = [], {}
    for name in RATE_STAGES:
        c0, t0 = time.process_time(), time.perf_counter()
        m = run_stage(STAGES[name], [m], cfg, ctx)
        cpu[name] = {"cpu_s": round(time.process_time() - c0, 2), "wall_s": round(time.perf_counter() - t0, 2),
                     "records_in": m.counters.get("in"), "records_out": m.counters.get("out")}
        rows.append({"system": f"c2m {name}", "metric": "per-core rate", "value": round(mb / cpu[name]["cpu_s"], 2),
                     "unit": "MB/s", "config": cfgtxt})
        print(f"{name}: {cpu[name]}", flush=True)
    # What the store holds per MB of text: dedup's sketch index (signatures, band keys, shingle sets)
    # and every other unit family, so docs/scale.md can size the disk for 1 TB.
    disk: dict[str, int] = {}
    for f in (store / "_units").rglob("*"):
        if f.is_file():
            family = f.relative_to(store / "_units").parts[0]
            label = f"{family}/{f.name}" if family.startswith("dedup") else family
            disk[label] = disk.get(label, 0) + f.stat().st_size
    disk_per_mb = {k: round(v / text_bytes, 3) for k, v in sorted(disk.items())}
    for label in ("dedup/sets.npy", "dedup/bkeys.npy"):
        if label in disk_per_mb:
            rows.append({"system": "c2m dedup", "metric": f"store bytes per text byte ({label})",
                         "value": disk_per_mb[label], "unit": "x", "config": cfgtxt})
    rows.append({"system": "c2m ingest..tokenize", "metric": "store bytes per text byte (all units)",
                 "value": round(sum(disk.values()) / text_bytes, 3), "unit": "x", "config": cfgtxt})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append({"system": "c2m ingest..tokenize", "metric": "peak RSS (one process, all five stages)",
                 "value": round(rss), "unit": "MB", "config": cfgtxt})
    return rows, {"rates": cpu, "rates_text_bytes": text_bytes, "store_bytes_per_text_byte": disk_per_mb}


def run_demo(runner: str, work: Path, config: str) -> dict:
    store, registry = work / runner / "store", work / runner / "registry"
    cmd = [sys.executable, "-m", "corpus2model.flows.cli", "run", config, "--set", f"paths.store={store}",
           "--set", f"paths.registry={registry}", "--set", f"runtime.task_runner={runner}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{runner} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = json.loads(next(store.glob("_runs/*.summary.json")).read_text())["rows"]
    return {"wall": wall, "stages": sum(r["seconds"] for r in rows), "ran": sum(r["status"] == "ran" for r in rows)}


def bench_demo(args, work: Path) -> list[dict]:
    res = {r: run_demo(r, work, args.config) for r in ("default", "dask")}
    cfgtxt = f"{args.config}, cold, {res['default']['ran']} stages ran"
    rows = []
    for r, system in (("default", "prefect thread runner"), ("dask", "prefect-dask LocalCluster (2 workers)")):
        rows.append({"system": system, "metric": "demo wall s", "value": round(res[r]["wall"], 1), "unit": "s", "config": cfgtxt})
        rows.append({"system": system, "metric": "stage seconds (sum)", "value": round(res[r]["stages"], 1), "unit": "s",
                     "config": cfgtxt})
    change = 100 * (res["dask"]["wall"] / res["default"]["wall"] - 1)
    rows.append({"system": "prefect-dask LocalCluster (2 workers)", "metric": "demo wall time change %",
                 "value": round(change, 1), "unit": "%", "config": "vs the thread runner, same run of this script"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=12.0, help="MB of text in the generated corpus")
    ap.add_argument("--rates-mb", type=float, default=12.0, help="MB for the per-core rates of every unit stage; 0: skip")
    ap.add_argument("--shards", type=int, default=16, help="files, i.e. units per stage")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--demo", action="store_true", help="also time the whole demo DAG with each task runner")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="c2m-dask-bench-"))
    try:
        rows, extra = bench_units(args, work)
        if args.rates_mb:
            more, info = bench_rates(args, work)
            rows += more
            extra.update(info)
        if args.demo:
            rows += bench_demo(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speed = next(r["value"] for r in rows if r["metric"] == "dask 2 workers vs 1 speedup")
    ceiling = next(r["value"] for r in rows if r["system"] == "control: pure-CPU units")
    cores1, cores2 = (next(r["value"] for r in rows if r["system"] == f"dask LocalCluster, {n}"
                           and r["metric"].startswith("cores")) for n in ("1 worker", "2 workers"))
    notes = (f"Units of ingest and clean (one per file) submitted one by one to a dask.distributed LocalCluster: 2 "
             f"workers finished the same units {speed}x faster than 1 (1-minute load average "
             f"{extra['load_average_1min'][0]:.1f} before, {extra['load_average_1min'][1]:.1f} after). Read it against "
             f"the control row (pure-CPU units on the same two clusters gained {ceiling}x in the same run) and the "
             f"'cores the workers got' rows ({cores2} cores for 2 workers, {cores1} for 1). This 2-core VM is shared "
             f"and Linux shares CPU between sessions (sched_autogroup): while another session keeps a core busy, the "
             f"two workers of this bench are time-sliced onto about one core, so their wall time cannot halve. "
             f"Outputs were byte-identical across "
             f"the three executors. Per-core rates are CPU time of one process: that sharing moves them less than wall "
             f"time, but it moves them (clean 0.63-0.89 MB/s over four runs). "
             f"Before this change, `runtime.task_runner: dask` shipped whole stages to workers and each stage fanned "
             f"its files out to a process pool on its one worker (demo DAG on a 2-worker LocalCluster: +104% wall "
             f"vs threads, 2026-11-23).")
    print(json.dumps(rows, indent=1))
    write_results("dask_bench", rows, notes, Path(args.out), "Unit work: Dask 2 workers vs 1, and the process pool",
                  extra=extra)


if __name__ == "__main__":
    main()
