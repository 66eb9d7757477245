"""quantize: the merged fine-tuned model -> one folder per variant in ``quantize.methods``, each
loading on its own (``tasks.model.export.load_variant``), each cached on its own.

Variants (the heavy lifting is in tasks/model/export.py and tasks/model/modeling.py):

* ``dynamic_int8``: torch.ao eager dynamic quantization, per-channel symmetric int8 weights on every
  ``nn.Linear`` except ``quantize.skip_modules``; activations quantized per batch at run time. The
  exact int8 weights, scales and zero points go into safetensors (not torch.save's pickle) and the
  stage checks the round trip: the reloaded model's logits must equal the in-memory model's exactly.
* ``onnx_fp32``: ONNX export (no KV cache, dynamic batch/seq), checked in ONNX Runtime against
  PyTorch: max |logit diff| must be within ``quantize.onnx_tolerance``.
* ``onnx_int8_dynamic``: ORT dynamic INT8 of that export, per-channel weights.
* ``onnx_int8_static``: ORT static INT8 (MatMul/Gemm, uint8 activations, per-channel int8 weights),
  calibrated on ``calibration_samples`` packed train blocks drawn with ``calibration_seed``: the blocks
  of the tokenize output the stage table passes in (inputs: finetune, tokenize), which must be the one
  the model was trained on.
* ``fp16``/``bf16``: the same weights cast, as safetensors.
* ``bnb_8bit``/``bnb_4bit``: bitsandbytes on a CUDA GPU (``quantize.device: cuda``).

Caching per variant: each variant is a unit in the store keyed by (finetune key, variant, variant
version, the options that variant reads; plus the tokenize key for calibration), so adding
``onnx_int8_static`` to a config that already made ``dynamic_int8`` computes only the new one, and
changing ``calibration_samples`` recomputes only the static variant. The ONNX INT8 variants start
from the ``onnx_fp32`` unit (made once, even when ``onnx_fp32`` itself is not listed). A config
asking for a variant this machine cannot make fails before any variant is made.

Every variant is compared with the fp32 model on the same fixed probe inputs (max |logit diff|,
top-1 agreement); ``quantize.json`` holds these, the sizes and the seconds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from corpus2model.tasks.finetune import task_of
from corpus2model.tasks.model import classify
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, cache_key, link_or_copy

STAGE = "quantize"
VERSION = "2"
SECTIONS = ("quantize",)

CHECK_SEQUENCES = 4  # held-out-free probe inputs for the logit comparisons
CHECK_LEN = 32
# Bump one variant's version when its output for the same input changes: only its unit recomputes.
VARIANT_VERSION = {"dynamic_int8": "1", "onnx_fp32": "1", "onnx_int8_dynamic": "1", "onnx_int8_static": "1",
                   "fp16": "1", "bf16": "1", "bnb_8bit": "1", "bnb_4bit": "1"}
ONNX_VARIANTS = ("onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static")


def probe_inputs(vocab_size: int, n: int = CHECK_SEQUENCES, length: int = CHECK_LEN, seed: int = 0):
    """Fixed token sequences for comparing variants (data-independent, so the check is reproducible)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


def logits(model, ids):
    import torch

    dev = getattr(model, "device", "cpu")
    with torch.inference_mode():
        return model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu()


def quantize_folder(src: Path, dst: Path, skip_modules: tuple[str, ...] | list[str] = ()) -> dict:
    """Dynamic INT8 of the model in ``src`` into ``dst``; returns what the stage reports about it."""
    from corpus2model.tasks.model.modeling import folder_size_bytes, linear_names, load_causal_lm, quantize_dynamic_int8, save_dynamic_int8

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
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) + \
        sum(p.stat().st_size for p in Path(folder).glob("*.onnx"))


def variant_options(method: str, qc) -> dict:
    """The config a variant's output depends on (its unit key), and nothing else."""
    onnx = {"opset": qc.onnx_opset, "tolerance": qc.onnx_tolerance}
    return {
        "dynamic_int8": {"skip_modules": list(qc.skip_modules)},
        "onnx_fp32": onnx,
        "onnx_int8_dynamic": onnx,
        "onnx_int8_static": {**onnx, "samples": qc.calibration_samples, "seed": qc.calibration_seed,
                             "length": qc.calibration_len},
        "fp16": {}, "bf16": {}, "bnb_8bit": {}, "bnb_4bit": {},
    }[method]


