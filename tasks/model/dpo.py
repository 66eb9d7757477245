"""DPO (Rafailov et al. 2023) on preference pairs, through the same loop as SFT (tasks/model/trainer.py).

Loss per pair: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` where ``pi_*``/``ref_*``
are the summed log-probabilities of the chosen/rejected response tokens given the prompt under
the trained policy and the reference model. It is TRL's ``loss_type="sigmoid"`` DPO loss; the loop
is ours so DPO gets the same checkpoints, resume, schedule and curves as SFT.

Reference model. The reference is the model before training, which is fixed, so its log-probs
are computed once for every pair before the first step (``reference_logps``) and stored beside the
pairs: no second model in memory and no second forward per step (TRL's ``precompute_ref_log_probs``).
For adapter methods they are computed with the adapter disabled (peft ``disable_adapter``), i.e. on
the base model; for ``full`` on the untouched initial weights; bottleneck adapters start as the
identity, so the model before training is the base.

Pairs: the shard stage's preference records (``pairs/<split>-NNNNN.parquet``: ingested, cleaned,
deduplicated and validated like training records), or a JSONL with ``prompt``, ``chosen``, ``rejected``
(``finetune.dpo.pairs_path``, ../shared/datasets/preference_pairs) read as it is. Either way a pair's
split is the shard stage's rule (``split_pairs``: assign_split on the pair's content hash), so the same
pairs give the same train / held-out sets by both routes: DPO trains on ``train`` and holds out
``validation`` (HELDOUT_SPLIT: its loss and accuracy during training, and the pairs the evaluate stage
scores); ``test`` pairs are left alone.
Each side is ``prompt + response + eos``, the prompt cut from the left to ``max_prompt_tokens``
(the end of a dialogue is what the answer responds to) and the response to
``max_response_tokens``; loss is on response tokens only.
"""
from __future__ import annotations

from pathlib import Path

from corpus2model.tasks.common.jsonl import iter_json_objects
from corpus2model.tasks.stage import StageError

IGNORE_INDEX = -100
HELDOUT_SPLIT = "validation"


def load_pairs(path: Path, report_dir: Path | None = None, drop_invalid: bool = False) -> tuple[list[dict], list[str]]:
    """(pairs, ids dropped). With ``report_dir`` the pairs are first checked by the preference_pairs
    expectation suite (tasks.validate.validate_preference_pairs; its report and failing_rows.parquet,
    the quarantine, land in ``report_dir``). Error-severity defects raise ValidationFailed, or with
    ``drop_invalid`` the failing pairs are left out (the shared HH file has 2 empty ``chosen``)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"finetune.dpo.pairs_path {path} does not exist: point it at a preference-pairs JSONL file")
    dropped: list[str] = []
    if report_dir is not None:
        from corpus2model.tasks.validate import ValidationFailed, validate_preference_pairs

        try:
            validate_preference_pairs(path, report_dir)
        except ValidationFailed as e:
            if not drop_invalid or not e.failing_ids():
                raise
            dropped = e.failing_ids()
    pairs = []
    for n, rec in iter_json_objects(path, "preference pairs are one JSON object a line with prompt/chosen/rejected"):
        if not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise StageError(f"{path}:{n}: a pair needs string fields prompt, chosen and rejected")
        if str(rec.get("id")) in dropped:
            continue
        pairs.append({"id": rec.get("id", str(n)), "prompt": rec["prompt"], "chosen": rec["chosen"],
                      "rejected": rec["rejected"]})
    if not pairs:
        raise StageError(f"{path} holds no usable preference pairs")
    return pairs, dropped


def split_pairs(pairs: list[dict], splits: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """split -> its pairs (in input order), by the shard stage's rule: ``assign_split`` of
    ``pair_split_key`` (the content hash of prompt, chosen and rejected) with the shard section's
    fractions and seed (``stats.split_rule`` of a shard output)."""
    from corpus2model.tasks.shard import assign_split, pair_split_key

    out: dict[str, list[dict]] = {name: [] for name in splits}
    for p in pairs:
        out[assign_split(pair_split_key(p), splits, seed)].append(p)
    return out


def shard_pairs(shard) -> dict[str, list[dict]]:
    """split -> the shard output's preference records as DPO pairs ({id, prompt, chosen, rejected}), in
    stream order (upstream order, as a pairs file lists them)."""
    from corpus2model.tasks.shard import pair_files, read_pairs

    return {split: [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in read_pairs(paths)]
            for split, paths in pair_files(shard).items()}


def encode_side(prompt_ids: list[int], resp_ids: list[int], eos: int, max_prompt: int, max_resp: int):
    p = list(prompt_ids)[-max_prompt:]
    r = (list(resp_ids)[:max_resp - 1]) + [eos]
    return p + r, [IGNORE_INDEX] * len(p) + r


def encode_pairs(pairs: list[dict], tokenizer, max_prompt: int, max_resp: int) -> dict:
    """Padded tensors for both sides: ``{chosen,rejected}_{input_ids,labels,attention_mask}``."""
    import torch

    enc = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts, chosen, rejected = (enc([p[k] for p in pairs]) for k in ("prompt", "chosen", "rejected"))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for side, resps in (("chosen", chosen), ("rejected", rejected)):
        seqs = [encode_side(p, r, eos, max_prompt, max_resp) for p, r in zip(prompts, resps)]
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (x, y) in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        out[f"{side}_input_ids"], out[f"{side}_labels"], out[f"{side}_attention_mask"] = ids, labels, mask
    return out


def sequence_logps(model, input_ids, labels, attention_mask):
    """Summed log-probability of the labelled tokens per row (labels shifted as in causal LM loss)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * keep).sum(-1)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """(mean loss, per-pair reward margin) of the sigmoid DPO objective."""
    import torch.nn.functional as F

    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -F.logsigmoid(margin).mean(), margin


