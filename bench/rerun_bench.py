"""Unchanged-rerun benchmark: ``c2m run configs/demo.yaml`` again with nothing changed, on the temporary
Prefect server a plain ``c2m run`` starts, and what a cached Prefect task costs with and without tags.

Run (a quiet machine; the first, cold run takes a few minutes on 2 cores and is not measured):
    python bench/rerun_bench.py                      # 5 reruns
    python bench/rerun_bench.py --rounds 2           # a quick look

What it does:
1. Runs the demo once into a store under --work (default /tmp/c2m-rerun-bench) unless every stage is
   already cached there: that is the cold run, not timed. PREFECT_HOME and HF_HOME live under --work
   too, so nothing touches the repository's data/store or .prefect.
2. Reruns it ``--rounds`` times, each a new ``c2m run`` process, as a user types it. Per rerun:
   the wall clock of the whole command (``rerun total seconds``: interpreter start, the temporary server,
   the plan, 13 cached stages, registration, the summary, the server stopping) and the sum of the
   stages' own seconds from the run summary (``rerun stage seconds``: what the summary table shows in its
   seconds column). A rerun in which any stage ran is an error.
3. The same reruns with PREFECT_API_URL set to a Prefect server of their own (``prefect server start``,
   what ``c2m server`` runs), so the notes can say how much of the total is the temporary server.
4. On one temporary server, ``--tasks`` cached Prefect tasks (a result persisted, a content cache key,
   as flows/prefect_tasks.py declares the stage task) with the stage's tags (``corpus2model``,
   ``stage:<name>``) and the same without tags: any tag makes Prefect acquire its concurrency slots
   from the server before the cache lookup, which is why a cached stage now runs untagged
   (flows/summary.py RunLog.stage).
5. Writes bench/results/rerun_bench.json and .md (bench/results_io.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, ROOT, write_results

CONFIG = ROOT / "configs" / "demo.yaml"


def c2m_run(work: Path, api_url: str | None = None) -> tuple[float, dict]:
    """One ``c2m run`` of the demo into work/ (on the temporary server unless ``api_url`` names a
    running one); (wall seconds, the run summary JSON)."""
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "HF_HOME": str(work / "hf")}
    env.pop("PREFECT_API_URL", None)  # the temporary server, as a plain `c2m run` gets it
    if api_url:
        env["PREFECT_API_URL"] = api_url
    cmd = [sys.executable, "-m", "corpus2model.flows.cli", "run", str(CONFIG),
           "--set", f"paths.store={work / 'store'}", "--set", f"paths.registry={work / 'registry'}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"c2m run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return secs, json.loads((work / "store" / "_runs" / "demo.summary.json").read_text(encoding="utf-8"))


@contextlib.contextmanager
def running_server(work: Path):
    """A Prefect server of its own (what `c2m server` starts), for the reruns that show what the
    temporary server costs; stopped afterwards."""
    home = work / ".prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        import urllib.request

        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit("the Prefect server did not become healthy in 2 minutes")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def tagged_vs_untagged(n: int, work: Path) -> dict:
    """Seconds per cached task run, with the stage tags and without, on one temporary server (child process)."""
    code = f"""
import json, tempfile, time
from prefect import flow, task
@task(cache_key_fn=lambda ctx, params: "rerun-bench-" + str(params["i"]), persist_result=True, result_serializer="json")
def stage(i):
    return {{"i": i}}
@flow
def f():
    out = {{}}
    for tags in ([], ["corpus2model", "stage:x"]):
        for i in range({n}):
            stage.submit(i).wait()  # computed once, persisted: from here on every call is a cache hit
        secs = []
        for i in range({n}):
            t0 = time.perf_counter()
            fut = stage.with_options(tags=tags).submit(i)
            fut.wait()
            assert fut.state.name == "Cached", fut.state
            secs.append(time.perf_counter() - t0)
        out["tags" if tags else "none"] = secs
    return out
