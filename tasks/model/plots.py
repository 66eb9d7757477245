"""Training charts: the loss curve a finetune output ships as loss.png (causal LM and classifier alike).
matplotlib is imported when a chart is drawn (the train extra), never at module import."""
from __future__ import annotations

from pathlib import Path


def plot_losses(history: list[dict], path: Path, ylabel: str = "cross-entropy per target token") -> None:
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
    ax1.set_ylabel(ylabel)
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
