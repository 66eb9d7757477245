"""The training loop shared by SFT and DPO: one screen of loop, resumable to the bit.

nanoGPT's loop with what a long run needs: AdamW with linear warmup then cosine decay to a floor
(``min_lr_ratio`` of the peak), gradient clipping, mixed precision (bf16 autocast; fp16 with a
GradScaler on CUDA only), gradient accumulation weighted by target tokens (``grad_accum``
micro-batches are exactly one big batch), evaluation every ``eval_every`` steps, early stopping
after ``early_stopping_patience`` evaluations without an improvement of ``early_stopping_min_delta``,
and a checkpoint every ``checkpoint_every`` steps.

Resuming. A checkpoint holds the trainable parameters, the AdamW moments, torch's RNG states
(dropout draws from them), the data position and the loss history, all as safetensors + JSON
(no pickle). The data order is a pure function of (seed, epoch) (``batch_order``), so the position
(micro-batches consumed) is the whole data-loader state. A run killed after step k and started
again loads the newest complete checkpoint (written to ``step-N.tmp`` and renamed, so a kill while
writing leaves the previous one) and continues: on CPU with fixed seeds its loss history equals an
uninterrupted run's exactly (tests/test_trainer.py crashes one after step k and resumes it).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from corpus2model.tasks.stage import StageError

SMOOTH = 5  # initial/final train loss are means over this many steps
CKPT_PREFIX = "step-"


class SimulatedCrash(RuntimeError):
    """Raised by ``train(crash_after=k)`` right after step k (tests of resume)."""


# ---------------------------------------------------------------------------------------------
# schedule and data order
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, max_steps: int, warmup_steps: int, peak: float, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay to
    ``min_ratio * peak`` (a floor, nanoGPT's min_lr: the last steps still learn)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into batch_size pieces
    (the last one may be short). A pure function, so a resumed run needs only its position."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


class Batches:
    """Endless shuffled batches over ``n`` examples; ``get(indices) -> dict of tensors``."""

    def __init__(self, n: int, get: Callable[[list[int]], dict], batch_size: int, seed: int, position: int = 0):
        if n <= 0:
            raise StageError("the training data is empty: nothing to train on")
        self.n, self.get, self.batch_size, self.seed, self.position = n, get, batch_size, seed, position
        self._epoch, self._order = None, []

    def __next__(self) -> dict:
        per_epoch = -(-self.n // self.batch_size)
        epoch, i = divmod(self.position, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(self.n, self.batch_size, self.seed, epoch)
        self.position += 1
        return self.get(self._order[i])

    def __iter__(self):
        return self


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a batch (every ``*attention_mask`` column: DPO has two)."""
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask")))


