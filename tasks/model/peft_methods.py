"""Fine-tuning methods: which parameters train, how they are saved, reloaded and merged.

``finetune.method``:

- ``full``: every parameter trains; the result is a whole model (``merged/``), no adapter.
- ``lora``: peft LoRA (r, alpha, dropout, target_modules, modules_to_save).
- ``qlora``: the base loaded in 4-bit NF4 with double quantization and bf16 compute (bitsandbytes),
  LoRA on top (peft ``prepare_model_for_kbit_training``). CUDA only: bitsandbytes' 4-bit kernels
  have no CPU path, so on CPU it stops with a clear error. Merging folds the adapter into the
  *float* base (``base/``), not into the 4-bit weights, so the merged model carries no rounding.
- ``prefix``: peft prefix tuning (``num_virtual_tokens`` learned key/values per layer). Not
  mergeable: no ``merged/``; load it with ``load_tuned``.
- ``ia3``: peft IA3 (learned rescaling of keys, values and the down_proj input); mergeable.
- ``bottleneck``: bottleneck adapters written here. The ``adapters`` library (AdapterHub) would
  be the natural choice, but its 1.3.0 release pins transformers~=4.57 and this project runs
  transformers 5.23, so it cannot be installed. The module is small: per decoder layer one
  ``h + up(act(down(h)))`` block after the MLP (Houlsby et al. 2019's bottleneck, at Pfeiffer's one
  placement per layer), ``up`` zero-initialised so training starts from the base model exactly.
  Not mergeable (the activation is non-linear).

Everything is saved as safetensors. Adapter folders hold peft's files (``adapter_config.json``,
``adapter_model.safetensors``) or, for bottleneck, ``bottleneck_config.json`` +
``bottleneck_adapter.safetensors``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from corpus2model.tasks.stage import StageError

PEFT_METHODS = ("lora", "qlora", "prefix", "ia3")
MERGEABLE = ("full", "lora", "qlora", "ia3")
BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_WEIGHTS = "bottleneck_adapter.safetensors"


def mergeable(method: str) -> bool:
    return method in MERGEABLE


# ---------------------------------------------------------------------------------------------
# bottleneck adapters
# ---------------------------------------------------------------------------------------------
def _bottleneck_module(hidden: int, size: int, activation: str):
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(hidden, size)
            self.up = torch.nn.Linear(size, hidden)
            self.act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU(), "silu": torch.nn.SiLU()}[activation]
            # Zero up-projection: the adapter starts as the identity, the model as the base model.
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(self.act(self.down(h)))

    return Bottleneck()


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise StageError(f"{type(base).__name__}: bottleneck adapters need a decoder with .model.layers[*].mlp")
    return layers


def add_bottleneck_adapters(model, size: int, activation: str = "gelu", modules_to_save=()):
    """Freeze ``model`` and insert one trainable bottleneck after each layer's MLP (in place);
    ``modules_to_save`` (e.g. ["lm_head"]) train in full beside them.

    The adapter is a child of the MLP (``...mlp.bottleneck``) applied by a forward hook, so the
    base weights keep their names and ``base/`` loads unchanged."""
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == m or n.startswith(m + ".") or f".{m}." in f".{n}" for m in modules_to_save))
    hidden = model.config.hidden_size
    for layer in _decoder_layers(model):
        mlp = layer.mlp
        ref = next(mlp.parameters())
        mlp.bottleneck = _bottleneck_module(hidden, size, activation).to(ref.device)
        mlp.register_forward_hook(lambda mod, args, out: mod.bottleneck(out))
    model.bottleneck_config = {"size": size, "activation": activation, "placement": "after_mlp",
                               "layers": len(_decoder_layers(model)), "modules_to_save": sorted(modules_to_save)}
    return model


def save_bottleneck(model, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(folder / BOTTLENECK_WEIGHTS), metadata={"format": "pt"})
    (folder / BOTTLENECK_CONFIG).write_text(json.dumps(model.bottleneck_config, indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")


def load_bottleneck(model, folder: Path):
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((folder / BOTTLENECK_CONFIG).read_text(encoding="utf-8"))
    add_bottleneck_adapters(model, cfg["size"], cfg["activation"], cfg.get("modules_to_save", []))
    saved = load_file(str(folder / BOTTLENECK_WEIGHTS))
    params = dict(model.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in saved]
    if missing or any(k not in params for k in saved):
        raise StageError(f"{folder / BOTTLENECK_WEIGHTS} does not fit this model (missing {missing[:3]})")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# prepare / save / reload
# ---------------------------------------------------------------------------------------------
def check_qlora_available() -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before any work is done."""
    import torch

    if not torch.cuda.is_available():
        raise StageError("finetune.method qlora needs a CUDA GPU: bitsandbytes' 4-bit NF4 kernels have no CPU "
                         "path. Use method: lora on this machine (same adapter, float base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StageError("finetune.method qlora needs bitsandbytes: pip install bitsandbytes") from None


def load_4bit(base_dir: Path):
    """The saved float base as 4-bit NF4 with double quantization, computing in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=bnb, device_map={"": 0},
                                                dtype=torch.bfloat16, use_safetensors=True)


def peft_config(ft):
    """The peft config for a peft method (``lora``/``qlora``/``prefix``/``ia3``)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    if ft.method in ("lora", "qlora"):
        return LoraConfig(r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
                          target_modules=list(ft.lora.target_modules), task_type="CAUSAL_LM", bias="none",
                          modules_to_save=list(ft.lora.modules_to_save) or None)
    if ft.method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=ft.prefix.num_virtual_tokens,
                                  modules_to_save=list(ft.prefix.modules_to_save) or None)
    if ft.method == "ia3":
        return IA3Config(task_type="CAUSAL_LM", target_modules=list(ft.ia3.target_modules),
                         feedforward_modules=list(ft.ia3.feedforward_modules),
                         modules_to_save=list(ft.ia3.modules_to_save) or None)
    raise ValueError(f"{ft.method!r} is not a peft method")


