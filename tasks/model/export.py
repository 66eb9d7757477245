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

Encoders (``model.task: classification``, tasks/model/classify.py) have their own ONNX path:
``export_classifier_onnx`` writes the sequence classifier with the tokenizer's inputs (input_ids,
attention_mask, token_type_ids) and ``logits`` out, exported with eager attention by the TorchScript
exporter, the graph ONNX Runtime's transformer optimizer recognises: ``optimize_encoder_onnx`` then
fuses each layer's attention, the embedding LayerNorm, bias+GELU and the residual LayerNorms, and
``quantize_onnx_dynamic`` makes INT8 of the fused graph (QAttention, MatMulInteger). ``OnnxClassifier``
answers ``model(**encoded).logits`` like the PyTorch classifier.

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
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort():
        # Fused contrib ops (Attention, SkipLayerNormalization) have no ONNX shape inference: their outputs
        # are float32, which the quantizer must be told instead of failing on them.
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


# ---------------------------------------------------------------------------------------------
# ONNX for encoders (sequence classifiers)
# ---------------------------------------------------------------------------------------------
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_classifier_onnx(src: Path, path: Path, opset: int = 17) -> dict:
    """The sequence classifier saved in ``src`` as one ONNX file: the tokenizer's inputs in (batch and
    sequence axes dynamic), ``logits`` out. Returns {"inputs", "num_heads", "hidden_size", "model_type"}.

    Eager attention and the TorchScript exporter on purpose: the SDPA graph that transformers exports
    by default (and the dynamo exporter's graph) is not matched by ONNX Runtime's attention fusion, and
    unfused attention costs the INT8 model its speed."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    src, path = Path(src), Path(path)
    config = AutoConfig.from_pretrained(str(src))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(src), use_safetensors=True, trust_remote_code=False, dtype=torch.float32,
        attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    names = [n for n in ENCODER_INPUTS if n in tokenizer.model_input_names]
    example = tokenizer(["a short probe sentence", "and another, longer probe sentence for the export"],
                        padding=True, return_tensors="pt")

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            return self.m(**dict(zip(names, args))).logits

    path.parent.mkdir(parents=True, exist_ok=True)
    prev = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Logits(model), tuple(example[n] for n in names), str(path), dynamo=False,
                              opset_version=opset, input_names=names, output_names=["logits"],
                              dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})
    except Exception as e:
        raise ExportError(f"ONNX export of the classifier in {src} to {path} failed: {type(e).__name__}: {e}. "
                          f"Try another quantize.onnx_opset (17 is what ONNX Runtime's optimizer expects) or "
                          f"drop the onnx_* variants") from e
    finally:
        logging.getLogger("torch.onnx").setLevel(prev)
    return {"inputs": names, "num_heads": int(getattr(config, "num_attention_heads", 0) or 0),
            "hidden_size": int(getattr(config, "hidden_size", 0) or 0), "model_type": config.model_type}


def optimize_encoder_onnx(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict:
    """ONNX Runtime's transformer optimizer for BERT-style encoders (offline, CPU): fused attention,
    embedding LayerNorm, bias+GELU, skip LayerNorm. Returns how many of each fused op it made; an encoder
    it does not recognise keeps its plain ops (still correct, only slower)."""
    from onnxruntime.transformers import optimizer

    with _quiet_ort():
        opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=1, use_gpu=False)
        opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


class OnnxClassifier:
    """An ONNX sequence classifier behind the slice of the HF interface classify.py uses:
    ``model(**tokenizer_output).logits`` (a torch tensor), ``config.id2label``, ``eval()``."""

    def __init__(self, folder: Path, threads: int = 0):
        from transformers import AutoConfig

        folder = Path(folder)
        self.path = folder / ONNX_FILE
        self.session = ort_session(self.path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(str(folder))  # id2label with int keys, like the torch model
        self.device = "cpu"

    def eval(self):
        return self

    def __call__(self, **enc):
        import numpy as np
        import torch

        feed = {}
        for name in self.inputs:
            if name not in enc:
                raise ExportError(f"{self.path} needs input {name!r}; the tokenizer gave {sorted(enc)}")
            v = enc[name]
            feed[name] = np.asarray(v.cpu().numpy() if hasattr(v, "numpy") else v, dtype=np.int64)
        logits = self.session.run(["logits"], feed)[0]
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)))

    def parameters(self):
        return iter(())

    def num_parameters(self) -> int:
        return onnx_param_count(self.path)


def calibration_sequences(packed_train: Path, n: int, length: int, seed: int = 0, pad_id: int = 0) -> list:
    """``n`` token sequences (numpy int64, shape (1, <=length)) drawn without replacement from the packed
    train blocks with a seeded generator: the same data and settings give the same calibration set.
    Each is a block's first ``length`` tokens with trailing padding removed."""
    import numpy as np

    from corpus2model.tasks.common.parquet import open_parquet

    pf = open_parquet(packed_train)
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
    if kind == "onnx" and info.get("task") == "classification":  # an encoder's: classify.load_classifier's too
        from transformers import AutoTokenizer

        return OnnxClassifier(folder, threads), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if kind == "onnx":
        return OnnxCausalLM(folder, threads), load_tokenizer(folder)
    if kind == "hf" and info.get("dtype") not in ("float16", "bfloat16"):
        return load_causal_lm(folder)  # fp32, and dynamic INT8 (its quant_config.json)
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": {"": 0}} if kind == "bnb" else {"dtype": getattr(torch, info["dtype"])}
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **kwargs)
    return model.eval(), load_tokenizer(folder)
