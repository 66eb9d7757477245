"""Training throughput: corpus2model's training step vs the HF Trainer + PEFT anchors, on GPU and on CPU.

GPU (a CUDA machine, a quiet one; without CUDA it refuses, exit 2), vs /work/shared/bench/gpu_baseline.py
on a random-init Qwen2-0.5B-shaped model in bf16:
    python bench/train_throughput.py                      # ours (lora, full) + the anchor (padded, packed)
    python bench/train_throughput.py --steps 60 --compile # torch.compile the decoder layers too
    python bench/train_throughput.py --no-anchor          # ours only

CPU (``--cpu``), vs /work/shared/bench/cpu_baseline.py on its random-init 48M Llama (hidden 512, 8 layers,
vocab 20,480), 2 threads, 8 steps of 8 documents, the first 3 untimed (the anchor's numbers):
    python bench/train_throughput.py --cpu                # anchor variants and ours, interleaved, twice
    python bench/train_throughput.py --cpu --repeats 1 --precisions bf16

Same work for every system. GPU: the anchor's data (4000 random-token documents, lognormal lengths
``exp(N(log 220, 0.8))`` clamped to [16, 1024], mean about 287 tokens, loss on every token) and 8 documents
per optimizer step, lr 2e-4, LoRA r=16/alpha=32 on the 7 projection matrices. CPU: the CPU anchor's
2000 documents (``exp(N(log 150, 0.6))`` clamped to [16, 512], mean 178) and, step by step, exactly the
documents the anchor's Trainer drew: its run records each batch (a wrapper around ``Trainer.training_step``,
the anchor file itself is run unmodified) and ours trains on those batches in the same order, from the
same seeded initial weights (and LoRA init), with the same lr, clipping and AdamW. So the two loss
curves are comparable step by step, and both systems' tokens/s count the same tokens.

Ours (``corpus2model``) runs the code the finetune stage runs (tasks/tokenize.py, tasks/model/losses.py,
tasks/model/trainer.py), on both devices:
- packing: each step's 8 documents go through ``tokenize.pack`` into one row of exactly their total
  length (no padding), position ids restarting at every document, each document's first label -100;
- attention that keeps documents apart without a dense mask: flash-attention's varlen kernel where
  flash_attn imports (``--attn flash_attention_2``, the GPU default when it does), else
  ``losses.PACKED_SDPA`` (sdpa once per document, causal; the CPU default). Plain ``--attn sdpa`` gets
  the dense block-diagonal mask transformers derives from the position ids;
- ``losses.chunked_cross_entropy``: the logits are never materialised beyond ``--chunk`` tokens at a time
  (the 151,936-column Qwen2 head); a step that fits one chunk is not recomputed in backward;
- fused AdamW (``trainer.train``), bf16: the weights on GPU, autocast on CPU (``--precisions``: the
  CPU mode runs fp32 too, to show what autocast adds); ``--compile`` compiles each decoder layer.

Rows (bench/results/train_throughput.json and .md; a GPU run keeps the CPU rows and vice versa):
GPU: ``lora tokens/s``, ``full tokens/s`` (real tokens, no padding, timed after 5 warm-up steps with cuda
synchronisation), ``peak memory GiB`` (per method), ``MFU %`` (tokens/s x (4 N for LoRA | 6 N for full)
/ 989 TFLOP/s, the anchor's formula), ``loss after N tokens``. CPU: ``cpu lora tokens/s``, ``cpu full
tokens/s`` (each system; the anchor's rows are its own figure, which counts its mean document length per
example; the same-token figure is in the config column), ``cpu lora tokens/s vs hf x``, ``cpu full tokens/s
vs hf x`` (ours over the best anchor variant, by the higher of its two figures), ``cpu <method> loss, last 5
steps`` and ``cpu peak RSS MB``. Each figure is the best of ``--repeats`` runs (the machines are shared:
a run that another process slowed is not the code's speed); every run is kept in the JSON.

``--smoke`` runs ours on a tiny shape on CPU for a few steps (what tests/test_train_throughput.py
does to keep this file working on machines without a GPU); it writes no results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from results_io import RESULTS, SHARED, write_results

ANCHOR = SHARED / "bench" / "gpu_baseline.py"
CPU_ANCHOR = SHARED / "bench" / "cpu_baseline.py"
H100_BF16_FLOPS = 989e12
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
# cpu_baseline.py's model (bench/quant_bench.py's shape); LlamaConfig's other defaults, as the anchor leaves them.
LLAMA_48M = dict(vocab_size=20480, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# cpu_baseline.py's run: 8 steps of 8 examples, the first 3 untimed, 2 threads (this machine's cores).
CPU_STEPS, CPU_WARMUP, CPU_BATCH, CPU_THREADS = 8, 3, 8, 2
CPU_VARIANTS = (("lora", "packed"), ("lora", "padded"), ("full", "packed"), ("full", "padded"))


def doc_lengths(n: int, seed: int = 0) -> list[int]:
    """The anchor's lengths: exp(N(log 220, 0.8)) clamped to [16, 1024] (mean about 287)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.clamp(torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(220)), 16, 1024).long().tolist()