def prepare(model, ft, base_dir: Path | None = None):
    """The model to train for ``ft.method`` (its trainable parameters set). ``base_dir``: the saved
    float base, which QLoRA reloads in 4-bit."""
    import torch

    torch.manual_seed(ft.seed)  # adapter init and dropout: seeded apart from the base model's init
    if ft.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if ft.method == "bottleneck":
        return add_bottleneck_adapters(model, ft.bottleneck.size, ft.bottleneck.activation,
                                       list(ft.bottleneck.modules_to_save))
    from peft import get_peft_model

    if ft.method == "qlora":
        check_qlora_available()
        from peft import prepare_model_for_kbit_training

        if base_dir is None:
            raise ValueError("qlora needs base_dir (the saved float base to load in 4-bit)")
        model = prepare_model_for_kbit_training(load_4bit(base_dir), use_gradient_checkpointing=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a renamed transformers method
            return get_peft_model(model, peft_config(ft))
    except ValueError as e:
        section = "lora" if ft.method == "qlora" else ft.method
        raise StageError(f"finetune.{section}.target_modules do not fit the model: {e}") from None


def canonical_adapter_config(path: Path) -> None:
    """peft writes target_modules from a Python set, whose order changes with the process's hash
    seed; sort it (and the keys) so the same training gives the same bytes in any process."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k, v in cfg.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            cfg[k] = sorted(v)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(model, method: str, folder: Path) -> bool:
    """Write the adapter (nothing for ``full``); True when something was written."""
    if method == "full":
        return False
    if method == "bottleneck":
        save_bottleneck(model, folder)
        return True
    model.save_pretrained(str(folder), safe_serialization=True)
    for cfg_file in sorted(folder.rglob("adapter_config.json")):  # per-task adapters sit in subfolders
        canonical_adapter_config(cfg_file)
    return True


def load_tuned(base_dir: Path, adapter_dir: Path):
    """(model, tokenizer): the float base from ``base_dir`` with the adapter in ``adapter_dir``
    applied (peft or bottleneck), in eval mode. What serve/evaluate use for non-mergeable methods."""
    from corpus2model.tasks.model.modeling import load_causal_lm

    model, tok = load_causal_lm(base_dir)
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / BOTTLENECK_CONFIG).is_file():
        return load_bottleneck(model, adapter_dir), tok
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval(), tok


def merge_saved(base_dir: Path, adapter_dir: Path):
    """(merged float model, tokenizer) from the saved base and a saved peft adapter (LoRA/QLoRA/IA3)."""
    model, tok = load_tuned(base_dir, adapter_dir)
    if not hasattr(model, "merge_and_unload"):
        raise StageError(f"{adapter_dir}: this adapter cannot be merged (bottleneck/prefix): load it with load_tuned")
    return model.merge_and_unload().eval(), tok


def task_adapter_names(adapter_dir: Path) -> list[str]:
    """The per-task_type adapters saved beside the shared one (``adapter/<task_type>/``)."""
    adapter_dir = Path(adapter_dir)
    return sorted(p.name for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file()) \
        if adapter_dir.is_dir() else []


def load_multi_task(merged_dir: Path, adapter_dir: Path):
    """(peft model, tokenizer, task names): the merged model (base + shared adapter) with every
    per-task adapter from ``adapter_dir/<task_type>/``; pick one with ``model.set_adapter(name)``,
    or run the merged model alone inside ``with model.disable_adapter():``."""
    from peft import PeftModel

    from corpus2model.tasks.model.modeling import load_causal_lm

    names = task_adapter_names(adapter_dir)
    if not names:
        raise StageError(f"{adapter_dir} holds no per-task adapters (finetune.adapter_per_task_type was off)")
    model, tok = load_causal_lm(merged_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(model, str(Path(adapter_dir) / names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(Path(adapter_dir) / name), adapter_name=name)
    return model.eval(), tok, names