def _policy_logps(model, batch: dict):
    import torch

    # Both sides in one forward: pad to the wider one, concatenate on the batch dimension.
    w = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def padded(x, value):
        return torch.nn.functional.pad(x, (0, w - x.shape[1]), value=value)

    ids = torch.cat([padded(batch["chosen_input_ids"], 0), padded(batch["rejected_input_ids"], 0)])
    labels = torch.cat([padded(batch["chosen_labels"], IGNORE_INDEX), padded(batch["rejected_labels"], IGNORE_INDEX)])
    mask = torch.cat([padded(batch["chosen_attention_mask"], 0), padded(batch["rejected_attention_mask"], 0)])
    lp = sequence_logps(model, ids, labels, mask)
    n = batch["chosen_input_ids"].shape[0]
    return lp[:n], lp[n:]


def reference_logps(model, data: dict, batch_size: int = 16) -> dict:
    """ref_chosen / ref_rejected for every pair, from the model as it is now with any adapter off."""
    import contextlib

    import torch

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was = model.training
    model.eval()
    n = data["chosen_input_ids"].shape[0]
    rc, rr = [], []
    with torch.inference_mode(), off:
        for i in range(0, n, batch_size):
            c, r = _policy_logps(model, {k: v[i:i + batch_size] for k, v in data.items()})
            rc.append(c)
            rr.append(r)
    model.train(was)
    return {"ref_chosen": torch.cat(rc), "ref_rejected": torch.cat(rr)}


def make_loss_fn(beta: float):
    """``loss_fn(model, batch) -> (loss, pairs)`` for tasks/trainer.train (pairs weight accumulation)."""

    def loss_fn(model, batch):
        pi_c, pi_r = _policy_logps(model, batch)
        loss, _ = dpo_loss(pi_c, pi_r, batch["ref_chosen"], batch["ref_rejected"], beta)
        return loss, int(pi_c.shape[0])

    return loss_fn


def evaluate(model, data: dict, beta: float, batch_size: int = 16) -> dict:
    """Held-out DPO loss, mean reward margin and accuracy (share of pairs with chosen above rejected)."""
    import torch

    was = model.training
    model.eval()
    n = data["chosen_input_ids"].shape[0]
    margins = []
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            b = {k: v[i:i + batch_size] for k, v in data.items()}
            pi_c, pi_r = _policy_logps(model, b)
            margins.append(dpo_loss(pi_c, pi_r, b["ref_chosen"], b["ref_rejected"], beta)[1])
    model.train(was)
    m = torch.cat(margins)
    loss = float(-torch.nn.functional.logsigmoid(m).mean())
    # The policy's own preference (no reference): log p(chosen) - log p(rejected), what a user sees.
    return {"loss": loss, "reward_margin": float(m.mean() / beta), "accuracy": float((m > 0).float().mean())}


def policy_margin(model, data: dict, batch_size: int = 16) -> float:
    """Mean log p(chosen) - log p(rejected) under ``model`` (reference-free)."""
    import torch

    was = model.training
    model.eval()
    n = data["chosen_input_ids"].shape[0]
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            c, r = _policy_logps(model, {k: v[i:i + batch_size] for k, v in data.items()})
            out.append(c - r)
    model.train(was)
    return float(torch.cat(out).mean())
