"""Quantization benchmark: fp32 PyTorch vs torch.ao dynamic INT8 vs ONNX Runtime (fp32, dynamic INT8,
static INT8 with calibration) on one Llama-shaped causal LM on CPU, with this project's code paths
(tasks/model/modeling.py, tasks/model/export.py), so the figures describe what the pipeline ships.

    python bench/quant_bench.py                      # ~48M-parameter Llama, 2 threads (lead, quiet machine)
    python bench/quant_bench.py --tiny --out /tmp/qb # smoke test on a tiny shape (not a result)

Model: LlamaForCausalLM from a config (seed 0; no hub download), default shape hidden 512, 8 layers,
8 heads, MLP 1536, vocab 20480 (48.2M parameters, untied head). Its weights are trained for
``--train-steps`` steps on a synthetic next-token task (repeat the sequence shifted by one) so that
logits are peaked like a trained model's and top-1 agreement means something; a randomly
initialised model's near-uniform logits would flip argmax under any noise.

Per variant: latency p50/p95 of one batch-1 forward over ``--seq`` tokens (after warm-up);
requests/s and tokens/s of a batch of ``--batch`` such sequences; size on disk of what the pipeline
saves (safetensors / .onnx); top-1 agreement with fp32 and max |logit diff| on held-out probe
sequences. Static INT8 calibrates on ``--calib`` sequences of the same synthetic distribution.

Rows: one per variant for ``p50 ms``, ``p95 ms``, ``requests/s``, ``tokens/s``, ``size MB``,
``top-1 agreement``; plus ``int8 dynamic speedup x`` (fp32 p50 / INT8 p50), ``int8 size ratio`` and
``accuracy drop pt`` (100 x (1 - top-1 agreement)) for each INT8 variant against its fp32 runtime.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_results

FULL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536, vocab_size=20480)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=512)


def build(shape: dict, seq: int, train_steps: int, threads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=max(256, seq), tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    if train_steps:
        # Teach it something checkable (next token = current token + 1 mod a small range) so its
        # logits are confident; the range keeps it learnable in a few steps.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(train_steps):
            x = synthetic(8, seq, shape["vocab_size"], g)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def synthetic(n: int, seq: int, vocab: int, g):
    import torch

    span = min(vocab - 2, 256)
    start = torch.randint(0, span, (n, 1), generator=g)
    return 2 + (start + torch.arange(seq)) % span


def timed(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape, few runs: a smoke test, not a result")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calib", type=int, default=256, help="static INT8 calibration sequences")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.tiny:
        a.seq, a.runs, a.calib, a.train_steps, a.batch = 32, 5, 20, 20, 4

    import numpy as np
    import torch

    from corpus2model.tasks.model import export
    from corpus2model.tasks.model.modeling import quantize_dynamic_int8, save_dynamic_int8

    torch.set_num_threads(a.threads)
    shape = TINY if a.tiny else FULL
    model = build(shape, a.seq, a.train_steps, a.threads)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(123)
    probes = synthetic(8, a.seq, shape["vocab_size"], g)
    one = probes[:1]
    batch = synthetic(a.batch, a.seq, shape["vocab_size"], g)
    calib = [x[None].numpy().astype(np.int64) for x in synthetic(a.calib, a.seq, shape["vocab_size"],
                                                                  torch.Generator().manual_seed(7))]

    with torch.inference_mode():
        ref = model(input_ids=probes, use_cache=False).logits.float()

    tmp = Path(tempfile.mkdtemp(prefix="quant_bench-"))
    results: dict[str, dict] = {}

    def torch_variant(name, m, folder):
        with torch.inference_mode():
            lat = timed(lambda: m(input_ids=one, use_cache=False), a.runs)
            thr = timed(lambda: m(input_ids=batch, use_cache=False), max(3, a.runs // 5), warmup=1)
            got = m(input_ids=probes, use_cache=False).logits.float()
        size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        results[name] = {"lat": lat, "thr": thr, "size": size, **export.compare_logits(ref.numpy(), got.numpy())}

    def ort_variant(name, path):
        sess = export.ort_session(path, a.threads)
        lat = timed(lambda: export.ort_logits(sess, one.numpy()), a.runs)
        thr = timed(lambda: export.ort_logits(sess, batch.numpy()), max(3, a.runs // 5), warmup=1)
        got = export.ort_logits(sess, probes.numpy())
        results[name] = {"lat": lat, "thr": thr, "size": Path(path).stat().st_size,
                         **export.compare_logits(ref.numpy(), got)}

    # fp32 PyTorch, saved as the pipeline saves it
    model.save_pretrained(tmp / "fp32", safe_serialization=True)
    torch_variant("torch fp32", model, tmp / "fp32")
    # torch.ao dynamic INT8 (per-channel), saved as safetensors by the pipeline's writer
    float_config = model.config
    q = quantize_dynamic_int8(model)

    class _NoTok:  # save_dynamic_int8 saves a tokenizer beside the weights; the bench has none
        def save_pretrained(self, folder):
            pass

    save_dynamic_int8(q, _NoTok(), tmp / "int8", float_config)
    torch_variant("torch.ao dynamic int8", q, tmp / "int8")
    del q  # quantize_dynamic returned a copy: ``model`` is still fp32
    # ONNX fp32, ORT dynamic INT8, ORT static INT8 (the pipeline's export and quantizers)
    export.export_onnx(model, tmp / "fp32.onnx")
    export.onnx_check(tmp / "fp32.onnx", ref.numpy(), probes.numpy(), tolerance=1e-2)
    ort_variant("onnxruntime fp32", tmp / "fp32.onnx")
    export.quantize_onnx_dynamic(tmp / "fp32.onnx", tmp / "dyn.onnx")
    ort_variant("onnxruntime dynamic int8", tmp / "dyn.onnx")
    t0 = time.process_time()
    export.quantize_onnx_static(tmp / "fp32.onnx", tmp / "static.onnx", calib)
    calib_cpu_s = time.process_time() - t0
    ort_variant("onnxruntime static int8", tmp / "static.onnx")

    conf = (f"{n_params / 1e6:.1f}M-param Llama (h{shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"vocab {shape['vocab_size']}), seq {a.seq}, {a.threads} threads")
    rows = []
    for name, r in results.items():
        p50, p95 = pct(r["lat"], 50) * 1000, pct(r["lat"], 95) * 1000
        tb = pct(r["thr"], 50)
        rows += [
            {"system": name, "metric": "p50 ms", "value": round(p50, 2), "unit": "ms", "config": conf + ", batch 1"},
            {"system": name, "metric": "p95 ms", "value": round(p95, 2), "unit": "ms", "config": conf + ", batch 1"},
            {"system": name, "metric": "requests/s", "value": round(a.batch / tb, 2), "unit": "req/s",
             "config": conf + f", batch {a.batch}"},
            {"system": name, "metric": "tokens/s", "value": round(a.batch * a.seq / tb, 1), "unit": "tok/s",
             "config": conf + f", batch {a.batch}"},
            {"system": name, "metric": "size MB", "value": round(r["size"] / 1e6, 2), "unit": "MB", "config": conf},
            {"system": name, "metric": "top-1 agreement", "value": r["top1_agreement"], "unit": "",
             "config": conf + f", vs torch fp32 on {len(probes)} probe sequences"},
        ]
    for int8, fp32 in (("torch.ao dynamic int8", "torch fp32"), ("onnxruntime dynamic int8", "onnxruntime fp32"),
                       ("onnxruntime static int8", "onnxruntime fp32")):
        i, f = results[int8], results[fp32]
        rows += [
            {"system": int8, "metric": "int8 dynamic speedup x" if "dynamic" in int8 else "int8 static speedup x",
             "value": round(pct(f["lat"], 50) / pct(i["lat"], 50), 2), "unit": "x", "config": f"p50 vs {fp32}"},
            {"system": int8, "metric": "int8 size ratio", "value": round(i["size"] / f["size"], 3), "unit": "",
             "config": f"bytes on disk vs {fp32}"},
            {"system": int8, "metric": "accuracy drop pt", "value": round(100 * (1 - i["top1_agreement"]), 2),
             "unit": "pt", "config": "100 x (1 - top-1 agreement with torch fp32)"},
        ]
    notes = (f"{'TINY SMOKE TEST, not a result. ' if a.tiny else ''}Synthetic task weights ({a.train_steps} "
             f"AdamW steps); static INT8: QOperator MatMul/Gemm, uint8 activations, per-channel int8 weights, "
             f"{len(calib)} calibration sequences ({calib_cpu_s:.1f} s CPU). Latency is wall time of a forward "
             f"pass (no KV cache, no generation).")
    path = write_results("quant_bench", rows, notes, a.out, "Quantization: PyTorch vs ONNX Runtime, fp32 vs INT8")
    print(Path(path).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
