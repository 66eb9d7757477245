"""Elastic weight consolidation (Kirkpatrick et al. 2017) for continual fine-tuning.

A version estimates, at the end of its training, the diagonal Fisher information of its trainable
weights on its own training blocks:

    F_i = 1/N * sum_b (d L_b / d theta_i)^2

with L_b the mean cross-entropy per target token of block b (one block per backward: the "empirical
Fisher" of per-block losses; ``finetune.ewc_fisher_blocks`` = N). A later run that continues from it
(``finetune.init: production``) with ``finetune.ewc_lambda`` = lambda > 0 minimises

    loss + lambda/2 * sum_i F_i (theta_i - theta_parent_i)^2

over the weights whose names the parent's Fisher holds: the weights that mattered for the parent's data
are held near the parent's values, the others move freely. F's scale follows the loss's (per-token mean),
so useful lambdas are large (the measured test uses 1e4 .. 1e5 on the tiny model; start near 1 / mean F).

**Weight space.** The Fisher is stored under the *merged model's* weight names (``model.layers.0.
self_attn.q_proj.weight``, the names in a version's ``model/*.safetensors``), whatever method trained it,
because the next run's trainable set need not be the parent's: a fresh LoRA adapter has new A/B matrices
that no earlier Fisher describes. So the penalty is taken on each trained weight's *effective value*:

* ``full``: the weight itself; theta_parent is the parent's weight (the value training started from).
* LoRA/QLoRA: the base weight is frozen at the parent's merged value and the adapter adds
  delta = scaling * B @ A, so theta - theta_parent = delta: the anchor of a LoRA delta is **zero**, and the
  penalty is sum F * delta^2 on the merged weight's Fisher. (Penalising A and B themselves would be wrong:
  A starts random, and the sizes of A and B say nothing about how far the weight has moved.)
* ``modules_to_save`` (LoRA's fully trained copies, e.g. ``lm_head``): like ``full``; the copy starts from the
  parent's weight, which is its anchor.

The Fisher is estimated the same way, on the merged model: gradients of the merged weights that the
method trained (all weights for ``full``; the LoRA target weights and the modules_to_save for LoRA).
Other methods (prefix, IA3, bottleneck) have no merged-weight form of their update, so
schemas/config.py refuses ``ewc_lambda`` for them.

Pure functions of torch modules and tensors; tests/test_continual.py checks them against a direct
computation and measures the effect (the old test split's loss rises less with EWC).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

PEFT_PREFIX = "base_model.model."


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _peft_parts(model):
    """(LoRA layers, modules_to_save wrappers) of a peft model, by module name; empty for a plain model."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # peft is an extra; a plain model has neither
        return {}, {}
    lora, saved = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and getattr(module, "lora_A", None):
            lora[name] = module
        elif isinstance(module, ModulesToSaveWrapper):
            saved[name] = module
    return lora, saved


def _adapter(module) -> str:
    active = module.active_adapters if hasattr(module, "active_adapters") else module.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


@dataclass
class Term:
    """One weight's share of the penalty: F * delta()^2, delta() = effective weight - parent weight."""

    name: str  # merged-model weight name
    fisher: object  # tensor, the weight's shape
    delta: Callable[[], object]


def trainable_weight_names(model) -> list[str]:
    """The merged-model names of the weights ``model``'s training changes (see "Weight space")."""
    lora, saved = _peft_parts(model)
    if not lora and not saved:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    names = [f"{_strip(n)}.weight" for n in lora]
    for n, wrapper in saved.items():
        copy = wrapper.modules_to_save[_adapter(wrapper)]
        names += [f"{_strip(n)}.{pn}" for pn, p in copy.named_parameters() if p.requires_grad]
    return sorted(names)


def fisher_diagonal(model, batches: Iterable[dict], loss_fn: Callable, names: list[str]) -> tuple[dict, int]:
    """({name: F}, blocks used): mean over ``batches`` of each named parameter's squared gradient of
    ``loss_fn(model, batch)[0]``. ``model`` is a plain (merged) model; pass one block per batch for the
    per-block Fisher. Batches without target tokens are skipped. requires_grad is restored afterwards."""
    import torch

    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"no parameters {unknown[:5]} in the model the Fisher is estimated on")
    before = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    used = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            loss, k = loss_fn(model, batch)
            if not k:
                continue
            loss.backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    fisher[n] += g.detach().float() ** 2
            used += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(before[n])
        model.train(was_training)
    if used:
        for n in names:
            fisher[n] /= used
    return fisher, used


def terms(model, fisher: dict, parent_state: dict) -> list[Term]:
    """The penalty's terms for ``model`` about to train from a parent with Fisher ``fisher`` (weight name ->
    tensor) and weights ``parent_state`` (weight name -> tensor, for full and modules_to_save anchors):
    one per trained weight the Fisher names (see "Weight space" for the anchors)."""
    out: list[Term] = []
    lora, saved = _peft_parts(model)
    if not lora and not saved:
        for n, p in model.named_parameters():
            if p.requires_grad and n in fisher:
                anchor = parent_state[n].detach().to(p.device, p.dtype).clone()
                out.append(Term(n, fisher[n].to(p.device), lambda p=p, a=anchor: p - a))
        return out
    for n, module in lora.items():
        w = f"{_strip(n)}.weight"
        if w in fisher:
            adapter = _adapter(module)
            f = fisher[w].to(module.lora_B[adapter].weight.device)
            out.append(Term(w, f, lambda m=module, a=adapter: m.get_delta_weight(a)))  # anchor 0
    for n, wrapper in saved.items():
        copy = wrapper.modules_to_save[_adapter(wrapper)]
        for pn, p in copy.named_parameters():
            w = f"{_strip(n)}.{pn}"
            if p.requires_grad and w in fisher:
                anchor = parent_state[w].detach().to(p.device, p.dtype).clone()
                out.append(Term(w, fisher[w].to(p.device), lambda p=p, a=anchor: p - a))
    return out


def penalty(ts: list[Term]):
    """sum_i F_i * delta_i^2 over the terms (a 0-dim tensor with a gradient path; 0.0 without terms)."""
    total = 0.0
    for t in ts:
        total = total + (t.fisher * t.delta().float() ** 2).sum()
    return total


def penalized(loss_fn: Callable, ts: list[Term], lam: float) -> Callable:
    """``loss_fn`` plus lambda/2 * penalty. The trainer weights each micro-batch's loss by its share of the
    step's target tokens (shares sum to 1), so the penalty counts once per optimizer step."""
    def loss(model, batch):
        value, k = loss_fn(model, batch)
        return value + 0.5 * lam * penalty(ts), k

    return loss


def save(fisher: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({n: t.detach().float().contiguous().cpu() for n, t in fisher.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
