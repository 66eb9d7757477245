"""quantize: the merged fine-tuned model -> quantized variants, each a folder that loads on its own.

``dynamic_int8``: torch.ao eager dynamic quantization, per-channel symmetric int8 weights on every
``nn.Linear`` except ``quantize.skip_modules`` (none by default), activations quantized per batch at run time; embeddings and
norms stay fp32. torch.ao's own save path is ``torch.save`` (pickle); instead the exact int8
weights, per-channel scales and zero points go into safetensors (tasks/modeling.py) and
``load_causal_lm`` rebuilds the model from them. The stage checks that round trip: the reloaded
model's logits must equal the in-memory quantized model's logits exactly.

Baseline parts (replaced by the export issue): dynamic INT8 only (no static INT8 with calibration,
ONNX, or 4-bit).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "quantize"
VERSION = "1"
SECTIONS = ("quantize",)

CHECK_SEQUENCES = 4  # held-out-free probe inputs for the logit comparisons
CHECK_LEN = 32


def probe_inputs(vocab_size: int, n: int = CHECK_SEQUENCES, length: int = CHECK_LEN, seed: int = 0):
    """Fixed token sequences for comparing variants (data-independent, so the check is reproducible)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


def logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def quantize_folder(src: Path, dst: Path, skip_modules: tuple[str, ...] | list[str] = ()) -> dict:
    """Quantize the model in ``src`` into ``dst``; returns what the stage reports about it."""
    from tasks.modeling import folder_size_bytes, linear_names, load_causal_lm, quantize_dynamic_int8, save_dynamic_int8

    model, tokenizer = load_causal_lm(src)
    ids = probe_inputs(model.config.vocab_size, length=min(CHECK_LEN, model.config.max_position_embeddings))
    fp32_logits = logits(model, ids)
    float_config = model.config
    t0 = time.perf_counter()
    qmodel = quantize_dynamic_int8(model, linear_names(model, skip_modules))
    q_logits = logits(qmodel, ids)
    qcfg = save_dynamic_int8(qmodel, tokenizer, dst, float_config)
    seconds = time.perf_counter() - t0

    reloaded, _ = load_causal_lm(dst)
    r_logits = logits(reloaded, ids)
    if not bool((r_logits == q_logits).all()):
        diff = float((r_logits - q_logits).abs().max())
        raise StageError(f"{dst}: the reloaded INT8 model differs from the quantized model (max |logit diff| "
                         f"{diff:.3g}); the safetensors round trip lost information")
    fp32_bytes = _weights_bytes(src)
    int8_bytes = _weights_bytes(dst)
    agree = float((q_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean())
    return {
        "modules": len(qcfg["modules"]),
        "skipped_modules": list(skip_modules),
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": round(int8_bytes / fp32_bytes, 4),
        "fp32_folder_bytes": folder_size_bytes(src),
        "int8_folder_bytes": folder_size_bytes(dst),
        "max_abs_logit_diff": round(float((q_logits - fp32_logits).abs().max()), 6),
        "top1_agreement": round(agree, 4),
        "reload_exact": True,
        "seconds": round(seconds, 3),
    }


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    from tasks.artifacts import publish_markdown

    if len(inputs) != 1:
        raise StageError(f"quantize takes one upstream manifest (finetune), got {len(inputs)}")
    (ft,) = inputs
    merged = ft.dir / ft.stats.get("merged_dir", "merged")
    if not (merged / "config.json").is_file():
        raise StageError(f"{merged} holds no saved model: quantize reads the finetune stage's merged/ folder")
    files: list[FileEntry] = []
    stats: dict = {"methods": list(cfg.quantize.methods)}
    for method in cfg.quantize.methods:
        if method != "dynamic_int8":  # the config schema admits only implemented methods
            raise StageError(f"quantize.methods: {method!r} is not implemented")
        dst = out_dir / method
        info = quantize_folder(merged, dst, cfg.quantize.skip_modules)
        ctx.info("quantize %s: %s", method, info)
        stats[method] = info
        files += [FileEntry(p.relative_to(out_dir).as_posix(), role="model")
                  for p in sorted(dst.rglob("*")) if p.is_file()]
    # The headline numbers of the (only) method at the top level, for summaries and the registry.
    first = stats[cfg.quantize.methods[0]]
    for k in ("fp32_bytes", "int8_bytes", "size_ratio", "max_abs_logit_diff"):
        stats[k] = first[k]
    (out_dir / "quantize.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    files.append(FileEntry("quantize.json", role="report"))
    rows = "\n".join(f"| {m} | {stats[m]['fp32_bytes']:,} | {stats[m]['int8_bytes']:,} | {stats[m]['size_ratio']} | "
                     f"{stats[m]['max_abs_logit_diff']} | {stats[m]['top1_agreement']} |" for m in cfg.quantize.methods)
    publish_markdown("quantize-summary", "# Quantization\n\n| method | fp32 bytes | quantized bytes | ratio | "
                     "max abs logit diff | top-1 agreement |\n|---|---|---|---|---|---|\n" + rows + "\n",
                     "size and logit drift per quantized variant")
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)
