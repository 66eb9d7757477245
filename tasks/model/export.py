"""export: the merged model as ONNX (checked in ONNX Runtime), ORT dynamic and static INT8, fp16/bf16
casts and bitsandbytes 8/4-bit, each written to its own folder, plus one loader for all of them.

tasks/quantize.py decides which variants to make and caches each one; this module holds the work:

* ``export_onnx``: ``torch.onnx.export(dynamo=True)`` of a logits-only wrapper (no KV cache: the
  graph takes ``input_ids`` and returns ``logits``), batch and sequence axes dynamic. The legacy
  TorchScript exporter cannot export this transformers' Llama (``aten::diff`` in the mask code).
  ``onnx_check`` then runs the file in an ORT ``InferenceSession`` on probe inputs of a length
  other than the export example's and compares with PyTorch's logits (max |diff|, top-1 agreement).
* ``quantize_onnx_dynamic``: ORT dynamic INT8, per-channel int8 weights, activations quantized at
  run time.
* ``quantize_onnx_static``: ORT static INT8 (QOperator), MatMul/Gemm only, uint8 activations with
  ranges calibrated (MinMax) on packed train blocks, per-channel int8 weights. These op types and
  QUInt8 are what worked on a 49M Llama on CPU (95 % top-1 agreement with fp32, 1.8x faster).
* ``cast_folder``: fp16/bf16 safetensors of the same model.
* ``bnb_folder``: bitsandbytes 8-bit or 4-bit (NF4) on a CUDA device, saved with its quantization config.

``load_variant(folder)`` returns ``(model, tokenizer)`` for any of these folders (and for plain HF
and dynamic-INT8 folders, through ``corpus2model.tasks.model.modeling.load_causal_lm``). An ONNX variant comes back as
``OnnxCausalLM``, which answers ``model(input_ids=..., use_cache=False).logits`` and a greedy
``generate`` (full-sequence recompute per new token: the graph has no KV cache), so every metric of
the evaluation table is computed for it the same way as for a PyTorch model.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

VARIANT_FILE = "variant.json"  # {"variant", "kind": "onnx" | "hf" | "bnb", "dtype", ...}
ONNX_FILE = "model.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CALIB_MAX_INTERMEDIATE = 32  # ORT calibration merges its collected outputs every N samples (bounded memory)


class ExportError(RuntimeError):
    """An export or check failed; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def write_variant_info(folder: Path, info: dict) -> None:
    (Path(folder) / VARIANT_FILE).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")


def read_variant_info(folder: Path) -> dict:
    p = Path(folder) / VARIANT_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {"kind": "hf"}


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json and the tokenizer beside a non-HF model file (ONNX), so the folder stands alone."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
def _logits_only(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_onnx(model, path: Path, opset: int = 18, example_len: int = 16) -> None:
    """Write ``model`` (a float HF causal LM) to ``path`` as one ONNX file with dynamic batch/seq axes."""
    import logging

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = getattr(model.config, "max_position_embeddings", None) or example_len
    example = torch.zeros((2, min(example_len, limit)), dtype=torch.long)
    prev = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                _logits_only(model), (example,), dynamo=True, opset_version=opset, verbose=False,
                input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}},
            )
            # One file, weights inline (fine below protobuf's 2 GB; larger models need external data).
            prog.save(str(path), external_data=False)
        _strip_debug_info(path)
    except Exception as e:  # the exporter raises many types; the message must name the model and the fix
        raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {type(e).__name__}: {e}. "
                          f"Try another quantize.onnx_opset or drop the onnx_* variants") from e
    finally:
        logging.getLogger("torch.onnx").setLevel(prev)


def _strip_debug_info(path: Path) -> None:
    """The dynamo exporter tags every node with its Python stack trace and module path: 40 % of a tiny
    model's file. Nothing at run time reads them."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(session, ids):
    """Logits (numpy float32) for an int token array of shape (batch, seq)."""
    import numpy as np

    return session.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0].astype(np.float32)


def compare_logits(ref, got) -> dict:
    """Max |logit diff| and the share of positions whose argmax agrees (numpy or torch inputs)."""
    import numpy as np

    ref, got = np.asarray(ref, dtype=np.float32), np.asarray(got, dtype=np.float32)
    if ref.shape != got.shape:
        raise ExportError(f"logit shapes differ: reference {ref.shape}, variant {got.shape}")
    return {"max_abs_logit_diff": round(float(np.abs(ref - got).max()), 6),
            "top1_agreement": round(float((ref.argmax(-1) == got.argmax(-1)).mean()), 4)}


def onnx_check(path: Path, ref_logits, ids, tolerance: float | None = None) -> dict:
    """Run ``path`` in ONNX Runtime on ``ids`` and compare with PyTorch's ``ref_logits``; raise if the max
    |diff| exceeds ``tolerance`` (an export must be exact up to float rounding; a quantized file is not)."""
    out = compare_logits(ref_logits, ort_logits(ort_session(path), ids))
    if tolerance is not None and out["max_abs_logit_diff"] > tolerance:
        raise ExportError(f"{path}: ONNX Runtime logits differ from PyTorch by {out['max_abs_logit_diff']:.3g} "
                          f"(> quantize.onnx_tolerance {tolerance:g}; top-1 agreement {out['top1_agreement']}): "
                          f"the export is wrong for this model/opset")
    return out


def quantize_onnx_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def calibration_sequences(packed_train: Path, n: int, length: int, seed: int = 0, pad_id: int = 0) -> list:
    """``n`` token sequences (numpy int64, shape (1, <=length)) drawn without replacement from the packed
    train blocks with a seeded generator: the same data and settings give the same calibration set.
    Each is a block's first ``length`` tokens with trailing padding removed."""
    import numpy as np
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(packed_train)
    total = pf.metadata.num_rows
    if total == 0:
        raise ExportError(f"{packed_train}: no packed train blocks to calibrate static INT8 on")
    rows = sorted(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False).tolist())
    col = pf.read(columns=["input_ids"]).column("input_ids")
    out = []
    for r in rows:
        ids = col[r].as_py()[:length]
        while len(ids) > 1 and ids[-1] == pad_id:
            ids.pop()
        out.append(np.asarray([ids], dtype=np.int64))
    return out