# ---------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON)
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    position: int = 0
    history: list = field(default_factory=list)
    best_eval: float | None = None
    bad_evals: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    pruned: bool = False
    resumed_from: int | None = None


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model, opt, state: TrainState, keep: int = 2, scaler=None) -> Path:
    """Write ``folder/step-N`` atomically (temp folder + rename) and keep the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CKPT_PREFIX}{state.step:08d}"
    tmp = folder / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    params = _trainable(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    index = {id(p): n for n, p in params.items()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    moments[f"{index[id(p)]}::{k}"] = v.detach().cpu().contiguous()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {k: getattr(state, k) for k in ("step", "position", "history", "best_eval", "bad_evals", "tokens_seen",
                                           "train_seconds", "stopped_early")}
    if scaler is not None:
        meta["grad_scaler"] = {k: (float(v) if isinstance(v, (int, float)) else v)
                               for k, v in scaler.state_dict().items() if isinstance(v, (int, float))}
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    tmp.rename(final)
    for old in sorted(p for p in folder.glob(CKPT_PREFIX + "*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).glob(CKPT_PREFIX + "*")
                  if not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, opt, scaler=None) -> TrainState:
    """Restore parameters, optimizer moments and RNG from ``path``; returns the saved state."""
    import torch
    from safetensors.torch import load_file

    params = _trainable(model)
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise StageError(f"checkpoint {path} holds other trainable parameters than this model "
                         f"(e.g. {sorted(set(saved) ^ set(params))[:3]}): delete {path.parent} to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    moments = load_file(str(path / "optimizer.safetensors"))
    # AdamW keeps its step counter on the CPU unless fused or capturable (then beside the parameter).
    step_on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for n, p in params.items():
        st = {k.split("::", 1)[1]: v.to(p.device) for k, v in moments.items() if k.split("::", 1)[0] == n}
        if st:
            if "step" in st and not step_on_device:
                st["step"] = st["step"].cpu()
            opt.state[p] = st
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    st = TrainState(**{k: meta[k] for k in ("step", "position", "history", "best_eval", "bad_evals", "tokens_seen",
                                            "train_seconds", "stopped_early")})
    st.resumed_from = st.step
    return st


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def autocast_for(precision: str, device_type: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("finetune.precision fp16 needs a CUDA GPU (it needs loss scaling); use bf16 or fp32 on CPU")
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train(model, batches: Batches, evaluate: Callable[[], float], ft, loss_fn: Callable,
          ckpt_dir: Path | None = None, log=None, crash_after: int | None = None, progress: bool = True,
          on_eval: Callable[[int, float], bool] | None = None, accelerator=None) -> dict:
    """Train ``model``'s trainable parameters for ``ft.max_steps`` steps; returns history and totals.

    ``loss_fn(model, batch) -> (mean loss per target token, n target tokens)``; ``evaluate()`` the
    held-out loss (lower is better). ``ckpt_dir``: checkpoints are written there and the newest is
    resumed from. ``on_eval(step, eval_loss)`` returning True stops the run (a hyperparameter search
    pruning a poor trial). ``accelerator``: an ``accelerate.Accelerator`` (multi-GPU through
    ``accelerate launch --config_file configs/accelerate_fsdp.yaml``): it wraps model and optimizer
    (DDP/FSDP), owns backward, clipping and autocast, and each process takes every world_size-th
    micro-batch of the same seeded order, so one process trains exactly as without it. ``ft`` needs learning_rate, weight_decay, max_steps, warmup_steps, min_lr_ratio,
    grad_clip, grad_accum, precision, eval_every, early_stopping_patience, early_stopping_min_delta,
    checkpoint_every, keep_checkpoints.
    """
    import torch

    params = list(_trainable(model).values())
    if not params:
        raise StageError("the model has no trainable parameters: check finetune.method and its target modules")
    device = params[0].device
    # Fused AdamW on CUDA and on CPU: on CPU the foreach version builds whole-model temporaries per
    # update; on the 46M CPU bench model (bench/train_throughput.py --cpu) an update took 117 ms
    # foreach vs 17 ms fused, 7% of a full fine-tuning step. The HF Trainer defaults to fused too.
    opt = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay,
                            **({"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}))
    scaler = torch.amp.GradScaler("cuda") if ft.precision == "fp16" and accelerator is None else None
    amp = lambda: autocast_for(ft.precision, device.type)  # noqa: E731  (a fresh context per use)
    world, rank = 1, 0
    if accelerator is not None:
        if ft.checkpoint_every and accelerator.distributed_type.value == "FSDP":
            # Our checkpoints hold whole (unsharded) tensors; FSDP shards parameters and optimizer state.
            raise ValueError("finetune.checkpoint_every must be 0 under FSDP (sharded state is not checkpointed here)")
        model, opt = accelerator.prepare(model, opt)
        params = [p for p in model.parameters() if p.requires_grad]
        amp = accelerator.autocast
        world, rank = accelerator.num_processes, accelerator.process_index

    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        st = load_checkpoint(last, model, opt, scaler)
        batches.position = st.position
        if log:
            log(f"resuming from checkpoint {last} (step {st.step}/{ft.max_steps})")
    else:
        st = TrainState(position=batches.position)
        st.history.append({"step": 0, "train_loss": None, "lr": None, "eval_loss": evaluate(), "tokens_per_s": None})
        st.best_eval = st.history[0]["eval_loss"]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        # tqdm hides itself when stderr is not a terminal (Prefect workers, CI): disable=None.
        bar = tqdm(total=ft.max_steps, initial=st.step, desc="finetune", unit="step", disable=None, file=sys.stderr)
    model.train()
    while st.step < ft.max_steps and not st.stopped_early and not st.pruned:
        step = st.step + 1
        t0 = time.perf_counter()
        lr = lr_at(step - 1, ft.max_steps, ft.warmup_steps, ft.learning_rate, ft.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [next(batches) for _ in range(ft.grad_accum * world)][rank::world]
        micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
        n_tok = sum(real_tokens(b) for b in micro)
        # Weighting each micro-batch by its share of the step's target tokens makes grad_accum
        # micro-batches the same gradient as one batch of all of them.
        losses, counts = [], []
        for b in micro:
            with amp():
                loss, n = loss_fn(model, b)
            counts.append(n)
            losses.append(loss)
        total = sum(counts) or 1
        step_loss = 0.0
        for loss, n in zip(losses, counts):
            w = n / total if sum(counts) else 1.0 / len(losses)
            scaled = loss * w
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += float(loss.detach()) * w
        if not math.isfinite(step_loss):
            raise StageError(f"training loss became {step_loss} at step {step}: lower finetune.learning_rate "
                             f"(now {ft.learning_rate}) or raise finetune.warmup_steps")
        if scaler:
            scaler.unscale_(opt)
        if accelerator is not None:
            accelerator.clip_grad_norm_(params, ft.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, ft.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st.step, st.position = step, batches.position
        st.tokens_seen += n_tok
        st.train_seconds += dt
        row = {"step": step, "train_loss": step_loss, "lr": lr, "eval_loss": None,
               "tokens_per_s": round(n_tok / dt, 1) if dt > 0 else None}
        if step % ft.eval_every == 0 or step == ft.max_steps:
            row["eval_loss"] = evaluate()
            if st.best_eval is None or row["eval_loss"] < st.best_eval - ft.early_stopping_min_delta:
                st.best_eval, st.bad_evals = row["eval_loss"], 0
            else:
                st.bad_evals += 1
                if ft.early_stopping_patience and st.bad_evals >= ft.early_stopping_patience:
                    st.stopped_early = True
            if on_eval is not None and on_eval(step, row["eval_loss"]):
                st.pruned = True
            if log:
                log(f"step {step}/{ft.max_steps}: train {step_loss:.4f} eval {row['eval_loss']:.4f}"
                    + (" (early stop)" if st.stopped_early else ""))
        st.history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{n_tok / dt:,.0f}" if dt > 0 else "-")
        if ckpt_dir is not None and ft.checkpoint_every and step % ft.checkpoint_every == 0 and step < ft.max_steps \
                and rank == 0:
            save_checkpoint(Path(ckpt_dir), accelerator.unwrap_model(model) if accelerator else model, opt, st,
                            keep=ft.keep_checkpoints, scaler=scaler)
        if crash_after is not None and step == crash_after:
            raise SimulatedCrash(f"simulated crash after step {step}")
    if bar is not None:
        bar.close()
    model.eval()

    train_losses = [r["train_loss"] for r in st.history[1:]]
    evals = [r["eval_loss"] for r in st.history if r["eval_loss"] is not None]
    return {
        "history": st.history,
        "initial_eval_loss": st.history[0]["eval_loss"],
        "final_eval_loss": evals[-1],
        "best_eval_loss": min(evals),
        "initial_train_loss": sum(train_losses[:SMOOTH]) / max(1, len(train_losses[:SMOOTH])),
        "final_train_loss": sum(train_losses[-SMOOTH:]) / max(1, len(train_losses[-SMOOTH:])),
        "tokens_seen": st.tokens_seen,
        "train_seconds": st.train_seconds,
        "steps": st.step,
        "stopped_early": st.stopped_early,
        "pruned": st.pruned,
        "resumed_from": st.resumed_from,
    }
