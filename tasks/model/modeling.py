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
import weakref
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
    """A causal LM for ``tokenizer``: random init from ``model_cfg`` (seeded), or ``model_cfg.pretrained``.

    Its attention is ``losses.PACKED_SDPA`` where the architecture allows (sdpa once per document of
    a packed block instead of a dense block-diagonal mask; the same numbers, less work; generation
    unchanged), for this process only: saved folders load with transformers' default."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from corpus2model.tasks.model.losses import use_packed_attention

    if model_cfg.pretrained:
        from corpus2model.tasks.common.security import load_kwargs

        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.pretrained, dtype=torch.float32,
            **load_kwargs(model_cfg.pretrained, getattr(model_cfg, "allow_pickle", False),
                          getattr(model_cfg, "trust_remote_code", False)),
        )
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        use_packed_attention(model)
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
    use_packed_attention(model)
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
def _prompt_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], int]:
    """(prompt token ids, token budget): the end of an over-long prompt is kept, since positions beyond the
    trained range are undefined; a budget of 0 (or no ids) means the answer is empty."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    budget = max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        ids = ids[-max(1, limit - max_new_tokens):]
        budget = min(max_new_tokens, limit - len(ids))
    return ids, (budget if ids else 0)


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0) -> list[str]:
    """New text for each prompt (greedy when temperature == 0), cut at the first eos.

    Prompts are run one at a time through HF ``generate``: no padding, so the answer for a prompt never
    depends on what else was asked (exact-match scores are reproducible). This is the reference the
    batched engine below is tested against.
    """
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outs = []
    for prompt in prompts:
        ids, budget = _prompt_ids(model, tokenizer, prompt, max_new_tokens)
        if budget <= 0:
            outs.append("")
            continue
        ids = torch.tensor([ids])
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


# ---------------------------------------------------------------------------------------------
# batched generation: continuous batching over one KV cache
# ---------------------------------------------------------------------------------------------
# How a batched forward pass gives each request exactly what it would get alone:
# - The batch shares one KV cache, left-padded to its longest row; each row carries its own position
#   ids, and the row-wise attention below reads only that row's real queries and keys (no padded
#   column enters a softmax or a reduction), through the model's own attention function.
# - Dynamic INT8 Linears quantize their input with one scale per call: fed the whole batch, a row's
#   answer would depend on its neighbours' activations (and on padding). In batched passes they run
#   once per row, on that row's real tokens only.
# - The forward inputs are those HF generate (transformers 5.x) gives a prompt alone: ids, position ids,
#   the last position's logits only, no mask.
# - Float Linears run as one matmul over the batch. A batched matmul may round differently from a
#   1-row one (last-bit differences, measured ~1e-7); greedy choices change only on exact near-ties.
KEY_STARTS = "c2m_key_starts"  # forward kwarg: per row, the first position (cache column) that is real
_ROWWISE = "c2m_rowwise_"


