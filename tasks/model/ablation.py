"""evaluate.ablate: the evaluation rows of the same model trained without one stage's contribution.

With ``evaluate.ablate: [augment]`` the flow reruns augment .. finetune under a config where augment adds
nothing (flows/stages.py ``nodes``/``ablated_config``; each stage cached under its own key) and hands the
branch's finetune output to the evaluate stage, which scores its tuned model on the main run's held-out
records, like ``tuned``: the row ``tuned_no_augment`` stands right after ``tuned``. The registry's deploy
gate can then require that augmentation did not hurt (``registry.gate.max_augment_regression``).

The branch retrains the tokenizer as well (tokenize learns its BPE on its own train split), so the two
rows' per-token figures (perplexity, token accuracy) count tokens of slightly different vocabularies;
exact match and ROUGE-L compare generated text and carry no such caveat. The note under the table says so.
"""
from __future__ import annotations

from typing import Callable

ROW_PREFIX = "tuned_no_"


def ablated_name(name: str, target: str) -> str:
    """``finetune_no_augment`` (a branch node), ``tuned_no_augment`` (its evaluation row)."""
    return f"{name}_no_{target}"


def row_name(target: str) -> str:
    return ablated_name("tuned", target)


def is_ablation_row(variant: str | None) -> bool:
    return bool(variant) and variant.startswith(ROW_PREFIX)


def add_rows(rows: list[dict], preds: dict, branches: dict, score: Callable, hours: Callable,
             notes: list[str]) -> list[dict]:
    """Insert one row per ablated branch after ``tuned``. ``branches``: target -> that branch's finetune
    Manifest; ``score(finetune) -> (row, argmax)`` is evaluate's scoring of its tuned model (same records,
    same columns, the model's own tokenizer); ``hours(finetune) -> (hours, "cpu"|"gpu")``. Its argmax is
    not kept: token ids of another tokenizer cannot agree with the fp32 reference's, so top-1 agreement
    stays n/a for these rows. Returns the new rows."""
    added = []
    at = next((i + 1 for i, r in enumerate(rows) if r["variant"] == "tuned"), len(rows))
    for target, ft in branches.items():
        row, _ = score(ft)
        h, hw = hours(ft)
        row = {"variant": row_name(target), **row, f"train_{hw}_hours": h}
        rows.insert(at + len(added), row)
        preds[row["variant"]] = []
        added.append(row)
    if added:
        names = ", ".join(r["variant"] for r in added)
        notes.append(f"{names}: the same model trained without {', '.join(branches)} (evaluate.ablate), on the same "
                     f"held-out records; its tokenizer is trained on its own train split, so perplexity and token "
                     f"accuracy count slightly different tokens (exact match and ROUGE-L compare text)")
    return added
