"""finetune: packed token blocks -> a LoRA adapter, the merged model and the base model beside it.

A recipe that reads top to bottom (torchtune's single-device LoRA recipe, nanoGPT's loop):
build the base model from ``model`` (seeded random init, or ``model.pretrained``), save it as
``base/`` so evaluation can compare against it, wrap it with a peft LoRA adapter, train with
AdamW under linear warmup + cosine decay and gradient clipping for ``max_steps`` steps (the data
loader is cycled), evaluate on the validation blocks every ``eval_every`` steps and at the end,
then save the adapter and the merged model. Everything is safetensors.

Packed blocks hold several documents (tasks/tokenize.py). Training passes their restarted
``position_ids`` and no 2D attention mask when a block's padding is only at its end: transformers
then derives a block-diagonal causal mask from the position restarts, so a document never
attends to the one before it in the block. Trailing padding needs no mask in a causal model (no
real token can see it, and padding carries no loss). Measured on 2 cores (hidden 128, 2 layers,
batch 8 x 256): 6.3 steps/s this way against 2.7 with the 2D mask, which also lets documents
see each other. A block with padding anywhere else gets its 2D mask.

Baseline parts (replaced by later issues): LoRA only (no full/QLoRA/IA3/DPO), no resumable
checkpoints (a killed run restarts; the demo takes about a minute), single process.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from pathlib import Path

from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "finetune"
VERSION = "1"
SECTIONS = ("finetune", "model")

COLUMNS = ("input_ids", "labels", "position_ids", "attention_mask")
MIN_LR_RATIO = 0.1  # cosine decays to 10 % of the peak (nanoGPT's default), not to zero
SMOOTH = 5  # initial/final train loss are means over this many steps


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, max_steps: int, warmup_steps: int, peak: float, min_ratio: float = MIN_LR_RATIO) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def forward_kwargs(batch: dict) -> dict:
    """Model inputs for one packed batch (int64), with the attention mask only where it is needed."""
    ids = batch["input_ids"].long()
    mask = batch["attention_mask"].long()
    kwargs = {"input_ids": ids, "labels": batch["labels"].long(), "position_ids": batch["position_ids"].long(),
              "use_cache": False}
    # Non-increasing along each row = all padding is at the end (see the module docstring).
    trailing_only = bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True
    if not trailing_only:
        kwargs["attention_mask"] = mask
    return kwargs


def target_tokens(labels) -> int:
    """Tokens that carry loss: the model predicts labels[:, 1:] (transformers shifts inside)."""
    return int((labels[:, 1:] != -100).sum())


def evaluate_loss(model, loader) -> float:
    """Mean cross-entropy per target token over the whole loader (not a mean of batch means)."""
    import torch

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            kw = forward_kwargs(batch)
            k = target_tokens(kw["labels"])
            if k == 0:
                continue
            total += float(model(**kw).loss) * k
            n += k
    if was_training:
        model.train()
    return total / n if n else float("nan")


def cycle(loader):
    """Endless batches; each pass reshuffles (the loader's seeded generator keeps it reproducible)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise StageError("the training data loader is empty")


def train_lora(model, train_loader, eval_loader, ft, log=None) -> dict:
    """The training loop. ``model`` is a peft model; returns the history and summary numbers."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, ft.max_steps, ft.warmup_steps, ft.learning_rate) / ft.learning_rate
    )
    history: list[dict] = []
    initial_eval = evaluate_loss(model, eval_loader)
    history.append({"step": 0, "train_loss": None, "lr": None, "eval_loss": initial_eval, "tokens_per_s": None})
    model.train()
    batches = cycle(train_loader)
    tokens_seen, train_seconds = 0, 0.0
    for step in range(1, ft.max_steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        kw = forward_kwargs(batch)
        lr = opt.param_groups[0]["lr"]
        loss = model(**kw).loss
        if not torch.isfinite(loss):
            raise StageError(f"training loss became {float(loss)} at step {step}: lower finetune.learning_rate "
                             f"(now {ft.learning_rate}) or raise finetune.warmup_steps")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ft.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n_tok = int(batch["attention_mask"].sum())
        tokens_seen += n_tok
        train_seconds += dt
        row = {"step": step, "train_loss": loss.item(), "lr": lr, "eval_loss": None,
               "tokens_per_s": round(n_tok / dt, 1) if dt > 0 else None}
        if step % ft.eval_every == 0 or step == ft.max_steps:
            row["eval_loss"] = evaluate_loss(model, eval_loader)
            if log:
                log(f"finetune step {step}/{ft.max_steps}: train {row['train_loss']:.4f} eval {row['eval_loss']:.4f}")
        history.append(row)
    train_losses = [r["train_loss"] for r in history[1:]]
    return {
        "history": history,
        "initial_eval_loss": initial_eval,
        "final_eval_loss": history[-1]["eval_loss"],
        "initial_train_loss": sum(train_losses[:SMOOTH]) / len(train_losses[:SMOOTH]),
        "final_train_loss": sum(train_losses[-SMOOTH:]) / len(train_losses[-SMOOTH:]),
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
    }


def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if r["train_loss"] is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r["eval_loss"] is not None]
    lrs = [(r["step"], r["lr"]) for r in history if r["lr"] is not None]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax1.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax1.plot(*zip(*evals), "o-", label="validation loss")
    ax1.set_ylabel("cross-entropy per target token")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if lrs:
        ax2.plot(*zip(*lrs), color="tab:green")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def final_path(out_dir: Path, ctx: StageContext, rel: str) -> Path:
    """Where ``out_dir/rel`` will be once run_stage renames the temp folder into the store
    (artifacts link files for people to open after the run); a direct call keeps ``out_dir``."""
    return (ctx.final_dir or out_dir) / rel


def canonical_adapter_config(path: Path) -> None:
    """peft writes target_modules from a Python set, whose order changes with the process's hash
    seed; sort it (and the keys) so the same training gives the same bytes in any process."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k, v in cfg.items():
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            cfg[k] = sorted(v)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def tokenizer_dir(tok: Manifest) -> Path:
    files = tok.files_with("tokenizer")
    if not files:
        raise StageError(f"{tok.path}: no files with role 'tokenizer'; finetune reads the tokenize stage's output")
    return files[0].parent


def packed_files(tok: Manifest) -> dict[str, Path]:
    """Split name -> packed Parquet file (``packed/<split>.parquet``)."""
    return {p.stem: p for p in tok.files_with("packed")}


def _loaders(files: dict[str, Path], cache_dir: Path, batch_size: int, seed: int, eval_blocks: int):
    """Train/validation DataLoaders over ``datasets`` (memory-mapped Arrow, torch format)."""
    import datasets
    import torch
    from torch.utils.data import DataLoader

    datasets.disable_progress_bars()
    if "train" not in files:
        raise StageError("the tokenize output has no packed/train.parquet: nothing to train on")
    data_files = {s: str(p) for s, p in files.items() if s in ("train", "validation")}
    ds = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(cache_dir))
    notes = []
    train = ds["train"].with_format("torch", columns=list(COLUMNS))
    if len(train) == 0:
        raise StageError(f"{files['train']} holds no blocks: the train split is empty")
    if "validation" in ds and len(ds["validation"]) > 0:
        val = ds["validation"]
    else:
        # Without held-out blocks the "eval" loss is a train loss; say so rather than fail.
        val = ds["train"]
        notes.append("no validation blocks: eval_loss is measured on the train blocks")
    # A fixed prefix: every evaluation scores the same blocks, and its cost does not grow with the data.
    val = val.select(range(min(eval_blocks, len(val)))).with_format("torch", columns=list(COLUMNS))
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=False)
    eval_loader = DataLoader(val, batch_size=batch_size, shuffle=False)
    return train_loader, eval_loader, len(train), len(val), notes


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.artifacts import publish_image, publish_markdown
    from tasks.modeling import build_model, save_model
    from tasks.tokenize import load_tokenizer

    if len(inputs) != 1:
        raise StageError(f"finetune takes one upstream manifest (tokenize), got {len(inputs)}")
    (tok,) = inputs
    ft, mc = cfg.finetune, cfg.model
    seq_len = int(tok.stats.get("seq_len") or 0)
    if seq_len <= 0:
        raise StageError(f"{tok.path}: the tokenize manifest has no stats.seq_len")
    tokenizer = load_tokenizer(tokenizer_dir(tok))

    threads_before = torch.get_num_threads()
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    t_start = time.perf_counter()
    try:
        model = build_model(mc, tokenizer, seq_len)
        save_model(model, tokenizer, out_dir / "base")
        # LoRA A matrices and dropout draw from the global generator: seed them apart from the base init.
        torch.manual_seed(ft.seed)
        lora = LoraConfig(r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
                          target_modules=list(ft.lora.target_modules), task_type="CAUSAL_LM", bias="none",
                          modules_to_save=list(ft.lora.modules_to_save) or None)
        try:
            with warnings.catch_warnings():
                # peft calls transformers' renamed is_gradient_checkpointing; nothing for us to change.
                warnings.simplefilter("ignore", FutureWarning)
                peft_model = get_peft_model(model, lora)
        except ValueError as e:
            raise StageError(f"finetune.lora.target_modules {list(ft.lora.target_modules)} do not fit the model: "
                             f"{e}") from None
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())

        with tempfile.TemporaryDirectory(prefix="hf-datasets-", dir=out_dir.parent) as cache_dir:
            train_loader, eval_loader, n_train, n_val, notes = _loaders(
                packed_files(tok), Path(cache_dir), ft.batch_size, ft.seed, ft.eval_blocks)
            result = train_lora(peft_model, train_loader, eval_loader, ft, log=ctx.info)

        peft_model.save_pretrained(out_dir / "adapter", safe_serialization=True)
        canonical_adapter_config(out_dir / "adapter" / "adapter_config.json")
        merged = peft_model.merge_and_unload()
        merged.eval()
        save_model(merged, tokenizer, out_dir / "merged")
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t_start

    history = result["history"]
    (out_dir / "loss.json").write_text(json.dumps({"rows": history}, indent=1), encoding="utf-8")
    plot_losses(history, out_dir / "loss.png")

    files = []
    for folder in ("base", "adapter", "merged"):
        for p in sorted((out_dir / folder).rglob("*")):
            if p.is_file():
                files.append(FileEntry(p.relative_to(out_dir).as_posix(), role="model"))
    files += [FileEntry("loss.json", role="report"), FileEntry("loss.png", role="report")]
    bad = [f.path for f in files if f.path.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    if bad:
        raise StageError(f"finetune wrote pickled weights {bad}: only safetensors may leave this stage")

    tokens_per_s = result["tokens_seen"] / result["train_seconds"] if result["train_seconds"] > 0 else None
    stats = {
        "initial_train_loss": round(result["initial_train_loss"], 6),
        "final_train_loss": round(result["final_train_loss"], 6),
        "initial_eval_loss": round(result["initial_eval_loss"], 6),
        "final_eval_loss": round(result["final_eval_loss"], 6),
        "steps": ft.max_steps,
        "tokens_seen": result["tokens_seen"],
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "steps_per_s": round(ft.max_steps / result["train_seconds"], 3) if result["train_seconds"] > 0 else None,
        "trainable_params": trainable,
        "total_params": total,
        "train_blocks": n_train,
        "eval_blocks": n_val,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads() if ft.threads == 0 else ft.threads,
        "notes": notes,
        "base_dir": "base",
        "adapter_dir": "adapter",
        "merged_dir": "merged",
    }
    publish_image("finetune-loss", str(final_path(out_dir, ctx, "loss.png")),
                  "train/validation loss and learning rate per step")
    publish_markdown("finetune-summary", _summary_md(stats), "LoRA fine-tuning summary")
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)


def _summary_md(s: dict) -> str:
    lines = ["# Fine-tuning (LoRA)", "", "| metric | value |", "|---|---|"]
    for k in ("initial_eval_loss", "final_eval_loss", "initial_train_loss", "final_train_loss", "steps",
              "tokens_seen", "tokens_per_s", "steps_per_s", "trainable_params", "total_params", "seconds"):
        lines.append(f"| {k} | {s[k]} |")
    for n in s.get("notes", []):
        lines.append(f"\n> {n}")
    return "\n".join(lines) + "\n"