def _attention_function(name: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    import sys

    # "eager" is not registered: each HF model module defines its own eager_attention_forward.
    return sys.modules[type(module).__module__].eager_attention_forward


def _register_rowwise(original: str) -> str:
    """An attention implementation that is ``original`` unless the forward passes KEY_STARTS; then it
    attends row by row over each row's real keys. A prefill (as many queries as keys) also drops the
    row's padded queries; their outputs are zeros, which no real position ever reads."""
    import torch
    from transformers import AttentionInterface

    name = _ROWWISE + original

    def attend(module, query, key, value, attention_mask, **kwargs):
        starts = kwargs.pop(KEY_STARTS, None)
        fn = _attention_function(original, module)
        if starts is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        prefill = query.shape[2] == key.shape[2] and query.shape[2] > 1
        pos = kwargs.pop("position_ids", None)
        outs = []
        for i, s in enumerate(starts):
            q0 = s if prefill else 0
            if pos is not None:
                kwargs["position_ids"] = pos[i:i + 1, q0:]
            mask = None if attention_mask is None else attention_mask[i:i + 1, :, q0:, s:]
            out = fn(module, query[i:i + 1, :, q0:], key[i:i + 1, :, s:], value[i:i + 1, :, s:], mask, **kwargs)[0]
            outs.append(torch.nn.functional.pad(out, (0, 0, 0, 0, q0, 0)) if q0 else out)  # [1, q, heads, dim]
        return torch.cat(outs, 0), None

    AttentionInterface.register(name, attend)
    return name


_SMALL_SCALE = 6.1e-5  # fbgemm/ATen ChooseQuantizationParams' smallest activation scale (a float32 constant)
# module -> (its packed weights, its _RowInt8 or None): built and checked once per weights
_EMULATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _RowInt8:
    """A dynamic INT8 Linear (fbgemm, per-channel int8 weights) applied to a batch of decode rows, each row
    quantized alone, in a few batched ops instead of one op call per row: a decode step otherwise makes
    rows x Linears calls (15 per row on the demo model), and the per-call overhead, not arithmetic, was
    most of a batched step.

    Bitwise what ``linear_dynamic`` gives one row: the row's scale and zero point are ATen's
    ChooseQuantizationParams in float64 (min/max widened to 0, float32 scale, nudged zero point); the
    row is quantized as fbgemm's QuantizeAvx2 does for a packed input (x times the float32 reciprocal plus
    the zero point in one fused multiply-add, round half to even, clipped to uint8); the integer GEMM is exact in float32 (every partial sum is an
    integer below 2**24 while in_features <= 514, else float64); the output is fbgemm's requantization
    ``acc * (x_scale * w_scale) + bias``, which its AVX2 kernel fuses into one rounding (float64 then
    float32 here). ``exact()`` checks that on random rows against the real op, and the caller falls back
    to per-row calls where it does not hold (another CPU kernel, another engine)."""

    def __init__(self, mod, reduce_range: bool):
        import torch

        w = mod.weight()  # no reference to mod kept: _EMULATORS holds this weakly keyed by it
        self.qmax = 127 if reduce_range else 255  # ChooseQuantizationParams halves qmax for reduce_range
        k = w.shape[1]
        self.acc_dtype = torch.float32 if k * 255 * 128 < 2 ** 24 else torch.float64
        self.w_t = w.int_repr().to(self.acc_dtype).t().contiguous()  # [in, out]
        self.w_scale = w.q_per_channel_scales().to(torch.float32)
        b = mod.bias()
        self.bias = None if b is None else b.detach().to(torch.float64)

    @staticmethod
    def usable(mod) -> bool:
        import torch

        w = mod.weight()
        return (mod._packed_params.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine
                and w.q_per_channel_axis() == 0 and not w.q_per_channel_zero_points().any())

    def quantize(self, x):
        """(x quantized minus its zero point, as float; the row scales [rows, 1] float32) for x [rows, in];
        None when a row is not finite (the op's own checks then decide)."""
        import numpy as np
        import torch

        mn, mx = torch.aminmax(x, dim=-1)
        lo, hi = np.minimum(mn.numpy(), np.float32(0)), np.maximum(mx.numpy(), np.float32(0))
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            return None
        qmax = self.qmax
        scale = (hi.astype(np.float64) - lo) / qmax
        s32 = scale.astype(np.float32)
        with np.errstate(divide="ignore", over="ignore"):
            scale = np.where((s32 == 0) | np.isinf(np.float32(1) / s32), 0.1, scale)
        small = scale < np.float64(np.float32(_SMALL_SCALE))
        if small.any():  # tiny ranges: ATen raises the scale and stretches min/max (float32 arithmetic)
            thr = np.float32(_SMALL_SCALE)
            amp = thr / scale.astype(np.float32)
            lo, hi = lo.copy(), hi.copy()
            for i in np.flatnonzero(small):
                if lo[i] == 0:
                    hi[i] = thr * np.float32(qmax)
                elif hi[i] == 0:
                    lo[i] = -thr * np.float32(qmax)
                else:
                    lo[i], hi[i] = lo[i] * amp[i], hi[i] * amp[i]
            scale = np.where(small, np.float64(thr), scale)
        lo_s, hi_s = lo / scale, hi / scale
        zp = np.where(0 - np.abs(lo_s) < qmax - np.abs(hi_s), 0 - lo_s, qmax - hi_s)
        zp = np.where(zp < 0, 0.0, np.where(zp > qmax, float(qmax), np.rint(zp))).astype(np.float32)
        s32 = scale.astype(np.float32)
        zp_t = torch.from_numpy(zp)[:, None]
        # fbgemm's fmadd(x, 1/scale, zero point): one rounding to float32 (the float64 product is exact).
        inv = torch.from_numpy((np.float32(1) / s32).astype(np.float64))[:, None]
        xq = torch.round(torch.addcmul(zp_t.double(), x.double(), inv).float()).clamp_(0, 255).sub_(zp_t)
        return xq.to(self.acc_dtype), torch.from_numpy(s32)[:, None]

    def linear(self, xq, x_scale):
        import torch

        acc = (xq @ self.w_t).double()
        mult = (x_scale * self.w_scale).double()
        out = torch.addcmul(self.bias, acc, mult) if self.bias is not None else acc.mul_(mult)
        return out.float()

    def exact(self, mod, in_features: int) -> bool:
        """The emulation equals ``mod`` (the op), row by row, on random rows of several ranges (zero and tiny
        ones too)."""
        import numpy as np
        import torch

        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, in_features, generator=g) * torch.tensor([0.01, 0.1, 1, 3, 10, 50] * 2)[:, None]
        x[1] = x[1].abs()
        x[2] = -x[2].abs()
        x[3] = 0.0
        x[4] *= 1e-6
        x[5] += 2.0
        # Values a hair off a rounding tie once scaled (x / scale + zero point = k + 0.5): where a fused
        # multiply-add and a multiply then add round differently.
        if in_features > 2:
            x[6] = 0.0
            x[6, 0], x[6, 1] = -1.0, 1.0
            step = np.float32(2.0 / self.qmax)
            ties = (np.arange(in_features - 2) % 100 - 50 + 0.5).astype(np.float32) * step * np.float32(1 + 1e-7)
            x[6, 2:] = torch.from_numpy(ties)
        with torch.inference_mode():
            want = torch.cat([mod(x[i:i + 1]) for i in range(x.shape[0])])
            return torch.equal(self.linear(*self.quantize(x)), want)


