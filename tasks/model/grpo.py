"""GRPO (``finetune.objective: grpo``): learning from a verifiable reward on GSM8K-style math prompts.

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer computes it:
for each prompt, ``num_generations`` completions are sampled from the current policy; each gets a
rule-based reward; a completion's advantage is its reward minus its group's mean, over the group's
standard deviation (a group whose completions all score the same teaches nothing: advantage 0). The loss
per completion token is PPO's clipped surrogate

    -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + beta * KL_k3(policy || reference)

with ``ratio = pi(token) / pi_old(token)`` (pi_old: the policy that sampled the group; the clip acts when
``num_iterations`` > 1 reuses a group for several optimizer steps) and the k3 estimate
``exp(ref - logp) - (ref - logp) - 1`` of the KL to the model before training (adapters disabled, or a
frozen copy for ``full``), only computed when ``beta`` > 0. The loss is averaged over all completion
tokens of a micro-batch and micro-batches are weighted by their token counts (TRL's "dapo"
normalisation): long completions are not down-weighted per token. Log-probabilities are those of the
sampling distribution (logits / temperature), as TRL computes them.

Reward (``reward``): ``format_weight`` (0.5) when the completion contains ``#### <number>``, plus
``correct_weight`` (1.0) when that number equals the reference's final number (the GSM8K number extractor
of tasks/model/metrics.py, the one the evaluation's exact match uses). Range [0, 1.5]. The format part is
learnable by a tiny model whose arithmetic is hopeless; the correctness part is what a real model earns.

Why the shared loop (tasks/model/trainer.py) and not TRL's GRPOTrainer: as for DPO, TRL would bring its
own Trainer (its checkpoints, schedule and data loader) next to ours; here sampling is the batch getter
(``GroupBatches``: prompts in the trainer's seeded order, completions drawn with torch's generator, whose
state our checkpoints save), so GRPO gets the same resumable checkpoints, warmup/cosine schedule,
clipping, accumulation, evaluation and early stopping as SFT and DPO, in ~200 lines. The price: no vLLM
generation and no multi-process sampling (a tiny CPU model does not need them).

Prompts are the shard stage's ``math_qa`` records (``metadata.task_type``) of the train split rendered
with the tokenize stage's prompt template; the held-out evaluation (``evaluate`` of the 7-tuple, the
loop's eval "loss") is minus the mean reward of greedy completions on the first ``heldout_prompts``
validation records (test when validation has none), so lower is better as for every other objective.
"""
from __future__ import annotations

import math
import re

from corpus2model.tasks.model.metrics import answers_match
from corpus2model.tasks.model.trainer import Batches, batch_order
from corpus2model.tasks.stage import Manifest, StageError