def variant_key(method: str, qc, finetune_key: str, tokenize_key: str | None) -> str:
    upstream = [f"finetune:{finetune_key}"] + ([f"tokenize:{tokenize_key}"] if method == "onnx_int8_static" else [])
    return cache_key(f"{STAGE}-{method}", VARIANT_VERSION[method], variant_options(method, qc), upstream)


def plan_detail(qc, store, finetune_key: str, tokenize_key: str | None) -> str:
    """What ``c2m status`` says about a quantize stage that will run: which variants are new."""
    todo = [m for m in qc.methods
            if store.unit_lookup(f"{STAGE}-variant", variant_key(m, qc, finetune_key, tokenize_key)) is None]
    if not qc.methods:
        return "no variants"
    return f"{len(todo)} of {len(qc.methods)} variants to make" + (f": {', '.join(todo)}" if todo else "")


class _Maker:
    """Makes (or finds) one variant unit; knows the merged model, its probe logits and the calibration source."""

    def __init__(self, ft: Manifest, tok: Manifest | None, merged: Path, qc, ctx: StageContext):
        self.ft, self.tok, self.merged, self.qc, self.ctx = ft, tok, merged, qc, ctx
        # The unit keys name the tokenize output the model was trained on (what the finetune manifest
        # records), as they did before tokenize was a declared input: existing units stay valid.
        self.tokenize_key = ft.upstream.get("tokenize")
        self._ref = None
        self.computed: list[str] = []

    def reference(self):
        """(probe ids, fp32 PyTorch logits) of the merged model."""
        if self._ref is None:
            from corpus2model.tasks.model.modeling import load_causal_lm

            model, _ = load_causal_lm(self.merged)
            ids = probe_inputs(model.config.vocab_size, length=min(CHECK_LEN, model.config.max_position_embeddings))
            self._ref = (ids, logits(model, ids))
        return self._ref

    def unit(self, method: str) -> dict:
        store = self.ctx.store
        key = variant_key(method, self.qc, self.ft.key, self.tokenize_key)
        hit = store.unit_lookup(f"{STAGE}-variant", key)
        if hit is not None:
            return hit
        deps = {"onnx_fp32": self.unit("onnx_fp32")} if method in ("onnx_int8_dynamic", "onnx_int8_static") else {}

        def write(tmp: Path) -> dict:
            t0 = time.perf_counter()
            info = self.make(method, tmp / "model", deps)
            info.update(variant=method, seconds=round(time.perf_counter() - t0, 3),
                        options=variant_options(method, self.qc))
            from corpus2model.tasks.model.export import write_variant_info

            write_variant_info(tmp / "model", {k: info[k] for k in ("variant", "kind", "dtype") if k in info})
            files = [FileEntry(p.relative_to(tmp).as_posix(), role="model")
                     for p in sorted((tmp / "model").rglob("*")) if p.is_file()]
            return {**info, "files": files}

        self.ctx.info("quantize: making %s", method)
        info = store.unit_write(f"{STAGE}-variant", key, write)
        self.computed.append(method)
        return info

    def make(self, method: str, dst: Path, deps: dict) -> dict:
        from corpus2model.tasks.model import export

        ids, ref = self.reference()
        if method == "dynamic_int8":
            info = quantize_folder(self.merged, dst, self.qc.skip_modules)
            return {"kind": "hf", "dtype": "int8", **{k: info[k] for k in ("modules", "max_abs_logit_diff",
                                                                          "top1_agreement", "reload_exact")}}
        if method == "onnx_fp32":
            from corpus2model.tasks.model.modeling import load_causal_lm

            model, _ = load_causal_lm(self.merged)
            export.export_onnx(model, dst / export.ONNX_FILE, self.qc.onnx_opset)
            export.copy_side_files(self.merged, dst)
            # Probes are longer than the export example, so this also proves the seq axis is dynamic.
            check = export.onnx_check(dst / export.ONNX_FILE, ref, ids.numpy(), self.qc.onnx_tolerance)
            return {"kind": "onnx", "dtype": "float32", **check}
        if method in ("onnx_int8_dynamic", "onnx_int8_static"):
            src = Path(deps["onnx_fp32"]["dir"]) / "model" / export.ONNX_FILE
            dst.mkdir(parents=True, exist_ok=True)
            extra = {}
            if method == "onnx_int8_dynamic":
                export.quantize_onnx_dynamic(src, dst / export.ONNX_FILE)
            else:
                seqs = export.calibration_sequences(self._train_blocks(), self.qc.calibration_samples,
                                                    self.qc.calibration_len, self.qc.calibration_seed)
                export.quantize_onnx_static(src, dst / export.ONNX_FILE, seqs)
                extra = {"calibration_sequences": len(seqs), "calibration_tokens": int(sum(s.size for s in seqs))}
            export.copy_side_files(self.merged, dst)
            check = export.onnx_check(dst / export.ONNX_FILE, ref, ids.numpy())  # recorded, not a pass/fail
            return {"kind": "onnx", "dtype": "int8", **check, **extra}
        if method in ("fp16", "bf16"):
            dtype = {"fp16": "float16", "bf16": "bfloat16"}[method]
            export.cast_folder(self.merged, dst, dtype)
            model, _ = export.load_variant(dst_with_info(dst, method, dtype))
            return {"kind": "hf", "dtype": dtype, **export.compare_logits(ref, logits(model, ids))}
        if method in ("bnb_8bit", "bnb_4bit"):
            bits = 8 if method == "bnb_8bit" else 4
            export.bnb_folder(self.merged, dst, bits)
            model, _ = export.load_variant(dst_with_info(dst, method, f"bnb{bits}", kind="bnb"))
            return {"kind": "bnb", "dtype": f"bnb{bits}", **export.compare_logits(ref, logits(model, ids))}
        raise StageError(f"quantize.methods: {method!r} has no implementation")

    def _train_blocks(self) -> Path:
        """The packed train blocks of the tokenize input (calibration data); run() checked it is the
        tokenize output this model was trained on."""
        if self.tok is None:
            raise StageError("quantize: static INT8 (onnx_int8_static) calibrates on the tokenize stage's packed "
                             "train blocks, and no tokenize manifest was passed in; pass the inputs the stage table "
                             "declares (flows/stages.py: finetune, tokenize)")
        path = self.tok.dir / "packed" / "train.parquet"
        if not path.is_file():
            raise StageError(f"{path} is missing: static INT8 calibrates on the packed train blocks")
        return path


