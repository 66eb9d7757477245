"""GPU training throughput: corpus2model's training step vs the HF Trainer + PEFT anchor
(/work/shared/bench/gpu_baseline.py), on a random-init Qwen2-0.5B-shaped model in bf16.

Run on a CUDA machine (a quiet one; it refuses to run without CUDA, exit 2):
    python bench/train_throughput.py                      # ours (lora, full) + the anchor (padded, packed)
    python bench/train_throughput.py --steps 60 --compile # torch.compile the model too
    python bench/train_throughput.py --no-anchor          # ours only

Same work for every system: the anchor's data (4000 random-token documents, lognormal lengths
``exp(N(log 220, 0.8))`` clamped to [16, 1024], mean about 287 tokens, loss on every token) and
8 documents per optimizer step, lr 2e-4, LoRA r=16/alpha=32 on the 7 projection matrices.

Ours (``corpus2model``) runs the code the finetune stage runs (tasks/model/losses.py, tasks/model/trainer.py):
- packing: the step's 8 documents flattened into one row with restarted ``position_ids``; with
  flash-attention (``--attn flash_attention_2``, default when flash_attn imports) the varlen
  boundaries (``losses.varlen_kwargs``) keep documents apart with no padding and no mask; with
  sdpa, transformers derives the block-diagonal mask from the same position ids;
- ``losses.chunked_cross_entropy``: the 151,936-column logits are never materialised, only
  ``--chunk`` tokens' worth at a time (recomputed in backward);
- fused AdamW (``trainer.train`` picks ``fused=True`` on CUDA); ``--compile`` adds torch.compile.

Rows (bench/results/train_throughput.json and .md): ``lora tokens/s``, ``full tokens/s`` (real
tokens, no padding, timed after 5 warm-up steps with cuda synchronisation), ``peak memory GiB``
(torch.cuda.max_memory_allocated, per method), ``MFU %`` (tokens/s x (4 N for LoRA | 6 N for full)
/ 989 TFLOP/s, the anchor's formula), ``loss after N tokens`` (train loss of the last step).

``--smoke`` runs ours on a tiny shape on CPU for a few steps (what tests/test_train_throughput.py
does to keep this file working on machines without a GPU); it writes no results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ANCHOR = ROOT.parent / "shared" / "bench" / "gpu_baseline.py"
RESULTS = ROOT / "bench" / "results"
H100_BF16_FLOPS = 989e12
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def doc_lengths(n: int, seed: int = 0) -> list[int]:
    """The anchor's lengths: exp(N(log 220, 0.8)) clamped to [16, 1024] (mean about 287)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.clamp(torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(220)), 16, 1024).long().tolist()


def packed_steps(lengths: list[int], vocab: int, docs_per_step: int, seed: int = 0):
    """One flattened row per step: ``docs_per_step`` random-token documents, position ids restarting
    at every document, the first label of each document -100 (no loss across a boundary, as
    tasks/tokenize.py packs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(lengths) - docs_per_step + 1, docs_per_step):
        ids, pos, labels = [], [], []
        for n in lengths[i:i + docs_per_step]:
            x = torch.randint(0, vocab, (n,), generator=g)
            ids.append(x)
            pos.append(torch.arange(n))
            y = x.clone()
            y[0] = -100
            labels.append(y)
        ids = torch.cat(ids)[None]
        yield {"input_ids": ids, "labels": torch.cat(labels)[None], "position_ids": torch.cat(pos)[None],
               "attention_mask": torch.ones_like(ids)}


def build(shape: dict, method: str, attn: str, device: str, dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape)
    cfg._attn_implementation = attn
    model = Qwen2ForCausalLM(cfg).to(dtype).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model, n_params


def run_ours(method: str, shape: dict, steps: int, docs_per_step: int = 8, chunk: int = 4096, attn: str = "sdpa",
             compile_model: bool = False, device: str = "cuda", n_docs: int = 4000, warmup: int = 5) -> dict:
    """Time ``steps`` optimizer steps of the finetune stage's loop on packed random documents."""
    import torch

    from corpus2model.tasks.model import losses, trainer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, n_params = build(shape, method, attn, device, dtype)
    fwd = torch.compile(model) if compile_model else model
    lengths = doc_lengths(n_docs)
    data = list(packed_steps(lengths, shape["vocab_size"], docs_per_step))
    varlen = attn.startswith("flash")

    def loss_fn(m, batch):
        extra = losses.varlen_kwargs(batch["position_ids"]) if varlen else None
        return losses.causal_lm_loss(fwd if m is model else m, batch, chunk_tokens=chunk, extra=extra)

    times: list[float] = []
    tokens: list[int] = []

    class Timed(trainer.Batches):
        def __next__(self):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            b = super().__next__()
            tokens.append(int(b["attention_mask"].sum()))
            return b

    total = warmup + steps
    ft = SimpleNamespace(learning_rate=2e-4, weight_decay=0.0, max_steps=total, warmup_steps=0, min_lr_ratio=1.0,
                         grad_clip=1.0, grad_accum=1, precision="fp32", eval_every=10 ** 9,
                         early_stopping_patience=0, early_stopping_min_delta=0.0, checkpoint_every=0,
                         keep_checkpoints=1)
    # Sequential steps over the documents in order (the anchor's Trainer shuffles; order does not change speed).
    batches = Timed(len(data), lambda idx: data[idx[0]], 1, seed=0)
    res = trainer.train(model, batches, lambda: float("nan"), ft, loss_fn, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    # times[i] is when step i started: steps warmup..total-1 run from times[warmup] to the end.
    dt = end - times[warmup]
    toks = sum(tokens[warmup:])
    tps = toks / dt
    flops_per_tok = (6 if method == "full" else 4) * n_params
    return {"system": "corpus2model", "method": method, "mode": "packed", "tokens_per_s": round(tps),
            "mfu": round(tps * flops_per_tok / H100_BF16_FLOPS, 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None,
            "loss_last": round(res["history"][-1]["train_loss"], 4), "tokens_trained": sum(tokens),
            "params": n_params, "steps": steps, "attn": attn, "compile": compile_model, "chunk": chunk}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of the output-head cross-entropy")
    ap.add_argument("--attn", default="auto", help="auto | flash_attention_2 | sdpa")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 3 steps, no results written")
    a = ap.parse_args(argv)
    import torch

    if a.smoke:
        for method in ("lora", "full"):
            print(json.dumps(run_ours(method, TINY, steps=3, chunk=64, attn="sdpa", device="cpu", n_docs=40,
                                      warmup=1, docs_per_step=2)))
        return 0
    if not torch.cuda.is_available():
        print("train_throughput: needs a CUDA GPU (bf16 Qwen2-0.5B shape; the anchor is GPU-only too). "
              "Nothing was run. Use --smoke for a CPU check of the code path.", file=sys.stderr)
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": a.steps, "attn": attn}
    (RESULTS / "train_throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    (RESULTS / "train_throughput.md").write_text(f"# Training throughput ({meta['device']})\n\n" + table(rows),
                                                 encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
