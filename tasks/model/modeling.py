"""Model helpers shared by finetune, quantize, evaluate, registry and serve.

One place knows how a model is built, saved, loaded and asked for text, so every variant
(base, tuned, dynamic INT8) goes through the same code and the evaluation table compares like
with like. Files are safetensors only: nothing here pickles or unpickles.

Dynamic INT8 folders (written by ``save_dynamic_int8``) hold the float model's ``config.json``,
the tokenizer, ``quant_config.json`` and one ``model.safetensors`` with, per quantized Linear
``<name>``: ``<name>.qweight`` (int8, [out, in]), ``<name>.scales`` (float64, [out]),
``<name>.zero_points`` (int64, [out]) and ``<name>.bias`` (fp32, when the layer has one); plus every
other tensor of the model (embeddings, norms) in fp32 under its usual state_dict name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

QUANT_CONFIG = "quant_config.json"
INT8_WEIGHTS = "model.safetensors"


def _offline() -> None:
    # No hub here (ENVIRONMENT.md): a missing local file must fail fast, not hang on a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Stage logs are read in the Prefect UI and in CI: no tqdm bars for loading/saving small files.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_model(model_cfg, tokenizer, seq_len: int):
    """A causal LM for ``tokenizer``: random init from ``model_cfg`` (seeded), or ``model_cfg.pretrained``."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_cfg.pretrained:
        from corpus2model.tasks.common.security import load_kwargs

        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained, dtype=torch.float32,
            **load_kwargs(model_cfg.pretrained, getattr(model_cfg, "allow_pickle", False),
                          getattr(model_cfg, "trust_remote_code", False)),
        )
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    if model_cfg.arch != "llama":
        raise ValueError(f"model.arch {model_cfg.arch!r} is not supported; use 'llama'")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size,
        max_position_embeddings=max(int(seq_len), 16),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    # The init draws from torch's global generator: seeding it makes the base model a pure
    # function of (config, seed), which the cache key already covers.
    torch.manual_seed(model_cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_model(model, tokenizer, folder: Path) -> None:
    """save_pretrained with safetensors, plus the tokenizer, so the folder loads on its own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_tokenizer(folder: Path):
    _offline()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_causal_lm(folder: Path):
    """(model, tokenizer) from a saved HF folder or a dynamic INT8 folder; the model in eval mode."""
    _offline()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a saved model folder")
    tokenizer = load_tokenizer(folder)
    if (folder / QUANT_CONFIG).is_file():
        model = load_dynamic_int8(folder)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# dynamic INT8 (torch.ao eager mode), stored without pickle
# ---------------------------------------------------------------------------------------------
def linear_names(model, skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names of the nn.Linear modules to quantize; ``skip`` names (or name suffixes) stay float."""
    import torch

    def skipped(name: str) -> bool:
        return any(name == s or name.endswith("." + s) for s in skip)

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not skipped(n)]


def quantize_dynamic_int8(model, modules: list[str] | set[str] | None = None):
    """Per-channel symmetric int8 weights on the named nn.Linear modules (all of them when
    ``modules`` is None); activations are quantized at run time."""
    import warnings

    import torch

    names = linear_names(model) if modules is None else list(modules)
    with warnings.catch_warnings():
        # torch.ao announces its move to torchao; the eager API still works on this torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {name: per_channel_dynamic_qconfig for name in names}
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8)


def _quantized_linears(model) -> dict:
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynLinear)}


def dynamic_int8_tensors(qmodel) -> tuple[dict, list[str]]:
    """The exact tensors of a dynamically quantized model, as plain (non-quantized) tensors."""
    import torch

    tensors, modules = {}, []
    for name, mod in _quantized_linears(qmodel).items():
        w = mod.weight()
        if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or w.q_per_channel_axis() != 0:
            raise ValueError(f"{name}: expected per-channel (axis 0) int8 weights, got {w.qscheme()}")
        tensors[f"{name}.qweight"] = w.int_repr().contiguous()
        tensors[f"{name}.scales"] = w.q_per_channel_scales().contiguous()
        tensors[f"{name}.zero_points"] = w.q_per_channel_zero_points().contiguous()
        b = mod.bias()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
        modules.append(name)
    for key, value in qmodel.state_dict().items():
        # Quantized modules contribute (scale, zero_point, packed params) entries: already stored above.
        if any(key.startswith(m + ".") for m in modules) or not isinstance(value, torch.Tensor):
            continue
        tensors[key] = value.detach().contiguous()
    return tensors, modules