def quantize_onnx_static(src: Path, dst: Path, sequences: list) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(sequences)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input_ids": x}

    if not sequences:
        raise ExportError(f"{src}: no calibration sequences for static INT8")
    with _quiet_ort():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options=calibration_merge_option(len(sequences)))


def calibration_merge_option(n: int, every: int = CALIB_MAX_INTERMEDIATE) -> dict:
    """ORT's MinMax calibrator keeps every sample's outputs (the logits too) until it merges them every
    ``every`` samples; it then fails with "No data is collected" when ``n`` is a multiple of ``every``
    (onnxruntime 1.2x: the list is empty after the last merge), so the interval is nudged off divisors."""
    if n <= every:
        return {}
    while n % every == 0:
        every += 1
    return {"CalibMaxIntermediateOutputs": every}


class _quiet_ort:
    """ORT's quantizer logs a pre-processing hint through the root logger on every call."""

    def __enter__(self):
        import logging

        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        import logging

        logging.getLogger().setLevel(self.level)


class OnnxCausalLM:
    """An ONNX causal LM behind the small slice of the HF model interface the evaluation uses."""

    def __init__(self, folder: Path, threads: int = 0):
        folder = Path(folder)
        self.path = folder / ONNX_FILE
        self.session = ort_session(self.path, threads)
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.config = SimpleNamespace(**cfg)
        self.device = "cpu"

    def eval(self):
        return self

    def __call__(self, input_ids=None, use_cache=False, **_):
        import torch

        ids = input_ids.cpu().numpy() if hasattr(input_ids, "numpy") else input_ids
        return SimpleNamespace(logits=torch.from_numpy(ort_logits(self.session, ids)))

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, do_sample: bool = False, **_):
        """Greedy decoding, recomputing the whole sequence per token (the exported graph has no KV cache)."""
        import torch

        if do_sample:
            raise ExportError("OnnxCausalLM.generate is greedy only (temperature 0)")
        seq = input_ids
        for _ in range(max_new_tokens):
            nxt = self(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt.to(seq.dtype)], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return seq

    def parameters(self):
        return iter(())


def onnx_param_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    n = 0
    for t in model.graph.initializer:
        size = 1
        for d in t.dims:
            size *= d
        n += size if size > 1 else 0  # scalars are scales/zero points, not weights
    return n


# ---------------------------------------------------------------------------------------------
# casts and bitsandbytes
# ---------------------------------------------------------------------------------------------
def cast_folder(src: Path, dst: Path, dtype: str) -> None:
    """The HF model in ``src`` saved with its float weights cast to ``dtype`` ("float16"/"bfloat16")."""
    import torch

    from corpus2model.tasks.model.modeling import load_causal_lm, save_model

    model, tokenizer = load_causal_lm(src)
    save_model(model.to(getattr(torch, dtype)), tokenizer, dst)


def bnb_folder(src: Path, dst: Path, bits: int) -> None:
    """bitsandbytes 8-bit (LLM.int8) or 4-bit NF4 (bf16 compute) on CUDA, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from corpus2model.tasks.model.modeling import load_tokenizer

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=q, device_map={"": 0},
                                                 use_safetensors=True)
    model.save_pretrained(str(dst), safe_serialization=True)
    load_tokenizer(src).save_pretrained(str(dst))


def check_supported(methods: list[str], device: str) -> None:
    """Fail before any work when this machine cannot make a requested variant."""
    import importlib.util

    problems = []
    if any(m.startswith("onnx_") for m in methods):
        for mod in ("onnx", "onnxruntime", "onnxscript"):
            if importlib.util.find_spec(mod) is None:
                problems.append(f"the onnx_* variants need the Python package {mod!r} (pip install '{mod}')")
    if any(m.startswith("bnb_") for m in methods):
        import torch

        if device != "cuda" or not torch.cuda.is_available():
            problems.append("the bnb_* variants need quantize.device: cuda and a visible CUDA GPU "
                            f"(device {device!r}, torch.cuda.is_available() = {torch.cuda.is_available()})")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("the bnb_* variants need the Python package 'bitsandbytes' (pip install bitsandbytes)")
    if problems:
        raise ExportError("quantize.methods " + str(list(methods)) + ": " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# one loader for every variant folder
# ---------------------------------------------------------------------------------------------
def load_variant(folder: Path, threads: int = 0):
    """(model, tokenizer) for any folder quantize writes, the HF folders finetune writes included."""
    from corpus2model.tasks.model.modeling import load_causal_lm, load_tokenizer

    folder = Path(folder)
    info = read_variant_info(folder)
    kind = info.get("kind", "hf")
    if kind == "onnx":
        return OnnxCausalLM(folder, threads), load_tokenizer(folder)
    if kind == "hf" and info.get("dtype") not in ("float16", "bfloat16"):
        return load_causal_lm(folder)  # fp32, and dynamic INT8 (its quant_config.json)
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": 0}} if kind == "bnb" else {"dtype": getattr(torch, info["dtype"])}
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    return model.eval(), load_tokenizer(folder)