print(json.dumps(f()))
"""
    (work / ".prefect").mkdir(parents=True, exist_ok=True)  # the server's SQLite database goes there
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOCAL_STORAGE_PATH": str(work / "prefect-results"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # as flows/cli.py sets it
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the cached-task measurement failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed reruns")
    ap.add_argument("--tasks", type=int, default=13, help="cached tasks per variant in the tag measurement")
    ap.add_argument("--work", default="/tmp/c2m-rerun-bench")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    cold_s, summary = c2m_run(work)  # cold, or the rerun of an earlier bench's store: not measured
    ran = [r["stage"] for r in summary["rows"] if r["status"] != "cached"]
    reruns = []
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        secs, summary = c2m_run(work)
        ran = [r["stage"] for r in summary["rows"] if r["status"] != "cached"]
        if ran:
            raise SystemExit(f"an unchanged rerun ran stages {ran}: the demo is not reproducible here")
        reruns.append({"total_seconds": round(secs, 2),
                       "stage_seconds": round(sum(r["seconds"] for r in summary["rows"]), 2),
                       "stages": {r["stage"]: r["seconds"] for r in summary["rows"]}})
    load.append(os.getloadavg()[0])
    with running_server(work) as url:
        on_server = [round(c2m_run(work, url)[0], 2) for _ in range(args.rounds)]
    tags = tagged_vs_untagged(args.tasks, work)

    stage_s = statistics.median(r["stage_seconds"] for r in reruns)
    total_s = statistics.median(r["total_seconds"] for r in reruns)
    n_stages = len(reruns[0]["stages"])
    cfg = f"configs/demo.yaml, nothing changed, {n_stages} stages all cached; median of {args.rounds} reruns"
    tcfg = f"{args.tasks} cached task runs each, one temporary server, same process"
    per_task = {k: sum(v) / len(v) for k, v in tags.items()}
    rows = [
        {"system": "corpus2model", "metric": "rerun stage seconds", "value": round(stage_s, 2), "unit": "s",
         "config": cfg + " (sum of the summary's per-stage seconds)"},
        {"system": "corpus2model", "metric": "rerun total seconds", "value": round(total_s, 2), "unit": "s",
         "config": cfg + " (wall clock of `c2m run`, temporary Prefect server)"},
        {"system": "prefect cached task, no tags", "metric": "seconds per cached task", "value": round(per_task["none"], 3),
         "unit": "s", "config": tcfg},
        {"system": "prefect cached task, 2 tags", "metric": "seconds per cached task", "value": round(per_task["tags"], 3),
         "unit": "s", "config": tcfg + "; max " + f"{max(tags['tags']):.2f} s"},
    ]
    slowest = max(reruns[-1]["stages"].items(), key=lambda kv: kv[1])
    server_s = statistics.median(on_server)
    rows.append({"system": "corpus2model (running server)", "metric": "rerun total seconds", "value": round(server_s, 2),
                 "unit": "s", "config": cfg + " (wall clock of `c2m run` with PREFECT_API_URL set to a running "
                                              "`prefect server start`)"})
    verdict = (f"Issue 16's target: stage work < 2 s ({'met' if stage_s < 2 else 'missed'}: {stage_s:.2f} s) and total "
               f"< 8 s on a temporary server ({'met' if total_s < 8 else f'missed by {total_s - 8:.1f} s'}: "
               f"{total_s:.1f} s); against a running server the same rerun takes {server_s:.1f} s, so "
               f"{total_s - server_s:.1f} s is the temporary server. `c2m run` launches that server first thing and "
               f"imports Prefect and the stages while it boots (flows/runners.py TemporaryServer; before, Prefect "
               f"started it at the flow's first API call after a 3.2 s import of its server module, and the run "
               f"waited 3.7 s for the boot), and code fingerprints come from a disk cache keyed by each file's sha256 "
               f"(tasks/common/fingerprint.py; before, 2-5 s of AST parsing per run). Load average (1 min) "
               f"{load[0]:.2f} before the reruns, {load[1]:.2f} after, on {os.cpu_count()} cores. ")
    notes = (verdict + f"Reruns: total {[r['total_seconds'] for r in reruns]} s, stage work "
             f"{[r['stage_seconds'] for r in reruns]} s (slowest stage of the last: {slowest[0]} {slowest[1]} s); "
             f"on a running server {on_server} s; the untimed first run took {cold_s:.0f} s. "
             "A cached stage's seconds are its Prefect task run: the content key, the persisted manifest read "
             "back, no stage code. It runs without tags: a tagged task first acquires its tag concurrency slots "
             "from the server, a round trip that waited ~2 s whenever the temporary server was busy writing "
             "(the issue's 2.0 s cached clean). The rest of the total is Python and Prefect start-up, the "
             "temporary server (started, then stopped), the plan (code fingerprints of every stage) and the "
             "summary artifacts.")
    path = write_results("rerun_bench", rows, notes, Path(args.results), "unchanged rerun benchmark",
                         extra={"reruns": reruns, "reruns_on_running_server": on_server, "cached_task_seconds": tags})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