class _BatchedMode:
    """While entered: row-wise attention on the model, and its dynamic INT8 Linears called once per row
    (on the row's real tokens: ``starts``, set around a padded prefill, says where they begin); in a decode
    step (one token per row) through ``_RowInt8`` where that is exact, quantizing a shared input once."""

    def __init__(self, model):
        import torch

        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.quantized = list(_quantized_linears(model).values())
        self.original = None
        self.starts: list[int] | None = None
        self.last = None  # (input tensor, qmax, _RowInt8.quantize of it): q/k/v and gate/up share one
        self.float32 = torch.float32

    def _decode_call(self, forward, row_fn, emu, x):
        if x.shape[0] <= 1 or x.dim() != 3 or x.shape[1] != 1 or x.dtype != self.float32:
            return self._rowwise_call(forward, row_fn, x)
        # q/k/v (and gate/up) are called on the same input tensor: quantize it once. Inference tensors keep
        # no version counter; the model does not write into a Linear's input between those calls.
        last = self.last
        if last is not None and last[0] is x and last[1] == emu.qmax:
            quantized = last[2]
        else:
            quantized = emu.quantize(x.reshape(x.shape[0], x.shape[2]))
            self.last = (x, emu.qmax, quantized)
        if quantized is None:
            return self._rowwise_call(forward, row_fn, x)
        return emu.linear(*quantized).unsqueeze(1)

    def _rowwise_call(self, forward, row_fn, x):
        import torch

        if x.shape[0] <= 1:
            return forward(x)
        starts = self.starts if x.dim() == 3 and x.shape[1] > 1 else None
        outs = []
        for i in range(x.shape[0]):
            s = starts[i] if starts else 0
            y = row_fn(x[i:i + 1, s:] if s else x[i:i + 1])
            outs.append(torch.nn.functional.pad(y, (0, 0, s, 0)) if s else y)
        return torch.cat(outs, 0)

    @staticmethod
    def _row_op(mod):
        """What ``mod.forward`` computes for float32 input, as a direct call of its quantized op: the
        module's Python costs 6 of its 20 us per call, and a batched step makes one call per row."""
        import functools

        import torch

        forward = type(mod).forward.__get__(mod)
        if mod._packed_params.dtype != torch.qint8:
            return forward
        reduce_range = not (mod.version is None or mod.version < 4)  # as Linear.forward decides
        op = functools.partial(torch.ops.quantized.linear_dynamic.default,
                               W_prepack=mod._packed_params._packed_params, reduce_range=reduce_range)
        return lambda x: op(x) if x.dtype == torch.float32 else forward(x)

    def __enter__(self):
        import functools

        self.original = self.base.config._attn_implementation or "eager"
        if not self.original.startswith(_ROWWISE):
            self.base.set_attn_implementation(_register_rowwise(self.original))
        for mod in self.quantized:
            forward = type(mod).forward.__get__(mod)
            row_fn, emu = self._row_op(mod), self._emulator(mod)
            mod.forward = (functools.partial(self._decode_call, forward, row_fn, emu) if emu
                           else functools.partial(self._rowwise_call, forward, row_fn))
        return self

    @staticmethod
    def _emulator(mod):
        """The module's ``_RowInt8`` when it is bitwise exact on this machine, else None (per-row calls).
        Built and checked once per weights (unpacking them costs ~0.2 ms a module: not at every batch)."""
        packed = mod._packed_params._packed_params
        cached = _EMULATORS.get(mod)
        if cached is not None and cached[0] is packed:
            return cached[1]
        emu = None
        if _RowInt8.usable(mod):
            emu = _RowInt8(mod, reduce_range=not (mod.version is None or mod.version < 4))
            emu = emu if emu.exact(mod, mod.weight().shape[1]) else None
        _EMULATORS[mod] = (packed, emu)
        return emu

    def __exit__(self, *exc):
        self.last = None
        for mod in self.quantized:
            mod.__dict__.pop("forward", None)
        if not self.original.startswith(_ROWWISE):
            self.base.set_attn_implementation(self.original)
        return False


