"""Serving load benchmark on loopback: batched vs unbatched, same model, same requests.

    python bench/serve_bench.py configs/minilm.yaml configs/demo.yaml     # /classify, then /generate
    python bench/serve_bench.py configs/minilm.yaml --requests 32 --out /tmp/sb   # a quick check

Each config's `production` model (run `c2m run CONFIG` first) is served twice by `c2m serve`'s app under
uvicorn in a child process on 127.0.0.1 (an ephemeral port each): once with `serve.max_batch_size` /
`serve.max_batch_wait_ms` (batched) and once with max_batch_size 1 (unbatched). The load generator is
this process: `--concurrency` client threads on keep-alive connections, stopping early at
`--max-seconds`. A server in its own process is how it runs in production: clients in the same
interpreter would share its GIL and count their own CPU time as the server's.

Classifiers (/classify, one held-out-style NTREX sentence per request, `--requests` in all): requests/s,
p50/p95 client latency, the server process's CPU ms per request, mean texts per forward pass from
/metrics; and a forward-pass profile of the served model in this process (no HTTP): ms per text and
the FLOP rate (2 x tokens x Linear weights + 4 x batch x length^2 x hidden x layers) of batch 1 against
batch 8 (length-sorted and in arrival order), which says how much batching can give on this CPU.

Causal LMs (/generate, GSM8K-style prompts from the bundled sample, greedy, `--gen-max-new-tokens`,
`--gen-requests` in all): tokens/s, requests/s, p50/p95 latency, mean prompts per decode step, whether
both modes answered every prompt with the same text, and the speedup without HTTP (generate_batched
against generate_text one prompt at a time, in this process).

Bounded in count and time; timed figures are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NTREX = ROOT / "data" / "sample_langid" / "raw" / "ntrex_langid_1600.jsonl.gz"
GSM8K = ROOT / "data" / "sample" / "raw" / "sft" / "gsm8k_selfinstruct_600.jsonl.gz"


def _jsonl(path: Path, field: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[field] for line in f]


def cycle(items: list[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    from corpus2model.tasks.model.metrics import percentile as pct

    return pct(values, q) if values else float("nan")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# the server (child process) and the load generator
# ---------------------------------------------------------------------------------------------
def serve_child(args) -> int:
    """--server mode: the app for one config and batching setting, until terminated."""
    import torch
    import uvicorn

    from corpus2model.flows.serve import create_app
    from corpus2model.schemas.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.server)
    app = create_app(cfg.paths.registry, cfg.registry.model_name, variant=args.variant,
                     max_batch_size=args.max_batch_size, max_batch_wait_ms=args.wait)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


class Server:
    def __init__(self, config: Path, max_batch_size: int, wait_ms: float, threads: int, variant: str | None):
        self.port = free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--server", str(config), "--port", str(self.port),
               "--max-batch-size", str(max_batch_size), "--wait", str(wait_ms), "--threads", str(threads)]
        if variant:
            cmd += ["--variant", variant]
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /health within 180 s")
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, str]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def load(port: int, path: str, bodies: list[dict], concurrency: int, max_seconds: float) -> dict:
    """POST every body (``concurrency`` at a time, keep-alive), stopping early after ``max_seconds``.
    Returns wall time, latencies (ms) and answers (JSON), in request order; unsent requests are None."""
    answers: list = [None] * len(bodies)
    latency: list = [None] * len(bodies)
    counter = itertools.count()  # next() on it is atomic under the GIL
    stop_at = time.monotonic() + max_seconds
    errors: list = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while time.monotonic() < stop_at and not errors:
                i = next(counter)
                if i >= len(bodies):
                    return
                data = json.dumps(bodies[i]).encode()
                t0 = time.perf_counter()
                conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                latency[i] = (time.perf_counter() - t0) * 1000
                if r.status != 200:
                    errors.append(f"{path} -> {r.status}: {body[:200]!r}")
                    return
                answers[i] = json.loads(body)
        except Exception as e:  # surfaced below: a bench must not report figures from failed requests
            errors.append(repr(e))
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"load failed: {errors[0]}")
    return {"wall_s": wall, "latency": [x for x in latency if x is not None], "answers": answers}


def run_mode(config: Path, path: str, bodies: list[dict], warmup: list[dict], size: int, wait: float, args,
             hist: str) -> dict:
    server = Server(config, size, wait, args.threads, args.variant)
    try:
        load(server.port, path, warmup, min(len(warmup), args.concurrency), args.max_seconds)
        before = server.get("/metrics")[1]
        cpu0 = server.cpu()
        res = load(server.port, path, bodies, args.concurrency, args.max_seconds)
        cpu = server.cpu() - cpu0
        after = server.get("/metrics")[1]
    finally:
        server.stop()
    done = len(res["latency"])
    passes = metric(after, f"{hist}_count") - metric(before, f"{hist}_count")
    rows = metric(after, f"{hist}_sum") - metric(before, f"{hist}_sum")
    return {"requests": done, "wall_s": round(res["wall_s"], 3), "rps": round(done / res["wall_s"], 2),
            "p50_ms": round(percentile(res["latency"], 50), 2), "p95_ms": round(percentile(res["latency"], 95), 2),
            "server_cpu_ms_per_request": round(cpu * 1000 / max(done, 1), 2),
            "mean_batch": round(rows / passes, 2) if passes > 0 else None, "answers": res["answers"]}


# ---------------------------------------------------------------------------------------------
# /classify: forward-pass profile and load
# ---------------------------------------------------------------------------------------------
def encoder_flops(model, batch: int, length: int) -> float:
    """2 x tokens x (weights of every Linear but the head) + attention's two matmuls, 4 x B x T^2 x hidden
    per layer. Shapes only, so the same count for the float and the dynamic INT8 model."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    weights = 0
    for name, m in model.named_modules():
        if name.endswith(("classifier", "score")):
            continue
        if isinstance(m, torch.nn.Linear):
            weights += m.in_features * m.out_features
        elif isinstance(m, DynLinear):
            weights += m.weight().numel()
    c = model.config
    return 2.0 * batch * length * weights + 4.0 * batch * length * length * c.hidden_size * c.num_hidden_layers


