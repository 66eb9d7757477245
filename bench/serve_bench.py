"""Serving load benchmark on loopback: dynamic batching vs unbatched, same model, same requests.

    python bench/serve_bench.py configs/minilm.yaml                      # 200 requests, 8 concurrent
    python bench/serve_bench.py configs/minilm.yaml --requests 16 --concurrency 4 --out /tmp/sb   # a quick check

Serves the config's `production` classifier (run `c2m run configs/minilm.yaml` first) twice with
uvicorn on 127.0.0.1, an ephemeral port each: once with `serve.max_batch_size` /
`serve.max_batch_wait_ms` (batched) and once with max_batch_size 1 (unbatched). A fixed set of
held-out-style texts (the bundled NTREX slice, one text per request) is sent by `--concurrency`
client threads, `--requests` requests in all, stopping early at `--max-seconds`. Rows: requests/s,
p50 and p95 client-side latency (ms), and the mean batch size read back from /metrics.
Bounded in count and time; timed figures are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import gzip
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SLICE = ROOT / "data" / "sample_langid" / "raw" / "ntrex_langid_1600.jsonl.gz"


def texts(n: int) -> list[str]:
    out = []
    with gzip.open(SLICE, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
    return [out[i % len(out)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    from corpus2model.tasks.model.classify import percentile as pct

    return pct(values, q)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def run_load(app, payloads: list[str], concurrency: int, max_seconds: float) -> dict:
    """Start uvicorn on an ephemeral loopback port, send the payloads, stop the server."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    local = threading.local()
    stop_at = time.monotonic() + max_seconds

    def one(text: str):
        if time.monotonic() > stop_at:
            return None
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=60)
        t0 = time.perf_counter()
        r = client.post(f"{url}/classify", json={"texts": [text]})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    try:
        with httpx.Client() as c:  # warm-up: the first forward pass pays one-off costs
            c.post(f"{url}/classify", json={"texts": payloads[:1]}, timeout=60).raise_for_status()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            lat = [x for x in pool.map(one, payloads) if x is not None]
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    forward_passes = metric(metrics, "c2m_batch_size_count") - 1  # minus the warm-up
    texts_scored = metric(metrics, "c2m_batch_size_sum") - 1
    return {"requests": len(lat), "wall_s": round(wall, 3), "rps": round(len(lat) / wall, 2),
            "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
            "mean_batch": round(texts_scored / forward_passes, 2) if forward_passes > 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per mode: stop sending after this long")
    p.add_argument("--variant", default=None, help="tuned or dynamic_int8 (default: the registered serve variant)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for the server")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    import torch

    from results_io import RESULTS, write_results
    from corpus2model.schemas.config import load_config
    from corpus2model.flows.serve import create_app

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    payloads = texts(args.requests)
    modes = {"batched": (cfg.serve.max_batch_size, cfg.serve.max_batch_wait_ms), "unbatched": (1, 0.0)}
    results, rows = {}, []
    for mode, (size, wait) in modes.items():
        app = create_app(cfg.paths.registry, cfg.registry.model_name, variant=args.variant,
                         max_batch_size=size, max_batch_wait_ms=wait)
        res = results[mode] = run_load(app, payloads, args.concurrency, args.max_seconds)
        print(mode, res, flush=True)
        conf = (f"{res['requests']} requests, {args.concurrency} concurrent, 1 text each; max_batch_size {size}, "
                f"wait {wait} ms; {args.threads} torch threads; mean batch {res['mean_batch']}")
        system = f"c2m serve ({mode})"
        rows += [{"system": system, "metric": "requests/s", "value": res["rps"], "unit": "req/s", "config": conf},
                 {"system": system, "metric": "p50 ms", "value": res["p50_ms"], "unit": "ms", "config": conf},
                 {"system": system, "metric": "p95 ms", "value": res["p95_ms"], "unit": "ms", "config": conf}]
    b, u = results["batched"], results["unbatched"]
    notes = (f"model {cfg.registry.model_name} (production, variant {args.variant or 'as registered'}), loopback "
             f"uvicorn in the benchmark process; batched/unbatched throughput {b['rps'] / u['rps']:.2f}x.")
    write_results("serve_bench", rows, notes, out_dir=args.out or RESULTS, title="Serving: dynamic batching vs unbatched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