class GenRequest:
    """One prompt's state in the batch: prompt token ids, budget (new tokens), sampling temperature, group,
    ``done`` (whatever the batch's ``finish`` callback needs), and the tokens generated so far."""

    __slots__ = ("ids", "budget", "temperature", "group", "done", "out", "pos", "last")

    def __init__(self, ids: list[int], budget: int, temperature: float = 0.0, group=None, done=None):
        self.ids, self.budget, self.temperature, self.group, self.done = ids, budget, float(temperature), group, done
        self.out: list[int] = []
        self.pos = len(ids)  # position id of the next token fed to the model
        self.last = None  # that token


class DecodeBatch:
    """The running batch. ``join`` prefills new requests (together, padded on the left) and adds them
    (or finishes those done at once); ``step`` runs one decode step for every row and removes the rows
    that finished. Finished requests go to ``finish(request)``. Row-wise attention and per-row INT8
    calls are on while the batch is entered (``with batch:``). Not thread-safe: one thread drives it."""

    def __init__(self, model, tokenizer, finish, context=None):
        import inspect

        import torch

        self.torch = torch
        self.model, self.tokenizer, self.finish = model, tokenizer, finish
        self.context = context or (lambda group: _nullcontext())
        self.mode = _BatchedMode(model)
        base = self.mode.base
        params = inspect.signature(base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        # HF generate asks for the last position's logits only; the lm_head then runs on one row, which
        # rounds differently (and, quantized, is scaled differently) from slicing all rows' logits.
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.config = base.config
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        gen = getattr(model, "generation_config", None)
        self.top_k = getattr(gen, "top_k", None) or 0
        self.top_p = getattr(gen, "top_p", None) or 1.0
        self.rows: list[GenRequest] = []
        self.starts: list[int] = []
        self.cache = None
        self.group = None

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def __len__(self) -> int:
        return len(self.rows)

    def _new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.config)

    def _pick(self, logits, rows: list[GenRequest]) -> list[int]:
        torch = self.torch
        logits = logits.float()
        picks = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.temperature > 0:
                row = logits[i] / r.temperature
                if self.top_k and self.top_k < row.shape[-1]:
                    kth = torch.topk(row, self.top_k).values[-1]
                    row = row.masked_fill(row < kth, float("-inf"))
                probs = torch.softmax(row, -1)
                if self.top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    drop = sp.cumsum(-1) - sp > self.top_p
                    probs = probs.scatter(0, si, sp.masked_fill(drop, 0.0))
                picks[i] = int(torch.multinomial(probs / probs.sum(), 1))
        return picks

    def _advance(self, r: GenRequest, token: int) -> bool:
        """Record ``token`` for ``r``; True when ``r`` is finished."""
        if self.eos is not None and token == self.eos:
            return True
        r.out.append(token)
        r.last = token
        return len(r.out) >= r.budget

    def _forward(self, ids, pos, cache, starts, group):
        torch = self.torch
        kwargs = {KEY_STARTS: starts} if starts is not None else {}
        self.mode.starts = starts
        try:
            with torch.inference_mode(), self.context(group):
                return self.model(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_kw: cache},
                                  **self.extra, **kwargs).logits[:, -1, :]
        finally:
            self.mode.starts = self.mode.last = None

    def join(self, requests) -> None:
        """Prefill ``requests`` (one GenRequest or a list, all of this batch's group) in one forward pass and
        add the ones that go on. One request alone is exactly HF generate's prefill; several are padded
        on the left, each row seeing only its own tokens."""
        torch = self.torch
        requests = [requests] if isinstance(requests, GenRequest) else list(requests)
        live = [r for r in requests if r.budget > 0]
        for r in requests:
            if r.budget <= 0:
                self.finish(r)
        if not live:
            return
        group = live[0].group
        if any(r.group != group for r in live) or (self.rows and group != self.group):
            raise ValueError("a batch runs one group (adapter) at a time")
        length = max(len(r.ids) for r in live)
        starts = [length - len(r.ids) for r in live]
        ids = torch.tensor([[self.pad] * s + r.ids for s, r in zip(starts, live)])
        pos = torch.tensor([[0] * s + list(range(len(r.ids))) for s, r in zip(starts, live)])
        cache = self._new_cache()
        logits = self._forward(ids, pos, cache, starts if len(live) > 1 else None, group)
        keep = []
        for i, (r, token) in enumerate(zip(live, self._pick(logits, live))):
            if self._advance(r, token):
                self.finish(r)
            else:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(live):
            cache, starts = self._select(cache, starts, keep)
            live = [live[i] for i in keep]
        if not self.rows:
            self.rows, self.starts, self.cache, self.group = live, starts, cache, group
            return
        old, new = self.cache.get_seq_length(), cache.get_seq_length()
        pad_old, pad_new = max(0, new - old), max(0, old - new)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = torch.nn.functional.pad(a, (0, 0, pad_old, 0)) if pad_old else a
                b = torch.nn.functional.pad(b, (0, 0, pad_new, 0)) if pad_new else b
                setattr(old_layer, attr, torch.cat([a, b], 0))
        self.starts = [s + pad_old for s in self.starts] + [s + pad_new for s in starts]
        self.rows += live

    def step(self) -> int:
        """One decode step for every row; returns the number of rows it ran."""
        torch = self.torch
        n = len(self.rows)
        if not n:
            return 0
        ids = torch.tensor([[r.last] for r in self.rows])
        pos = torch.tensor([[r.pos] for r in self.rows])
        logits = self._forward(ids, pos, self.cache, list(self.starts), self.group)
        keep = []
        for i, (r, token) in enumerate(zip(self.rows, self._pick(logits, self.rows))):
            r.pos += 1
            if self._advance(r, token):
                self.finish(r)
            else:
                keep.append(i)
        if not keep:
            self.reset()
        elif len(keep) < n:
            self.cache, self.starts = self._select(self.cache, self.starts, keep)
            self.rows = [self.rows[i] for i in keep]
        return n

    def _select(self, cache, starts: list[int], keep: list[int]):
        """The cache rows ``keep``, without the columns that are padding in all of them."""
        idx = self.torch.tensor(keep)
        starts = [starts[i] for i in keep]
        trim = min(starts)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        return cache, [s - trim for s in starts]

    def reset(self) -> list[GenRequest]:
        rows, self.rows, self.starts, self.cache, self.group = self.rows, [], [], None, None
        return rows

    def text(self, r: GenRequest) -> str:
        return self.tokenizer.decode(r.out, skip_special_tokens=True)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int | list[int] = 32,
                     temperature: float | list[float] = 0.0, max_batch_size: int = 8,
                     with_counts: bool = False) -> list[str] | list[tuple[str, int]]:
    """``generate_text`` for many prompts at once: up to ``max_batch_size`` decode together, and free
    places are refilled from the waiting prompts (prefilled together). Greedy answers are those of
    ``generate_text``. ``with_counts``: (answer, new tokens generated) pairs, the exact count (re-tokenizing
    an answer's text does not give it back when its byte pieces merge differently)."""
    n = len(prompts)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
    temps = temperature if isinstance(temperature, list) else [temperature] * n
    texts: dict[int, tuple[str, int]] = {}
    batch = DecodeBatch(model, tokenizer, finish=lambda r: texts.__setitem__(r.done, (batch.text(r), len(r.out))))
    waiting = []
    for i, (p, m, t) in enumerate(zip(prompts, budgets, temps)):
        ids, budget = _prompt_ids(model, tokenizer, p, m)
        waiting.append(GenRequest(ids, budget, t, done=i))
    waiting.reverse()
    with batch:
        while waiting or len(batch):
            free = max_batch_size - len(batch)
            if waiting and free > 0:
                batch.join([waiting.pop() for _ in range(min(free, len(waiting)))])
            batch.step()
    return [texts[i] if with_counts else texts[i][0] for i in range(n)]