def cpu_anchor_docs(n: int = 2000, vocab: int = 20480) -> list[list[int]]:
    """cpu_baseline.py's documents, drawn the way it draws them (seed 0: lengths exp(N(log 150, 0.6))
    clamped to [16, 512], then each document's tokens). The CPU run checks the batches the anchor
    records against these, so a change to the anchor's data shows up as a failed check, not a skew."""
    import torch

    g = torch.Generator().manual_seed(0)
    lens = torch.clamp(torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(150)), 16, 512).long().tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def pack_row(docs: list[list[int]]) -> dict:
    """One row holding ``docs`` whole, packed by the tokenize stage's ``pack`` (seq_len = their total
    length, so no padding): position ids restart at every document and each document's first label
    is -100 (no loss across a boundary). Tensors [1, total]."""
    import torch

    from corpus2model.tasks.tokenize import pack

    total = sum(len(d) for d in docs)
    blocks = pack([{"input_ids": d, "labels": d} for d in docs], seq_len=total, pad_id=0)
    if len(blocks) != 1 or 0 in blocks[0]["attention_mask"]:
        raise AssertionError(f"tokenize.pack split {len(docs)} documents of {total} tokens into {len(blocks)} rows")
    return {k: torch.tensor(v)[None] for k, v in blocks[0].items()}


def packed_steps(lengths: list[int], vocab: int, docs_per_step: int, seed: int = 0):
    """One packed row (``pack_row``) per step from ``docs_per_step`` random-token documents."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(lengths) - docs_per_step + 1, docs_per_step):
        yield pack_row([torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths[i:i + docs_per_step]])


def build(shape: dict, method: str, attn: str, device: str, dtype, arch: str = "qwen2"):
    """The anchors' model: seeded random init, then (LoRA) peft's seeded adapter init, in their order."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from corpus2model.tasks.model import losses

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = config_cls(**shape)
    cfg._attn_implementation = "sdpa" if attn == losses.PACKED_SDPA else attn
    model = model_cls(cfg).to(dtype).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if attn == losses.PACKED_SDPA and not losses.use_packed_attention(model):
        raise ValueError(f"{arch}: {losses.PACKED_SDPA} does not apply to this model")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model, n_params


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (regional compilation: one layer's graph, reused by
    all layers, compiles much faster than the whole model; the chunked loss calls the decoder directly,
    so compiling the top-level model would not be used)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        layer.compile(dynamic=True)