def dst_with_info(dst: Path, method: str, dtype: str, kind: str = "hf") -> Path:
    """Write the variant description early, so load_variant can read the folder for the check."""
    from corpus2model.tasks.model.export import write_variant_info

    write_variant_info(dst, {"variant": method, "kind": kind, "dtype": dtype})
    return dst


def split_inputs(inputs: list[Manifest]) -> tuple[Manifest, Manifest | None]:
    """(finetune, tokenize or None) from the stage's inputs, by stage name. The tokenize manifest is
    optional (only static INT8 reads it) but, when given, must be the one finetune trained on: the key
    holds only finetune's key, which chains that tokenize output and no other."""
    by_stage = {m.stage: m for m in inputs}
    if len(by_stage) != len(inputs) or "finetune" not in by_stage or set(by_stage) - {"finetune", "tokenize"}:
        raise StageError(f"quantize takes the finetune output and, optionally, the tokenize output it was trained "
                         f"on; got {[m.stage for m in inputs]}")
    ft, tok = by_stage["finetune"], by_stage.get("tokenize")
    if tok is not None and ft.upstream.get("tokenize") != tok.key:
        raise StageError(f"quantize: the tokenize input {tok.key} is not the one {ft.path} was trained on "
                         f"({ft.upstream.get('tokenize') or 'its manifest names none'}); calibrating on other blocks "
                         f"would hide under the same key")
    return ft, tok


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    ft, tok = split_inputs(inputs)
    if task_of(ft) in ("classification", "reward"):  # encoders (a reward model has one output): classify.py
        return classify.quantize_run([ft], cfg, out_dir, ctx)
    from corpus2model.tasks.common.artifacts import publish_markdown
    from corpus2model.tasks.model.export import ExportError, check_supported

    qc = cfg.quantize
    if not qc.methods:  # e.g. an unmergeable fine-tuning method: nothing to quantize, an empty table
        (out_dir / "quantize.json").write_text(json.dumps({"methods": []}), encoding="utf-8")
        return Manifest(stage=STAGE, files=[FileEntry("quantize.json", role="report")], counters={},
                        stats={"methods": []})
    if ft.stats.get("merged_dir", "merged") is None:
        raise StageError(f"{ft.path}: finetune.method {ft.stats.get('method')!r} leaves no merged model, and every "
                         f"quantize variant starts from one: set quantize.methods: [] (and registry.serve_variant: "
                         f"tuned), or fine-tune with a mergeable method (full, lora, qlora, ia3)")
    merged = ft.dir / ft.stats.get("merged_dir", "merged")
    if not (merged / "config.json").is_file():
        raise StageError(f"{merged} holds no saved model: quantize reads the finetune stage's merged/ folder")
    try:
        check_supported(list(qc.methods), qc.device)  # before any variant is made
    except ExportError as e:
        raise StageError(str(e)) from None

    maker = _Maker(ft, tok, merged, qc, ctx)
    files: list[FileEntry] = []
    stats: dict = {"methods": list(qc.methods)}
    fp32_bytes = _weights_bytes(merged)
    for method in qc.methods:
        try:
            info = maker.unit(method)
        except ExportError as e:
            raise StageError(f"quantize {method}: {e}") from None
        for e in info["files"]:
            rel = method + "/" + e["path"].split("/", 1)[1]  # model/<file> -> <method>/<file>
            link_or_copy(Path(info["dir"]) / e["path"], out_dir / rel)
            files.append(FileEntry(rel, bytes=e["bytes"], sha256=e["sha256"], role="model"))
        size = _weights_bytes(out_dir / method)
        row = {k: v for k, v in info.items() if k not in ("files", "dir", "key")}
        row.update(weights_bytes=size, size_ratio=round(size / fp32_bytes, 4))
        if method == "dynamic_int8":  # the names the summary and older readers use
            row.update(fp32_bytes=fp32_bytes, int8_bytes=size)
        ctx.info("quantize %s: %s", method, row)
        stats[method] = row
    # Units are the variants listed plus any made only as an input of another (onnx_fp32 under the ONNX
    # INT8 variants), so the summary never says "3/2 units computed".
    units = sorted(set(qc.methods) | set(maker.computed))
    stats.update(fp32_bytes=fp32_bytes, units=len(units), units_computed=len(maker.computed),
                 units_reused=len(units) - len(maker.computed), computed_files=maker.computed)
    # The headline numbers of the first variant at the top level, for summaries and the registry.
    first = stats[qc.methods[0]]
    stats.update(size_ratio=first["size_ratio"], max_abs_logit_diff=first["max_abs_logit_diff"])
    if "int8_bytes" in first:
        stats["int8_bytes"] = first["int8_bytes"]
    stats["_hashed"] = {f.path: f.sha256 for f in files}  # linked files keep their unit sha256
    (out_dir / "quantize.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "_hashed"}, indent=1),
                                           encoding="utf-8")
    files.append(FileEntry("quantize.json", role="report"))
    publish_markdown("quantize-summary", quantize_markdown(stats, qc.methods), "size and logit drift per variant")
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)


def quantize_markdown(stats: dict, methods) -> str:
    rows = "\n".join(
        f"| {m} | {stats[m].get('kind')} | {stats[m].get('dtype')} | {stats[m]['weights_bytes']:,} | "
        f"{stats[m]['size_ratio']} | {stats[m]['max_abs_logit_diff']} | {stats[m]['top1_agreement']} | "
        f"{'reused' if m not in stats['computed_files'] else 'made'} |" for m in methods)
    return ("# Quantization and export\n\n| variant | format | dtype | weight bytes | size vs fp32 | "
            "max abs logit diff | top-1 agreement | this run |\n|---|---|---|---|---|---|---|---|\n" + rows + "\n")