def save_dynamic_int8(qmodel, tokenizer, folder: Path, float_config) -> dict:
    """Write an INT8 folder that ``load_causal_lm`` rebuilds exactly; returns quant_config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, modules = dynamic_int8_tensors(qmodel)
    # One metadata key only: safetensors writes __metadata__ from a hash map, so two keys come out
    # in a different order in each process and the same weights would hash differently.
    save_file(tensors, str(folder / INT8_WEIGHTS), metadata={"format": "pt"})
    float_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    qcfg = {"method": "dynamic_int8", "scheme": "per_channel_symmetric", "dtype": "qint8", "axis": 0,
            "weights": INT8_WEIGHTS, "modules": modules}
    (folder / QUANT_CONFIG).write_text(json.dumps(qcfg, indent=1), encoding="utf-8")
    return qcfg


def load_dynamic_int8(folder: Path, model_class=None, prepare=None, ignore_missing: tuple[str, ...] = ()):
    """Rebuild the float model from config, quantize it the same way, then load the stored int8 weights.

    ``model_class`` defaults to AutoModelForCausalLM (tasks/model/classify.py passes the sequence-classification
    class); ``prepare(tensors, qcfg)`` may rewrite the stored tensors first (the classifier's int8
    embedding table); missing keys ending in ``ignore_missing`` are buffers the config rebuilds."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    qcfg = json.loads((folder / QUANT_CONFIG).read_text(encoding="utf-8"))
    if qcfg.get("method") != "dynamic_int8":
        raise ValueError(f"{folder / QUANT_CONFIG}: unknown method {qcfg.get('method')!r}")
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    model = (model_class or AutoModelForCausalLM).from_config(config, trust_remote_code=False, dtype=torch.float32)
    tensors = load_file(str(folder / qcfg.get("weights", INT8_WEIGHTS)))
    if prepare is not None:
        prepare(tensors, qcfg)
    modules = set(qcfg["modules"])
    quantized = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] in modules}
    floats = {k: v for k, v in tensors.items() if k not in quantized}
    # The float tensors go in before quantizing (a quantized Linear's state_dict wants packed params);
    # the Linear weights they leave missing are replaced by the stored int8 ones below.
    missing, unexpected = model.load_state_dict(floats, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in modules and not k.endswith(ignore_missing)]
    if missing or unexpected:
        raise ValueError(f"{folder / INT8_WEIGHTS}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    qmodel = quantize_dynamic_int8(model, modules)
    linears = _quantized_linears(qmodel)
    if set(linears) != modules:
        raise ValueError(f"{folder}: quantized modules differ from {QUANT_CONFIG} (config and weights disagree)")
    for name, mod in linears.items():
        qweight = torch._make_per_channel_quantized_tensor(
            quantized[f"{name}.qweight"], quantized[f"{name}.scales"], quantized[f"{name}.zero_points"], 0
        )
        mod.set_weight_bias(qweight, quantized.get(f"{name}.bias"))
    return qmodel.eval()


# ---------------------------------------------------------------------------------------------
# inference helpers
# ---------------------------------------------------------------------------------------------
def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0) -> list[str]:
    """New text for each prompt (greedy when temperature == 0), cut at the first eos.

    Prompts are run one at a time: no padding, so the answer for a prompt never depends on what
    else was in the batch (and exact-match scores are reproducible).
    """
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = getattr(model.config, "max_position_embeddings", None)
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        budget = max_new_tokens
        if limit:
            # Keep the end of an over-long prompt; positions beyond the trained range are undefined.
            ids = ids[:, -max(1, limit - max_new_tokens):]
            budget = min(max_new_tokens, limit - ids.shape[1])
        if budget <= 0 or ids.shape[1] == 0:
            outs.append("")
            continue
        kwargs = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": float(temperature)}
        with torch.inference_mode():
            seq = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                eos_token_id=eos, pad_token_id=pad, **kwargs,
            )
        new = seq[0, ids.shape[1]:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        outs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outs


def count_params(model) -> int:
    """Parameters of a float model, or weights of a dynamically quantized one (int8 + float)."""
    n = sum(p.numel() for p in model.parameters())
    for mod in _quantized_linears(model).values():
        n += mod.weight().numel()
        b = mod.bias()
        n += 0 if b is None else b.numel()
    return n


def folder_size_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