def profile_classifier(model, tokenizer, texts: list[str], max_length: int, repeats: int = 5) -> dict:
    """Timed forward passes (each the best of ``repeats``) over the same texts in batches of 1 and of 8."""
    import torch

    def enc(group):
        return tokenizer(group, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

    lengths = {t: len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts}
    by_len = sorted(texts, key=lambda t: lengths[t])
    t0 = time.perf_counter()
    for t in texts:
        enc([t])
    tokenize_ms = (time.perf_counter() - t0) * 1000 / len(texts)
    plans = {"batch 1": [[t] for t in texts],
             "batch 8 (arrival order)": [texts[i:i + 8] for i in range(0, len(texts), 8)],
             "batch 8 (length-sorted)": [by_len[i:i + 8] for i in range(0, len(by_len), 8)]}
    out = {"texts": len(texts), "tokenize_ms_per_text": round(tokenize_ms, 3), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for label, groups in plans.items():
            encs = [enc(g) for g in groups]
            for e in encs[:2]:
                model(**e)  # warm-up
            # Each pass's best of ``repeats``, summed: a burst of other load on a shared machine spoils
            # one timing of a pass, not the whole plan.
            best = 0.0
            for e in encs:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(**e)
                    times.append(time.perf_counter() - t0)
                best += min(times)
            flops = sum(encoder_flops(model, *e["input_ids"].shape) for e in encs)
            padded = sum(e["input_ids"].numel() for e in encs)
            real = sum(int(e["attention_mask"].sum()) for e in encs)
            out[label] = {"ms_per_text": round(best * 1000 / len(texts), 3), "gflops": round(flops / best / 1e9, 2),
                          "padding": round(1 - real / padded, 3)}
    b1, b8 = out["batch 1"], out["batch 8 (length-sorted)"]
    out["batch1_share_of_batch8_flop_rate"] = round(b1["gflops"] / b8["gflops"], 3)
    out["batch8_texts_per_s_gain"] = round(b1["ms_per_text"] / b8["ms_per_text"], 2)
    return out


def bench_classify(config: Path, cfg, loaded: dict, args) -> tuple[list[dict], list[str], dict]:
    texts = _jsonl(NTREX, "text")
    prof = profile_classifier(loaded["model"], loaded["tokenizer"], texts[:64], loaded["max_length"])
    print("profile", json.dumps(prof), flush=True)
    bodies = [{"texts": [t]} for t in cycle(texts, args.requests)]
    warmup = [{"texts": [t]} for t in texts[-16:]]
    modes = {"batched": (cfg.serve.max_batch_size, cfg.serve.max_batch_wait_ms), "unbatched": (1, 0.0)}
    results, rows = {}, []
    for mode, (size, wait) in modes.items():
        res = results[mode] = run_mode(config, "/classify", bodies, warmup, size, wait, args, "c2m_batch_size")
        print(mode, {k: v for k, v in res.items() if k != "answers"}, flush=True)
        conf = (f"{res['requests']} requests, {args.concurrency} concurrent, 1 text each; max_batch_size {size}, "
                f"wait {wait} ms; {args.threads} torch threads; mean batch {res['mean_batch']}")
        system = f"c2m serve ({mode})"
        rows += [{"system": system, "metric": "requests/s", "value": res["rps"], "unit": "req/s", "config": conf},
                 {"system": system, "metric": "p50 ms", "value": res["p50_ms"], "unit": "ms", "config": conf},
                 {"system": system, "metric": "p95 ms", "value": res["p95_ms"], "unit": "ms", "config": conf},
                 {"system": system, "metric": "server CPU ms/request", "value": res["server_cpu_ms_per_request"],
                  "unit": "ms", "config": conf}]
    b, u = results["batched"], results["unbatched"]
    labels = [[r["label"] for r in a["results"]] if a else None for a in b["answers"]]
    same = sum(x == y for x, y in zip(labels, [[r["label"] for r in a["results"]] if a else None for a in u["answers"]]))
    speedup = round(b["rps"] / u["rps"], 2)
    fwd = f"{prof['threads']} torch threads, {prof['texts']} NTREX texts"
    rows += [{"system": "c2m serve", "metric": "classify batched speedup x", "value": speedup, "unit": "x",
              "config": f"requests/s batched / unbatched; p95 {b['p95_ms']} vs {u['p95_ms']} ms"},
             {"system": "forward pass (no HTTP)", "metric": "GFLOP/s batch 1", "value": prof["batch 1"]["gflops"],
              "unit": "GFLOP/s", "config": fwd},
             {"system": "forward pass (no HTTP)", "metric": "GFLOP/s batch 8", "value":
              prof["batch 8 (length-sorted)"]["gflops"], "unit": "GFLOP/s", "config": fwd + ", length-sorted batches"},
             {"system": "forward pass (no HTTP)", "metric": "texts/s gain batch 8 over batch 1",
              "value": prof["batch8_texts_per_s_gain"], "unit": "x", "config": fwd + ", length-sorted batches"}]
    b8a = prof["batch 8 (arrival order)"]
    notes = [f"/classify ({cfg.registry.model_name}, variant {loaded['variant']}): batched/unbatched {speedup}x "
             f"requests/s, p95 {b['p95_ms']} vs {u['p95_ms']} ms; server CPU {b['server_cpu_ms_per_request']} vs "
             f"{u['server_cpu_ms_per_request']} ms per request; {same}/{len(labels)} answers with the same label.",
             f"Forward-pass profile (this process, no HTTP): batch 1 {prof['batch 1']['ms_per_text']} ms/text at "
             f"{prof['batch 1']['gflops']} GFLOP/s; batch 8 length-sorted {prof['batch 8 (length-sorted)']['ms_per_text']} "
             f"ms/text at {prof['batch 8 (length-sorted)']['gflops']} GFLOP/s (padding "
             f"{prof['batch 8 (length-sorted)']['padding']}); batch 8 in arrival order {b8a['ms_per_text']} ms/text "
             f"(padding {b8a['padding']}). A single request runs at {prof['batch1_share_of_batch8_flop_rate']:.0%} of "
             f"the batched FLOP rate; tokenizing costs {prof['tokenize_ms_per_text']} ms/text."]
    return rows, notes, {"classify": {"profile": prof, **{m: {k: v for k, v in r.items() if k != "answers"}
                                                          for m, r in results.items()}}}


# ---------------------------------------------------------------------------------------------
# /generate
# ---------------------------------------------------------------------------------------------
def bench_generate(config: Path, cfg, loaded: dict, args) -> tuple[list[dict], list[str], dict]:
    from corpus2model.tasks.model.modeling import generate_batched, generate_text

    model, tokenizer = loaded["model"], loaded["tokenizer"]
    prompts = _jsonl(GSM8K, "input")
    n_new = args.gen_max_new_tokens
    bodies = [{"prompt": p, "max_new_tokens": n_new} for p in cycle(prompts, args.gen_requests)]
    warmup = [{"prompt": p, "max_new_tokens": 4} for p in prompts[-8:]]
    size = cfg.serve.max_batch_size
    modes = {"batched": (size, cfg.serve.max_batch_wait_ms), "unbatched": (1, 0.0)}
    results, rows = {}, []

    def count_tokens(answers) -> int:
        # Both modes return the same texts (checked below), so the ratio of tokens/s is exact; the count
        # itself re-tokenizes the answer text.
        return sum(len(tokenizer(a["text"], add_special_tokens=False)["input_ids"]) for a in answers if a)

    for mode, (bs, wait) in modes.items():
        res = results[mode] = run_mode(config, "/generate", bodies, warmup, bs, wait, args, "c2m_generate_batch_size")
        res["tokens"] = count_tokens(res["answers"])
        res["tokens_per_s"] = round(res["tokens"] / res["wall_s"], 1)
        print(mode, {k: v for k, v in res.items() if k != "answers"}, flush=True)
        conf = (f"{res['requests']} prompts, {args.concurrency} concurrent, greedy, max_new_tokens {n_new}; "
                f"max_batch_size {bs}, wait {wait} ms; {args.threads} torch threads"
                + (f"; mean {res['mean_batch']} prompts per decode step" if res["mean_batch"] else ""))
        system = f"c2m serve /generate ({mode})"
        rows += [{"system": system, "metric": "tokens/s", "value": res["tokens_per_s"], "unit": "tokens/s", "config": conf},
                 {"system": system, "metric": "requests/s", "value": res["rps"], "unit": "req/s", "config": conf},
                 {"system": system, "metric": "p50 ms", "value": res["p50_ms"], "unit": "ms", "config": conf},
                 {"system": system, "metric": "p95 ms", "value": res["p95_ms"], "unit": "ms", "config": conf}]
    b, u = results["batched"], results["unbatched"]
    pairs = [(x, y) for x, y in zip(b["answers"], u["answers"]) if x and y]
    same = sum(x["text"] == y["text"] for x, y in pairs)
    speedup = round(b["tokens_per_s"] / u["tokens_per_s"], 2)

    # The engine alone, no HTTP: the same prompts (rendered as the server does), one at a time vs batched.
    k = min(len(bodies), 2 * size)
    rendered = [loaded["template"].format(input=p) if loaded["template"] else p for p in cycle(prompts, k)]
    t0 = time.perf_counter()
    alone = generate_text(model, tokenizer, rendered, max_new_tokens=n_new)
    t1 = time.perf_counter()
    together = generate_batched(model, tokenizer, rendered, max_new_tokens=n_new, max_batch_size=size)
    t2 = time.perf_counter()
    inproc = round((t1 - t0) / (t2 - t1), 2)
    same_inproc = sum(x == y for x, y in zip(alone, together))
    decode = decode_bound(loaded, rendered[:size], n_new, size)
    print("decode-bound", decode, flush=True)
    rows += [{"system": "c2m serve /generate", "metric": "generate batched speedup x", "value": speedup, "unit": "x",
              "config": f"tokens/s batched / unbatched over HTTP, {args.concurrency} concurrent; "
                        f"{same}/{len(pairs)} answers identical"},
             {"system": "generate_batched vs generate_text (no HTTP)", "metric": "generate batched speedup x",
              "value": inproc, "unit": "x", "config": f"{k} prompts, max_batch_size {size}, max_new_tokens {n_new}; "
                                                      f"{same_inproc}/{k} answers identical"},
             {"system": "generate_batched vs generate_text, decode-bound (no HTTP)", "metric": "generate batched speedup x",
              "value": decode["speedup"], "unit": "x",
              "config": f"random-init weights of the served shape ({loaded['variant']}), which rarely emit eos: "
                        f"{decode['prompts']} prompts x {n_new} new tokens ({decode['tokens']} in all), max_batch_size "
                        f"{size}; {decode['identical']}/{decode['prompts']} answers identical"}]
    notes = [f"/generate ({cfg.registry.model_name}, variant {loaded['variant']}): continuous batching "
             f"{b['tokens_per_s']} vs one prompt at a time {u['tokens_per_s']} tokens/s ({speedup}x), p95 "
             f"{b['p95_ms']} vs {u['p95_ms']} ms, mean {b['mean_batch']} prompts per decode step; {same}/{len(pairs)} "
             f"greedy answers identical. Without HTTP: {inproc}x ({same_inproc}/{k} identical). The served model "
             f"answers these prompts in a few tokens, so each request is mostly its prefill (~100 prompt tokens), "
             f"which batching shares only the per-pass overhead of; with random weights of the same shape, which "
             f"rarely stop early ({n_new} new tokens each), the batched engine gives {decode['speedup']}x."]
    return rows, notes, {"generate": {m: {k: v for k, v in r.items() if k != "answers"} for m, r in results.items()}
                         | {"in_process": {"prompts": k, "one_at_a_time_s": round(t1 - t0, 3),
                                           "batched_s": round(t2 - t1, 3), "speedup": inproc,
                                           "identical": same_inproc}, "decode_bound": decode}}


def decode_bound(loaded: dict, prompts: list[str], n_new: int, size: int) -> dict:
    """generate_text vs generate_batched on a random-init model of the served config (dynamic INT8 when the
    served variant is): a workload where decoding, not the prefill, is the work."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from corpus2model.tasks.model.modeling import generate_batched, generate_text, quantize_dynamic_int8

    config = AutoConfig.from_pretrained(loaded["folder"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if loaded["variant"] == "dynamic_int8":
        model = quantize_dynamic_int8(model)
    tok = loaded["tokenizer"]
    t0 = time.perf_counter()
    alone = generate_text(model, tok, prompts, max_new_tokens=n_new)
    t1 = time.perf_counter()
    together = generate_batched(model, tok, prompts, max_new_tokens=n_new, max_batch_size=size)
    t2 = time.perf_counter()
    return {"prompts": len(prompts), "tokens": sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in alone),
            "one_at_a_time_s": round(t1 - t0, 3), "batched_s": round(t2 - t1, 3),
            "speedup": round((t1 - t0) / (t2 - t1), 2), "identical": sum(a == b for a, b in zip(alone, together))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", type=Path, nargs="*", help="configs whose production model to serve")
    p.add_argument("--requests", type=int, default=200, help="/classify requests per mode")
    p.add_argument("--gen-requests", type=int, default=32, help="/generate requests per mode")
    p.add_argument("--gen-max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=120.0, help="per mode: stop sending after this long")
    p.add_argument("--variant", default=None, help="tuned or dynamic_int8 (default: the registered serve variant)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (server and profile)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    # internal: the child process that serves one config
    p.add_argument("--server", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--wait", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.server:
        return serve_child(args)
    if not args.configs:
        p.error("name at least one config")

    import torch

    from results_io import RESULTS, write_results
    from corpus2model.flows.serve import load_version
    from corpus2model.schemas.config import load_config

    torch.set_num_threads(args.threads)
    rows, notes, extra = [], [], {}
    for config in args.configs:
        cfg = load_config(config)
        loaded = load_version(cfg.paths.registry, cfg.registry.model_name, variant=args.variant)
        part = bench_classify if loaded["task"] == "classification" else bench_generate
        r, n, e = part(config, cfg, loaded, args)
        rows, notes, extra = rows + r, notes + n, extra | e
    notes.append("Loopback; the server (uvicorn with the c2m serve app) in a child process, the clients in the bench "
                 "process; one run per mode.")
    write_results("serve_bench", rows, "\n\n".join(notes), out_dir=args.out or RESULTS,
                  title="Serving: dynamic batching vs unbatched", extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