def run_ours(method: str, shape: dict, steps: int, docs_per_step: int = 8, chunk: int = 4096, attn: str = "sdpa",
             compile_model: bool = False, device: str = "cuda", n_docs: int = 4000, warmup: int = 5,
             arch: str = "qwen2", precision: str | None = None, step_docs: list[list[list[int]]] | None = None,
             min_lr_ratio: float = 1.0) -> dict:
    """Time ``steps`` optimizer steps of the finetune stage's loop on packed documents, after ``warmup``
    untimed ones: random ones by default, or ``step_docs`` (per step, its documents' token ids, in order).

    ``precision``: bf16 (weights in bf16 on CUDA, autocast elsewhere) or fp32; default bf16 on CUDA."""
    import torch

    from corpus2model.tasks.model import losses, trainer

    precision = precision or ("bf16" if device == "cuda" else "fp32")
    # On CUDA the anchor keeps bf16 weights; on CPU its weights are fp32 and ours stay fp32 under autocast.
    dtype = torch.bfloat16 if device == "cuda" and precision == "bf16" else torch.float32
    amp = "bf16" if precision == "bf16" and device != "cuda" else "fp32"
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, n_params = build(shape, method, attn, device, dtype, arch)
    t_compile = None
    if compile_model:
        compile_layers(model)
    if step_docs is None:
        data = list(packed_steps(doc_lengths(n_docs), shape["vocab_size"], docs_per_step))
    else:
        data = [pack_row(docs) for docs in step_docs]
    varlen = attn.startswith("flash")

    def loss_fn(m, batch):
        extra = losses.varlen_kwargs(batch["position_ids"]) if varlen else None
        return losses.causal_lm_loss(m, batch, chunk_tokens=chunk, extra=extra)

    times: list[float] = []
    tokens: list[int] = []

    class InOrder(trainer.Batches):
        """The rows in their given order (the recorded anchor order), with the time each step starts."""

        def __next__(self):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            b = data[self.position % len(data)]
            self.position += 1
            tokens.append(int(b["attention_mask"].sum()))
            return b

    total = warmup + steps
    ft = SimpleNamespace(learning_rate=2e-4, weight_decay=0.0, max_steps=total, warmup_steps=0,
                         min_lr_ratio=min_lr_ratio, grad_clip=1.0, grad_accum=1, precision=amp, eval_every=10 ** 9,
                         early_stopping_patience=0, early_stopping_min_delta=0.0, checkpoint_every=0,
                         keep_checkpoints=1)
    res = trainer.train(model, InOrder(len(data), None, 1, seed=0), lambda: float("nan"), ft, loss_fn, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    # times[i] is when step i started: steps warmup..total-1 run from times[warmup] to the end.
    dt = end - times[warmup]
    step_s = [b - a for a, b in zip(times, times[1:] + [end])]
    if compile_model:
        # The first step traces and compiles; a later step of a similar length is the run time.
        t_compile = round(step_s[0] - min(step_s[1:]), 1) if len(step_s) > 1 else None
    toks = sum(tokens[warmup:])
    tps = toks / dt
    flops_per_tok = (6 if method == "full" else 4) * n_params
    train_losses = [r["train_loss"] for r in res["history"][1:]]
    return {"system": "corpus2model", "method": method, "mode": "packed", "tokens_per_s": round(tps, 1),
            "mfu": round(tps * flops_per_tok / H100_BF16_FLOPS, 4) if device == "cuda" else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loss_last": round(train_losses[-1], 4),
            "loss_last5": round(sum(train_losses[-5:]) / len(train_losses[-5:]), 4),
            "losses": [round(x, 4) for x in train_losses], "step_seconds": [round(x, 3) for x in step_s],
            "timed_tokens": toks, "tokens_trained": sum(tokens), "params": n_params, "steps": steps, "warmup": warmup,
            "attn": attn, "precision": precision, "compile": compile_model, "compile_s": t_compile, "chunk": chunk,
            "threads": torch.get_num_threads()}


def run_anchor(steps: int, out: Path) -> list[dict]:
    """The anchor script in its own process (its own CUDA context and memory peak)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OUT=str(out), STEPS=str(steps + 5),
               VARIANTS=json.dumps([["lora", "padded", 8], ["lora", "packed", 8], ["full", "padded", 8],
                                    ["full", "packed", 8]]))
    subprocess.run([sys.executable, str(ANCHOR)], env=env, check=False)
    p = out / "gpu_baseline.json"
    rows = json.loads(p.read_text()) if p.is_file() else []
    for r in rows:
        r["system"] = f"hf-trainer-peft ({r['mode']})"
    return rows


# ---------------------------------------------------------------------------------------------
# CPU: the anchor as a recorded peer, ours on its batches
# ---------------------------------------------------------------------------------------------
def _batch_docs(inputs: dict) -> list[list[int]]:
    """The documents of one anchor batch: a flattened row cut where position ids restart, or the
    attended part of each padded row."""
    ids = inputs["input_ids"]
    if "position_ids" in inputs and ids.shape[0] == 1:
        row, pos = ids[0].tolist(), inputs["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(row)]
        return [row[s:e] for s, e in zip(starts, starts[1:])]
    mask = inputs["attention_mask"]
    return [r[:int(m.sum())] for r, m in zip(ids.tolist(), mask)]


def peer_main(method: str, mode: str, out: Path) -> int:
    """Run cpu_baseline.py (unmodified, as ``__main__``) for one variant, recording every batch its
    Trainer trains on and when each step begins and ends; writes out/peer_steps.json beside the
    anchor's own out/cpu_baseline.json."""
    import runpy

    import transformers

    steps: list[dict] = []
    clock: dict = {}

    class StepClock(transformers.TrainerCallback):
        # The anchor's own window: from the beginning of the first step after warm-up to the end.
        def on_step_begin(self, args, state, control, **kw):
            steps.append({"begin": time.perf_counter()})
            if state.global_step == CPU_WARMUP:
                clock["t0"] = steps[-1]["begin"]

        def on_step_end(self, args, state, control, **kw):
            steps[-1]["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

        def on_train_end(self, args, state, control, **kw):
            clock["t1"] = time.perf_counter()

    trainer_cls = transformers.Trainer
    init, training_step = trainer_cls.__init__, trainer_cls.training_step

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(StepClock())

    def recording_step(self, model, inputs, *a, **kw):
        steps[-1]["docs"] = _batch_docs(inputs)
        return training_step(self, model, inputs, *a, **kw)

    trainer_cls.__init__, trainer_cls.training_step = recording_init, recording_step
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(OUT=str(out), STEPS=str(CPU_STEPS), THREADS=str(CPU_THREADS),
                      VARIANTS=json.dumps([[method, mode, CPU_BATCH]]))
    runpy.run_path(str(CPU_ANCHOR), run_name="__main__")
    (out / "peer_steps.json").write_text(json.dumps({"steps": steps, **clock}), encoding="utf-8")
    return 0


def _subprocess_json(args: list[str], out_file: Path, timeout: int = 1800) -> tuple[dict | list | None, str]:
    """Run this file with ``args`` in a fresh process; its JSON output file (None if it failed) and log tail."""
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    tail = (p.stdout + p.stderr)[-2000:]
    if p.returncode != 0 or not out_file.is_file():
        return None, tail
    return json.loads(out_file.read_text(encoding="utf-8")), tail


def run_peer(method: str, mode: str, work: Path) -> dict | None:
    """One anchor variant in its own process: its result row, plus the recorded batches and the
    same-token tokens/s (the real tokens of the timed steps over the anchor's own window)."""
    out = work / f"peer-{method}-{mode}"
    rec, tail = _subprocess_json(["--peer", f"{method},{mode}", "--out", str(out)], out / "peer_steps.json")
    res_path = out / "cpu_baseline.json"
    if rec is None or not res_path.is_file():
        print(f"anchor {method} {mode} failed:\n{tail}", file=sys.stderr)
        return None
    row = json.loads(res_path.read_text(encoding="utf-8"))[0]
    docs = [s["docs"] for s in rec["steps"]]
    timed = sum(len(d) for s in docs[CPU_WARMUP:] for d in s)
    # A step lasts from its beginning to the next one's (the last to the end of training), as ours
    # are timed: the anchor's window is the sum of its timed steps.
    begins = [s["begin"] for s in rec["steps"]]
    row.update(system=f"hf trainer + peft ({mode})", step_docs=docs, timed_tokens=timed,
               tokens_per_s_same_tokens=round(timed / (rec["t1"] - rec["t0"]), 1),
               step_seconds=[round(b - a, 3) for a, b in zip(begins, begins[1:] + [rec["t1"]])],
               losses=[s.get("loss") for s in rec["steps"]])
    return row


def run_ours_cpu(method: str, precision: str, step_docs: list | None, work: Path,
                 compile_model: bool = False) -> dict | None:
    """Ours in its own process (as the anchor runs), on ``step_docs`` when given."""
    tag = f"ours-{method}-{precision}{'-compile' if compile_model else ''}"
    docs_file = work / f"{tag}-docs.json"
    docs_file.write_text(json.dumps(step_docs), encoding="utf-8")
    out = work / f"{tag}.json"
    args = ["--worker", f"{method},{precision}", "--docs", str(docs_file), "--out", str(out)]
    res, tail = _subprocess_json(args + (["--compile"] if compile_model else []), out)
    if res is None:
        print(f"ours {method} {precision} failed:\n{tail}", file=sys.stderr)
    return res


def worker_main(method: str, precision: str, docs_file: Path, out: Path, compile_model: bool) -> int:
    import torch

    torch.set_num_threads(CPU_THREADS)
    from corpus2model.tasks.model import losses

    step_docs = json.loads(docs_file.read_text(encoding="utf-8"))
    if step_docs is None:
        # No anchor recording: the anchor's documents in a seeded order, 8 per step.
        from corpus2model.tasks.model.trainer import batch_order

        docs = cpu_anchor_docs()
        step_docs = [[docs[i] for i in b] for b in batch_order(len(docs), CPU_BATCH, seed=0, epoch=0)[:CPU_STEPS]]
    res = run_ours(method, LLAMA_48M, steps=len(step_docs) - CPU_WARMUP, warmup=CPU_WARMUP, chunk=4096,
                   attn=losses.PACKED_SDPA, compile_model=compile_model, device="cpu", arch="llama",
                   precision=precision, step_docs=step_docs, min_lr_ratio=0.0)
    out.write_text(json.dumps(res), encoding="utf-8")
    return 0


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_compare(repeats: int, precisions: list[str], compile_model: bool, work: Path) -> dict:
    """Anchor variants and ours, interleaved method by method, ``repeats`` times over."""
    known = {tuple(d) for d in cpu_anchor_docs()}
    runs: list[dict] = []
    for rep in range(repeats):
        for method in ("lora", "full"):
            recorded = None
            for m, mode in CPU_VARIANTS:
                if m != method:
                    continue
                load = _load()
                r = run_peer(method, mode, work)
                if r is None:
                    continue
                r.update(repeat=rep, load_before=load)
                r["same_documents_as_cpu_anchor_docs"] = all(tuple(d) in known for s in r["step_docs"] for d in s)
                recorded = recorded or r["step_docs"]
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "step_docs"}), flush=True)
                if mode == "packed":
                    for precision in precisions:
                        load = _load()
                        o = run_ours_cpu(method, precision, recorded, work, compile_model)
                        if o is not None:
                            o.update(repeat=rep, load_before=load,
                                     system="corpus2model" + ("" if precision == precisions[0] else f" ({precision})"))
                            runs.append(o)
                            print(json.dumps(o), flush=True)
    recorded = [json.dumps(r["step_docs"]) for r in runs if "step_docs" in r]
    return {"runs": [{k: v for k, v in r.items() if k != "step_docs"} for r in runs],
            "step_docs_equal": len(set(recorded)) == 1}