MATH_TASK = "math_qa"
IGNORE_INDEX = -100
# "####" then a number (optionally signed, with thousands commas or decimals): GSM8K's final-answer line.
ANSWER_FORMAT = re.compile(r"####\s*-?(?:\d|\.\d)")


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def reward(completion: str, reference: str, format_weight: float = 0.5, correct_weight: float = 1.0) -> float:
    """Format part (the completion has ``#### <number>``) + correctness part (that number is the reference's)."""
    if not ANSWER_FORMAT.search(completion or ""):
        return 0.0
    return format_weight + (correct_weight if answers_match(completion, reference) else 0.0)


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - group mean) / (group std + eps) for consecutive groups of ``group_size`` rewards (a tensor)."""
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def clipped_loss(logp, old_logp, advantages, mask, clip_eps: float, beta: float = 0.0, ref_logp=None):
    """(mean per completion token of the GRPO loss, completion tokens). ``logp``/``old_logp``/``ref_logp``
    [N, L] per-token log-probs, ``advantages`` [N], ``mask`` [N, L] (1 on completion tokens)."""
    import torch

    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    if beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    m = mask.to(per_token.dtype)
    n = int(m.sum())
    if n == 0:
        return (logp * 0.0).sum(), 0
    return (per_token * m).sum() / n, n


def token_logps(model, input_ids, temperature: float = 1.0):
    """[N, L-1] log-probability of each next token under ``model`` at ``temperature``. Rows are
    right-padded: a real token never attends to the padding after it, so no mask is needed."""
    import torch

    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def math_records(shard: Manifest, splits: list[str]) -> tuple[list[dict], str | None]:
    """(the math_qa records of the first split in ``splits`` that has any, sorted by id; that split).
    Read through ``datasets`` as every fine-tuning input is."""
    import datasets

    from corpus2model.tasks.tokenize import shard_files

    files = shard_files(shard)
    datasets.disable_progress_bars()
    for split in splits:
        paths = [str(p) for p in files.get(split) or []]
        if not paths:
            continue
        ds = datasets.load_dataset("parquet", data_files={split: paths}, split=split, streaming=True)
        out = []
        for b in ds.select_columns(["id", "input", "target", "metadata"]).iter(batch_size=1000):
            for i, x, t, m in zip(b["id"], b["input"], b["target"], b["metadata"]):
                if (m or {}).get("task_type") == MATH_TASK and x and t:
                    out.append({"id": i, "input": x, "target": t})
        if out:
            return sorted(out, key=lambda r: r["id"]), split
    return [], None


# ---------------------------------------------------------------------------------------------
# sampling and scoring
# ---------------------------------------------------------------------------------------------
def sample_group(model, tokenizer, prompt: str, reference: str, gc) -> dict:
    """``num_generations`` sampled completions of one prompt, as right-padded rows with their rewards."""
    import torch

    from corpus2model.tasks.model.modeling import _prompt_ids

    ids, budget = _prompt_ids(model, tokenizer, prompt, gc.max_new_tokens)
    if budget <= 0:
        raise StageError(f"prompt {prompt[:60]!r} leaves no room for a completion within the model's "
                         f"max_position_embeddings; lower finetune.grpo.max_new_tokens or use shorter prompts")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    x = torch.tensor([ids] * gc.num_generations, device=next(model.parameters()).device)
    with torch.no_grad():
        seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=budget, do_sample=True,
                             temperature=float(gc.temperature), top_k=0, top_p=1.0, eos_token_id=eos,
                             pad_token_id=pad)
    rows, texts = [], []
    for s in seq[:, len(ids):].tolist():
        new = s[: s.index(eos) + 1] if eos in s else s  # the eos is a choice the policy made: it is trained
        rows.append(ids + new)
        texts.append(tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True))
    return {"rows": rows, "prompt_len": len(ids), "texts": texts,
            "rewards": [reward(t, reference, gc.format_weight, gc.correct_weight) for t in texts]}


def _reference_context(model, ref_model):
    import contextlib

    if ref_model is None and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def make_group_batch(model, tokenizer, prompts: list[dict], template: str, gc, ref_model=None, pad_id: int = 0) -> dict:
    """Sample every prompt's group and return the tensors the loss needs: ``input_ids``,
    ``attention_mask``, ``completion_mask`` [N, L-1], ``old_logps``, ``advantages``, ``rewards``
    (and ``ref_logps`` when beta > 0). The model samples and scores in eval mode (no dropout)."""
    import torch

    from corpus2model.tasks.tokenize import render

    was = model.training
    model.eval()
    groups = [sample_group(model, tokenizer, render(p, template)[0], p["target"], gc) for p in prompts]
    rows = [r for g in groups for r in g["rows"]]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width - 1), dtype=torch.long)
    i = 0
    for g in groups:
        for r in g["rows"]:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            comp[i, g["prompt_len"] - 1:len(r) - 1] = 1  # position t predicts token t + 1
            i += 1
    ids = ids.to(device)
    rewards = torch.tensor([x for g in groups for x in g["rewards"]])
    out = {"input_ids": ids, "attention_mask": mask.to(device), "completion_mask": comp.to(device),
           "advantages": group_advantages(rewards, gc.num_generations).to(device), "rewards": rewards.to(device)}
    with torch.no_grad():
        out["old_logps"] = token_logps(model, ids, gc.temperature)
        if gc.beta > 0:
            with _reference_context(model, ref_model):
                out["ref_logps"] = token_logps(ref_model or model, ids, gc.temperature)
    model.train(was)
    return out


def make_loss_fn(gc):
    """``loss_fn(model, batch) -> (loss, completion tokens)`` for tasks/model/trainer.train."""

    def loss_fn(model, batch):
        logp = token_logps(model, batch["input_ids"], gc.temperature)
        return clipped_loss(logp, batch["old_logps"], batch["advantages"], batch["completion_mask"], gc.clip_eps,
                            gc.beta, batch.get("ref_logps"))

    return loss_fn


def mean_reward(model, tokenizer, records: list[dict], template: str, max_new_tokens: int,
                format_weight: float = 0.5, correct_weight: float = 1.0) -> float | None:
    """Mean reward of greedy completions of ``records`` (math_qa: input, target); None without records."""
    from corpus2model.tasks.model.modeling import generate_text
    from corpus2model.tasks.tokenize import render

    if not records:
        return None
    was = model.training
    model.eval()
    outs = generate_text(model, tokenizer, [render(r, template)[0] for r in records], max_new_tokens, 0.0)
    model.train(was)
    return sum(reward(o, r["target"], format_weight, correct_weight) for o, r in zip(outs, records)) / len(records)


class GroupBatches(Batches):
    """Group batches for the shared loop: micro-batch ``j`` of optimizer step ``s`` is the sampled group
    batch of prompt batch ``(s // num_iterations) * grad_accum + j`` of the seeded order, sampled when a
    round of ``num_iterations`` steps begins and handed out again for the round's other steps. The
    position (micro-batches consumed) is still the whole state a checkpoint needs; a run resumed in the
    middle of a round samples that round's groups anew."""

    def __init__(self, n: int, sample, batch_size: int, seed: int, grad_accum: int, num_iterations: int):
        super().__init__(n, sample, batch_size, seed)
        self.grad_accum, self.num_iterations = grad_accum, num_iterations
        self._round, self._cache = None, {}

    def __next__(self) -> dict:
        step, j = divmod(self.position, self.grad_accum)
        rnd = step // self.num_iterations
        if rnd != self._round:
            self._round, self._cache = rnd, {}
        if j not in self._cache:
            per_epoch = -(-self.n // self.batch_size)
            epoch, i = divmod(rnd * self.grad_accum + j, per_epoch)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, batch_order(self.n, self.batch_size, self.seed, epoch)
            self._cache[j] = self.get(self._order[i])
        self.position += 1
        return self._cache[j]


# ---------------------------------------------------------------------------------------------
# the finetune objective
# ---------------------------------------------------------------------------------------------
def setup(tok: Manifest, shard: Manifest, ft, model, tokenizer):
    """The finetune 7-tuple for ``objective: grpo``: group batches of the train split's math prompts,
    evaluation = minus the mean greedy reward on held-out math prompts, the clipped GRPO loss."""
    import copy

    gc = ft.grpo
    template = tok.stats.get("prompt_template")
    if template is None:
        raise StageError(f"{tok.path}: the tokenize manifest has no stats.prompt_template")
    train, _ = math_records(shard, ["train"])
    if not train:
        raise StageError(f"{shard.path}: the train split has no {MATH_TASK} records (metadata.task_type) with an "
                         f"input and a '#### N' target: GRPO has no prompts to learn from")
    if gc.max_prompts:
        train = train[:gc.max_prompts]
    held, held_split = math_records(shard, ["validation", "test"])
    notes = []
    if not held:
        held, held_split = train, "train"
        notes.append("no validation/test math_qa records: the held-out reward is measured on train prompts")
    held = held[:gc.heldout_prompts]
    ref_model = None
    if gc.beta > 0 and not hasattr(model, "disable_adapter"):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: a frozen copy
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = lambda idx: make_group_batch(model, tokenizer, [train[i] for i in idx], template, gc, ref_model, pad)  # noqa: E731
    batches = GroupBatches(len(train), sample, ft.batch_size, ft.seed, ft.grad_accum, gc.num_iterations)
    evaluate = lambda: -mean_reward(model, tokenizer, held, template, gc.max_new_tokens,  # noqa: E731
                                    gc.format_weight, gc.correct_weight)
    extra = {"grpo": {"heldout_split": held_split, "heldout_prompts": len(held), "train_prompts": len(train),
                      "format_weight": gc.format_weight, "correct_weight": gc.correct_weight,
                      "num_generations": gc.num_generations, "max_new_tokens": gc.max_new_tokens}}
    return batches, evaluate, make_loss_fn(gc), len(train), len(held), notes, extra


def add_reward_column(rows: list[dict], folders: dict, load, records: list[dict], template: str, ec,
                      finetune_stats: dict) -> None:
    """The evaluation table's ``reward`` column for the base and tuned rows: mean reward of greedy
    completions of the held-out math records, with the weights the GRPO run trained on. Only for a
    finetune output that says objective grpo (other runs keep their table as it was). ``load(source)``
    is evaluate's row loader -> (model, tokenizer, bytes)."""
    g = finetune_stats.get("grpo") if finetune_stats.get("objective") == "grpo" else None
    if not g:
        return
    for row in rows:
        if row["variant"] not in ("base", "tuned") or row["variant"] not in folders:
            continue
        model, tokenizer, _ = load(folders[row["variant"]])
        r = mean_reward(model, tokenizer, records, template, ec.max_new_tokens, g["format_weight"], g["correct_weight"])
        row["reward"] = None if r is None or not math.isfinite(r) else round(r, 4)