class GenerationEngine:
    """Continuous batching for a server: request threads ``submit`` prompts; one worker thread keeps a
    ``DecodeBatch`` going. Requests join between decode steps (up to ``max_batch_size`` rows) and leave
    when they finish; when the batch is empty the worker waits up to ``max_wait_ms`` after the first
    arrival to gather the rest. ``context(group)`` is entered around every forward pass (e.g. to switch a
    PEFT adapter); a batch holds one group, others wait until it drains (first come, first served).
    ``on_step(rows)`` is called after each decode step."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_wait_ms: float = 5.0, context=None,
                 on_step=None):
        import queue
        import threading

        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max(1, int(max_batch_size)), max_wait_ms / 1000.0
        self.on_step = on_step
        self.queue: queue.Queue = queue.Queue()
        self.batch = DecodeBatch(model, tokenizer, self._finish, context)
        self.closed = False
        self.batch.__enter__()
        self.thread = threading.Thread(target=self._loop, name="c2m-generate", daemon=True)
        self.thread.start()

    def submit(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, group=None):
        """A Future of the new text. The worker tokenizes (not the caller, which may be an event loop)."""
        from concurrent.futures import Future

        if self.closed:
            raise RuntimeError("generation engine closed")
        fut: Future = Future()
        self.queue.put((prompt, max_new_tokens, temperature, group, fut))
        return fut

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, group=None) -> str:
        return self.submit(prompt, max_new_tokens, temperature, group).result()

    def close(self) -> None:
        """Stop the worker: requests not finished yet fail with RuntimeError; the model is left as it was."""
        if self.closed:
            return
        self.closed = True
        self.queue.put(None)
        self.thread.join(timeout=30)
        self.batch.__exit__(None, None, None)

    def _finish(self, r: GenRequest) -> None:
        if not r.done.done():
            r.done.set_result(self.batch.text(r))

    def _fail(self, requests, exc) -> None:
        for r in requests:
            if not r.done.done():
                r.done.set_exception(exc)

    def _loop(self) -> None:
        import collections
        import queue
        import time

        pending: collections.deque = collections.deque()
        stopping = False
        batch = self.batch
        while True:
            if not len(batch) and not pending and not stopping:
                job = self.queue.get()
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
                    deadline = time.perf_counter() + self.max_wait
                    while len(pending) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                        try:
                            job = self.queue.get(timeout=left)
                        except queue.Empty:
                            break
                        if job is None:
                            stopping = True
                            break
                        pending.append(job)
            while not stopping:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
            if stopping:
                closed = RuntimeError("generation engine closed")
                for *_, fut in pending:
                    fut.set_exception(closed)
                self._fail(batch.reset(), closed)
                return
            # Admit waiting requests of the batch's group (the first one's when it is empty), first come first
            # served: one of another group at the head of the line waits for the batch to drain.
            group = batch.group if len(batch) else (pending[0][3] if pending else None)
            new = []
            while pending and len(batch) + len(new) < self.max_batch_size and pending[0][3] == group:
                prompt, max_new_tokens, temperature, _, fut = pending.popleft()
                r = GenRequest([], 0, temperature, group, done=fut)
                try:
                    r.ids, r.budget = _prompt_ids(self.model, self.tokenizer, prompt, max_new_tokens)
                    r.pos = len(r.ids)
                    new.append(r)
                except Exception as e:  # a prompt the tokenizer rejects fails alone
                    self._fail([r], e)
            if new:
                try:
                    batch.join(new)
                except Exception as e:  # their prefill failed: those requests get the error, the batch goes on
                    self._fail(new, e)
            if len(batch):
                try:
                    n = batch.step()
                except Exception as e:  # every row of the failed step gets the error; the worker lives on
                    self._fail(batch.reset(), e)
                    continue
                if self.on_step:
                    self.on_step(n)


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