def _best(runs: list[dict], system: str, method: str, key: str = "tokens_per_s") -> dict | None:
    mine = [r for r in runs if r["system"] == system and r["method"] == method]
    return max(mine, key=lambda r: r[key]) if mine else None


def per_step_best(runs: list[dict], system: str, method: str) -> float | None:
    """Timed tokens over the sum, step by step, of the fastest repeat of that step: a figure less
    moved by other processes on a shared machine than any one run (the same documents every repeat)."""
    mine = [r for r in runs if r["system"] == system and r["method"] == method and r.get("step_seconds")]
    if not mine:
        return None
    n = min(len(r["step_seconds"]) for r in mine)
    best = [min(r["step_seconds"][i] for r in mine) for i in range(CPU_WARMUP, n)]
    return round(mine[0]["timed_tokens"] / sum(best), 1) if best and sum(best) > 0 else None


def cpu_rows(runs: list[dict], repeats: int) -> tuple[list[dict], str]:
    """results_io rows and the side-by-side table for a CPU comparison."""
    rows: list[dict] = []
    systems = sorted({r["system"] for r in runs}, key=lambda s: (not s.startswith("corpus2model"), s))
    cfg = (f"CPU {CPU_THREADS} threads, 48M Llama, {CPU_STEPS} steps x {CPU_BATCH} documents ({CPU_WARMUP} untimed), "
           f"best of {repeats}")
    lines = ["| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for method in ("lora", "full"):
        best = {s: _best(runs, s, method) for s in systems}
        peers = [r for r in runs if r["method"] == method and not r["system"].startswith("corpus2model")]
        # The anchor's best variant by the higher of its own figure and the same-token one: the
        # ratio below is never flattered by the way the anchor counts tokens.
        peer_best = max((max(r["tokens_per_s"], r["tokens_per_s_same_tokens"]) for r in peers), default=None)
        cells_tps, cells_step, cells_loss, cells_rss = [], [], [], []
        for s in systems:
            r = best[s]
            if r is None:
                for cells in (cells_tps, cells_step, cells_loss, cells_rss):
                    cells.append("-")
                continue
            same = r.get("tokens_per_s_same_tokens")
            note = f"{cfg}; {r.get('precision', 'fp32')}" + (f"; same-token figure {same}" if same else "")
            rows.append({"system": s, "metric": f"cpu {method} tokens/s", "value": r["tokens_per_s"], "unit": "tokens/s",
                         "config": note})
            step_best = per_step_best(runs, s, method)
            if step_best is not None:
                rows.append({"system": s, "metric": f"cpu {method} tokens/s, per-step best", "value": step_best,
                             "unit": "tokens/s", "config": f"{cfg}; each timed step at its fastest repeat"})
            cells_step.append("-" if step_best is None else f"{step_best:,.0f}")
            loss = r.get("loss_last5")
            rows.append({"system": s, "metric": f"cpu {method} loss, last 5 steps", "value": loss, "unit": "nats/token",
                         "config": cfg})
            rows.append({"system": s, "metric": f"cpu {method} peak RSS MB", "value": r.get("peak_rss_mb"), "unit": "MB",
                         "config": cfg})
            cells_tps.append(f"{r['tokens_per_s']:,.0f}" + (f" ({same:,.0f})" if same else ""))
            cells_loss.append(f"{loss:.4f}")
            cells_rss.append(f"{r.get('peak_rss_mb'):,.0f}")
        ours = best.get("corpus2model")
        if ours is not None and peer_best:
            rows.append({"system": "corpus2model", "metric": f"cpu {method} tokens/s vs hf x",
                         "value": round(ours["tokens_per_s"] / peer_best, 2), "unit": "x",
                         "config": f"{cfg}; over the best anchor variant ({peer_best:,.0f} tokens/s)"})
            packed = best.get("hf trainer + peft (packed)")
            if packed is not None:
                rows.append({"system": "corpus2model", "metric": f"cpu {method} loss vs hf %",
                             "value": round(100 * (ours["loss_last5"] / packed["loss_last5"] - 1), 2), "unit": "%",
                             "config": f"{cfg}; same documents, same order; vs the packed anchor"})
        lines += [f"| cpu {method} tokens/s | " + " | ".join(cells_tps) + " |",
                  f"| cpu {method} tokens/s, per-step best | " + " | ".join(cells_step) + " |",
                  f"| cpu {method} loss, last 5 steps | " + " | ".join(cells_loss) + " |",
                  f"| cpu {method} peak RSS MB | " + " | ".join(cells_rss) + " |"]
    for r in rows:
        if r["metric"].endswith("vs hf x"):
            cells = [str(r["value"]) if s == "corpus2model" else "" for s in systems]
            lines.append(f"| {r['metric']} | " + " | ".join(cells) + " |")
    loads = [r["load_before"] for r in runs if r.get("load_before") is not None]
    table_md = "\n".join(lines) + "\n\nTokens/s of the anchor: its own figure (same-token figure in brackets)."
    if loads:
        table_md += (f" The {CPU_THREADS} cores were shared with other work: 1-minute load average {min(loads)}-"
                     f"{max(loads)} before the runs; slowed steps show in each run's step_seconds (JSON).")
    return rows, table_md + "\n"


def table(rows: list[dict]) -> str:
    systems = sorted({r["system"] for r in rows}, key=lambda s: (s != "corpus2model", s))
    get = lambda s, m, k: next((r.get(k) for r in rows if r["system"] == s and r["method"] == m), None)  # noqa: E731
    lines = ["| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for label, m, k, f in (("lora tokens/s", "lora", "tokens_per_s", "{:,}"), ("full tokens/s", "full", "tokens_per_s", "{:,}"),
                           ("peak memory GiB (lora)", "lora", "peak_gib", "{}"), ("peak memory GiB (full)", "full", "peak_gib", "{}"),
                           ("MFU % (lora)", "lora", "mfu", "{:.1%}"), ("MFU % (full)", "full", "mfu", "{:.1%}"),
                           ("loss after N tokens (lora)", "lora", "loss_last", "{}")):
        cells = []
        for s in systems:
            v = get(s, m, k)
            cells.append("-" if v is None else f.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ROW_METRICS = (("lora tokens/s", "lora", "tokens_per_s", "tokens/s"), ("full tokens/s", "full", "tokens_per_s", "tokens/s"),
               ("peak memory GiB (lora)", "lora", "peak_gib", "GiB"), ("peak memory GiB (full)", "full", "peak_gib", "GiB"),
               ("MFU % (lora)", "lora", "mfu", "%"), ("MFU % (full)", "full", "mfu", "%"),
               ("loss after N tokens (lora)", "lora", "loss_last", ""))


def result_rows(rows: list[dict], meta: dict) -> list[dict]:
    """The per-run dicts as results_io rows (system, metric, value, unit, config)."""
    out = []
    for r in rows:
        for label, method, key, unit in ROW_METRICS:
            if r.get("method") == method and r.get(key) is not None:
                value = round(100 * r[key], 2) if unit == "%" else r[key]
                out.append({"system": r["system"], "metric": label, "value": value, "unit": unit,
                            "config": f"{meta['device']}, {r.get('steps', meta['steps'])} steps, attn {r.get('attn', meta['attn'])}"})
    return out


def write_mode(mode: str, rows: list[dict], table_md: str, extra: dict, out_dir: Path = RESULTS) -> Path:
    """Write this mode's rows (``cpu`` or ``gpu``) and keep the other mode's from the existing results."""
    path = out_dir / "train_throughput.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    is_cpu = lambda r: r["metric"].startswith("cpu ")  # noqa: E731
    kept = [r for r in old.get("rows", []) if is_cpu(r) != (mode == "cpu")]
    tables = {**old.get("tables", {}), mode: table_md}
    keep_extra = {k: v for k, v in old.items() if k.startswith(("cpu_", "gpu_")) and not k.startswith(mode + "_")}
    notes = "\n".join(f"{'CPU' if m == 'cpu' else 'GPU'}, side by side:\n\n{t}" for m, t in sorted(tables.items()))
    all_rows = rows + kept if mode == "cpu" else kept + rows
    return write_results("train_throughput", all_rows, notes, out_dir, "Training throughput",
                         extra={**keep_extra, **{f"{mode}_{k}": v for k, v in extra.items()}, "tables": tables})


def cpu_main(a) -> int:
    import torch

    if not CPU_ANCHOR.is_file():
        print(f"train_throughput --cpu: the anchor {CPU_ANCHOR} is missing (set C2M_SHARED)", file=sys.stderr)
        return 2
    precisions = [p for p in a.precisions.split(",") if p]
    with tempfile.TemporaryDirectory(prefix="c2m-train-cpu-") as tmp:
        res = cpu_compare(a.repeats, precisions, a.compile, Path(tmp))
    runs = res["runs"]
    rows, table_md = cpu_rows(runs, a.repeats)
    print(table_md)
    import peft
    import transformers

    meta = {"device": "cpu", "threads": CPU_THREADS, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "repeats": a.repeats, "precisions": precisions, "compile": a.compile,
            "anchor": str(CPU_ANCHOR.name), "step_docs_equal_across_variants": res["step_docs_equal"]}
    if a.no_write:
        return 0
    write_mode("cpu", rows, table_md, {"meta": meta, "runs": runs})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of the output-head cross-entropy")
    ap.add_argument("--attn", default="auto", help="auto | flash_attention_2 | sdpa | c2m_packed_sdpa")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 3 steps, no results written")
    ap.add_argument("--cpu", action="store_true", help="the CPU comparison with ../shared/bench/cpu_baseline.py")
    ap.add_argument("--repeats", type=int, default=2, help="--cpu: interleaved rounds; each figure is the best")
    ap.add_argument("--precisions", default="bf16,fp32", help="--cpu: ours in these, the first is the headline")
    ap.add_argument("--no-write", action="store_true", help="--cpu: print only")
    # Internal: one process per measured run (the anchor wrapped, or ours), so each has its own memory peak.
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--docs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peer:
        return peer_main(*a.peer.split(","), Path(a.out))
    if a.worker:
        return worker_main(*a.worker.split(","), Path(a.docs), Path(a.out), a.compile)
    if a.cpu:
        return cpu_main(a)
    import torch

    if a.smoke:
        for method in ("lora", "full"):
            print(json.dumps(run_ours(method, TINY, steps=3, chunk=64, attn="sdpa", device="cpu", n_docs=40,
                                      warmup=1, docs_per_step=2)))
        return 0
    if not torch.cuda.is_available():
        print("train_throughput: needs a CUDA GPU (bf16 Qwen2-0.5B shape; the anchor is GPU-only too). "
              "Nothing was run. Use --cpu for the CPU comparison, --smoke for a CPU check of the code path.",
              file=sys.stderr)
        return 2
    attn = a.attn
    if attn == "auto":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            attn = "sdpa"
    rows = [run_ours(m, QWEN2_05B, a.steps, chunk=a.chunk, attn=attn, compile_model=a.compile) for m in ("lora", "full")]
    for r in rows:
        print(json.dumps(r), flush=True)
    if not a.no_anchor:
        rows += run_anchor(a.steps, Path("/tmp/c2m-train-bench"))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": a.steps, "attn": attn}
    write_mode("gpu", result_rows(rows, meta), table(rows), {"meta": meta, "runs": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
