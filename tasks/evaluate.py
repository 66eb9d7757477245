"""evaluate: every model variant on the same held-out records, in one table.

Rows: ``base`` (finetune's base/, the model before training), ``tuned`` (base + the LoRA adapter,
unmerged, through peft), ``merged`` (finetune's merged/, what quantization starts from) and one per
quantize variant (``dynamic_int8``, ``onnx_fp32``, ``onnx_int8_static``, ``fp16``...). Each is loaded
through ``tasks.model.export.load_variant``, the loader the registry and the server use, so the numbers
describe the files that ship. An ONNX variant runs in ONNX Runtime: perplexity and top-1 come from
its logits, and generation is a greedy loop over its logits (no KV cache in the exported graph, so
each new token recomputes the sequence: correct, slower than the PyTorch ``generate``).
With ``evaluate.ablate: [augment]`` the stage also takes the no-augment branch's finetune output (a fifth
input) and adds ``tuned_no_augment`` after ``tuned`` (tasks/model/ablation.py), on the same records.

Metrics per variant, on the first ``max_records`` held-out records in id order (ids are content
hashes, so this is a fixed, order-free sample):

* perplexity = exp(mean NLL per target token) and top-1 token accuracy on the same tokens. Each
  record is rendered with the tokenize stage's prompt template and tokenized exactly as training
  tokenized it (prompt, target, eos; loss on target + eos), and scored on its own (no packing).
* top-1 agreement: the share of those scored positions whose argmax equals the merged fp32 model's.
* task metrics by ``metadata.task_type`` (up to ``generate_records`` records each):
  ``math_qa``: exact match of the final number (greedy generation; the number after "####", else
  the last number: GSM8K's convention); ``classification``: accuracy and macro-F1, the predicted label
  being the candidate label (the distinct held-out targets) with the highest log-probability; other
  records with an input (instruction, sft, ...): ROUGE-L F1 of the greedy generation against the
  target (rouge-score, stemmed); preference pairs (records with ``chosen``/``rejected``): preference
  accuracy = share of pairs where the variant's log p(chosen) - log p(rejected) exceeds the base model's
  (DPO's implicit-reward accuracy; ties half, so base = 0.5), and that mean margin.
* latency p50/p95 of one batch-1 forward pass over a fixed held-out record, after warm-up;
  throughput (requests/s and tokens/s) of the same forward at ``batch_size`` copies of it (scoring
  throughput; generation adds per-token decode work on top).
* size on disk (tuned: base + adapter), parameter count (n/a for ONNX), peak memory (growth of the
  process's resident set while the variant is loaded and scored, sampled every 5 ms; on CUDA the
  allocator's peak) and the training CPU-hours (GPU-hours on CUDA) behind every trained variant.

The deploy gate is not applied here (it belongs to the registry's config, and changing it must not
re-evaluate): ``tasks.registry`` checks it on these rows and renders the same table and chart with
pass/fail marks (``eval_markdown``/``plot_eval`` with ``gate``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from corpus2model.tasks.finetune import final_path, task_of
from corpus2model.tasks.model import ablation, classify, distill, grpo, rag, reward
from corpus2model.tasks.model import forgetting
from corpus2model.tasks.model.metrics import agreement, answers_match, extract_final_number, macro_f1, percentile, rouge_l  # noqa: F401  (extract_final_number: re-exported)
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "evaluate"
VERSION = "3"  # 3: held-out records exclude augmented copies (metadata.aug_method)
SECTIONS = ("evaluate",)

WARMUP_RUNS = 3
MATH_TASK = "math_qa"
CLASSIFICATION_TASK = "classification"
RSS_SAMPLE_S = 0.005  # peak-memory sampling interval
LATENCY_MAX_TOKENS = 128  # the latency probe: the first held-out record, capped at this length



# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def encode_for_scoring(record: dict, tokenizer, template: str, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, exactly as tokenize encodes it; over-long ones keep their end
    (the target is what is scored, and it comes last)."""
    from corpus2model.tasks.tokenize import encode_example, render

    prompt, target = render(record, template)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    ex = encode_example(p, t, tokenizer.eos_token_id)
    ids, labels = ex["input_ids"], ex["labels"]
    if max_len and len(ids) > max_len:
        ids, labels = ids[-max_len:], labels[-max_len:]
    return ids, labels


def _device(model):
    return getattr(model, "device", "cpu")


def score_tokens(model, tokenizer, records: list[dict], template: str) -> tuple[float, float, list[int]]:
    """(exp(mean NLL), top-1 accuracy, the argmax at every scored position) over the target tokens of
    ``records``, each scored on its own. The argmax list is what top-1 agreement compares."""
    import torch
    import torch.nn.functional as F

    max_len = getattr(model.config, "max_position_embeddings", None)
    nll, correct, n, preds = 0.0, 0, 0, []
    with torch.inference_mode():
        for rec in records:
            ids, labels = encode_for_scoring(rec, tokenizer, template, max_len)
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=_device(model))
            y = torch.tensor(labels[1:])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float().cpu()
            keep = y != -100
            if not bool(keep.any()):
                continue
            nll += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
            top = logits[keep].argmax(-1)
            correct += int((top == y[keep]).sum())
            preds += top.tolist()
            n += int(keep.sum())
    if n == 0:
        return float("nan"), float("nan"), []
    return math.exp(nll / n), correct / n, preds


def perplexity(model, tokenizer, records: list[dict], template: str) -> tuple[float, float]:
    """(exp(mean NLL), top-1 accuracy) over the target tokens of ``records``, each scored on its own."""
    ppl, acc, _ = score_tokens(model, tokenizer, records, template)
    return ppl, acc


def exact_match(model, tokenizer, records: list[dict], template: str, max_new_tokens: int) -> tuple[float | None, int]:
    """(share of math_qa records whose generated final number equals the reference's, records tried)."""
    from corpus2model.tasks.model.modeling import generate_text
    from corpus2model.tasks.tokenize import render

    math_records = [r for r in records if (r.get("metadata") or {}).get("task_type") == MATH_TASK]
    if not math_records:
        return None, 0
    prompts = [render(r, template)[0] for r in math_records]
    outputs = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    hits = sum(answers_match(out, r["target"]) for out, r in zip(outputs, math_records))
    return hits / len(math_records), len(math_records)


def generation_rouge(model, tokenizer, records: list[dict], template: str, max_new_tokens: int) -> tuple[float | None, int]:
    """(mean ROUGE-L F1 of greedy generations against the targets, records tried)."""
    from corpus2model.tasks.model.modeling import generate_text
    from corpus2model.tasks.tokenize import render

    if not records:
        return None, 0
    outputs = generate_text(model, tokenizer, [render(r, template)[0] for r in records],
                            max_new_tokens=max_new_tokens, temperature=0.0)
    return sum(rouge_l(o, r["target"]) for o, r in zip(outputs, records)) / len(records), len(records)


def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log p(continuation tokens + eos | prompt): the score that ranks labels and preference pairs."""
    import torch

    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) > limit:
        ids = ids[-limit:]
    start = max(1, len(ids) - len(c))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=_device(model)), use_cache=False).logits[0].float().cpu()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[pos - 1, ids[pos]] for pos in range(start, len(ids))))


def classification_scores(model, tokenizer, records: list[dict], template: str) -> tuple[float | None, float | None, int]:
    """(accuracy, macro-F1, records): each record's label is the candidate (the distinct targets among
    ``records``) the model gives the highest log-probability after the prompt."""
    from corpus2model.tasks.tokenize import render

    if not records:
        return None, None, 0
    labels = sorted({r["target"].strip() for r in records})
    truth, predicted = [], []
    for r in records:
        prompt = render(r, template)[0]
        scores = {lab: continuation_logprob(model, tokenizer, prompt, lab) for lab in labels}
        predicted.append(max(labels, key=lambda lab: (scores[lab], lab)))
        truth.append(r["target"].strip())
    acc = sum(t == p for t, p in zip(truth, predicted)) / len(truth)
    return acc, macro_f1(truth, predicted), len(records)


def preference_accuracy(model, tokenizer, pairs: list[dict], template: str) -> tuple[float | None, float | None, int, list[float]]:
    """(share of pairs with log p(chosen) > log p(rejected), mean margin in nats, pairs, the margins) on
    held-out preference records ``{"prompt", "chosen", "rejected"}`` (the prompt rendered with the template).
    The table reports these margins relative to the base row's (relative_preference)."""
    if not pairs:
        return None, None, 0, []
    wins, margins = 0, []
    for pr in pairs:
        prompt = template.format(input=pr["prompt"]) if pr.get("prompt") else ""
        m = continuation_logprob(model, tokenizer, prompt, pr["chosen"]) - \
            continuation_logprob(model, tokenizer, prompt, pr["rejected"])
        wins += m > 0
        margins.append(m)
    return wins / len(pairs), sum(margins) / len(margins), len(pairs), margins


def relative_preference(rows: list[dict]) -> None:
    """Preference accuracy as DPO measures it: a pair is won when the variant raised log p(chosen) -
    log p(rejected) above the base model's (the reference); ties count half, so the base row is 0.5.
    The raw ranking (log p(chosen) > log p(rejected)) mostly says which answer is shorter: on the demo's
    HH-RLHF pairs it was 0.634 for every variant, the untrained base included. It stays in eval.json as
    raw_preference_accuracy."""
    by = {r["variant"]: r for r in rows}
    ref = (by.get("base") or {}).get("_pair_margins")
    for r in rows:
        margins = r.pop("_pair_margins", None)
        if not ref or not margins or len(margins) != len(ref):
            continue
        rel = [m - b for m, b in zip(margins, ref)]
        r["raw_preference_accuracy"] = r["preference_accuracy"]
        r["preference_accuracy"] = _round((sum(d > 0 for d in rel) + 0.5 * sum(d == 0 for d in rel)) / len(rel), 4)
        r["preference_margin"] = _round(sum(rel) / len(rel), 4)


def _forward_seconds(model, x, runs: int, warmup: int) -> list[float]:
    """Wall seconds of ``runs`` forward passes over ``x`` after ``warmup`` untimed ones."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            _sync(model)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def forward_latency_ms(model, ids: list[int], runs: int, warmup: int = WARMUP_RUNS) -> tuple[float, float]:
    """(p50, p95) milliseconds of one batch-1 forward pass."""
    import torch

    times = [t * 1000.0 for t in _forward_seconds(model, torch.tensor([ids], device=_device(model)), runs, warmup)]
    return percentile(times, 50), percentile(times, 95)


def throughput(model, ids: list[int], batch_size: int, runs: int, warmup: int = 1) -> tuple[float, float]:
    """(requests/s, tokens/s) of forward passes over ``batch_size`` copies of ``ids`` (equal lengths, so
    no padding decides the figure), median batch time."""
    import torch

    t = percentile(_forward_seconds(model, torch.tensor([ids] * batch_size, device=_device(model)), runs, warmup), 50)
    return batch_size / t, batch_size * len(ids) / t


def _sync(model) -> None:
    if str(_device(model)).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class PeakMemory:
    """Peak growth of this process's resident set (MB) inside the ``with`` block, sampled by a thread
    from /proc/self/statm (Linux; ``mb`` stays None elsewhere). The sampler sleeps between reads, so it
    costs a few reads per 5 ms. A short spike between samples can be missed: a lower bound."""

    def __init__(self, interval: float = RSS_SAMPLE_S):
        self.interval, self.mb = interval, None

    @staticmethod
    def _rss() -> int | None:
        import os

        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        import threading

        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.start is not None:
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def __exit__(self, *exc):
        if self.start is None:
            return
        self._stop.set()
        self._thread.join()
        rss = self._rss()
        self.peak = max(self.peak, rss or 0)
        self.mb = round((self.peak - self.start) / 1e6, 2)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def held_out_records(shard: Manifest, split: str, max_records: int) -> tuple[list[dict], str, list[str]]:
    """The first ``max_records`` records (by id) of ``split``, falling back to validation, then train.

    Augmented records are left out: a rewrite lands in its parent's split, so a test split holds
    synthetic copies of its own records, and a model should be judged on the data as people wrote it
    (the ablation rows compare models with and without augmentation on exactly these records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import shard_files

    files = shard_files(shard)
    notes = []
    for name in dict.fromkeys([split, "validation", "train"]):
        paths = files.get(name) or []
        tables = [pq.read_table(p) for p in paths]
        table = pa.concat_tables(tables) if tables else None
        if table is not None and table.num_rows:
            if name != split:
                leak = " (records the model was trained on: perplexity is optimistic)" if name == "train" else ""
                notes.append(f"split {split!r} is empty or missing; evaluated on {name!r} instead{leak}")
            rows = sorted(table.to_pylist(), key=lambda r: r["id"])
            original = [r for r in rows if not (r.get("metadata") or {}).get("aug_method")]
            if len(original) < len(rows):
                notes.append(f"{len(rows) - len(original)} augmented records of split {name!r} left out: "
                             f"scored on original records only")
            if original:
                return original[:max_records], name, notes
    raise StageError(f"{shard.path}: no records in split {split!r}, 'validation' or 'train' to evaluate on")


def variant_folders(finetune: Manifest, quantize: Manifest) -> dict[str, Path | tuple[Path, Path]]:
    """Row name -> the folder it loads from; ``tuned`` is (base folder, adapter folder) when finetune
    saved an adapter (served unmerged), else the merged/full model folder."""
    st = finetune.stats
    base = finetune.dir / (st.get("base_dir") or "base")
    merged = finetune.dir / st["merged_dir"] if st.get("merged_dir", "merged") else None
    adapter = finetune.dir / st["adapter_dir"] if st.get("adapter_dir", "adapter") else None
    out: dict = {"base": base}
    if adapter is not None and adapter.is_dir():
        out["tuned"] = (base, adapter)
    elif merged is not None:
        out["tuned"] = merged
    if merged is not None:
        out["merged"] = merged
    for method in quantize.stats.get("methods", []):
        out[method] = quantize.dir / method
    if "tuned" not in out:
        raise StageError(f"{finetune.path}: the finetune output has neither an adapter nor a merged model")
    for name, folder in out.items():
        folder = folder[0] if isinstance(folder, tuple) else folder
        if not (folder / "config.json").is_file():
            raise StageError(f"variant {name}: {folder} holds no saved model; rerun the stage that writes it")
    return out


def load_row_model(source, threads: int = 0):
    """(model, tokenizer, bytes on disk) for a variant_folders() entry."""
    from corpus2model.tasks.model.export import load_variant
    from corpus2model.tasks.model.modeling import folder_size_bytes

    if isinstance(source, tuple):  # base + adapter, unmerged: what serving an adapter costs
        from corpus2model.tasks.model.peft_methods import load_tuned

        base, adapter = source
        model, tokenizer = load_tuned(base, adapter)
        return model, tokenizer, folder_size_bytes(base) + folder_size_bytes(adapter)
    return (*load_variant(source, threads), folder_size_bytes(source))


def heldout_pairs(finetune: Manifest, records: list[dict]) -> list[dict]:
    """Held-out preference pairs: the ones a DPO finetune set aside (``heldout_pairs.jsonl`` in its
    output), else held-out records that carry ``chosen``/``rejected``."""
    path = finetune.dir / "heldout_pairs.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r.get("chosen") and r.get("rejected")]


def task_groups(records: list[dict], limit: int, pairs: list[dict] | None = None,
                pair_limit: int | None = None) -> dict[str, list[dict]]:
    """The held-out records each task metric is computed on (at most ``limit`` each; preference pairs at
    most ``pair_limit``: scoring a pair is two forward passes, not a generation, so it can afford more)."""
    def tt(r):
        return (r.get("metadata") or {}).get("task_type")

    groups = {
        "math": [r for r in records if tt(r) == MATH_TASK],
        "classification": [r for r in records if tt(r) == CLASSIFICATION_TASK],
        "generation": [r for r in records if tt(r) not in (MATH_TASK, CLASSIFICATION_TASK)
                       and r.get("input") and not r.get("chosen")],
    }
    out = {k: v[:limit] for k, v in groups.items()}
    out["preference"] = list(pairs or [])[:limit if pair_limit is None else pair_limit]
    return out


def evaluate_variant(source, records: list[dict], groups: dict[str, list[dict]], template: str, ec,
                     latency_ids: list[int], latency=None) -> tuple[dict, list[int]]:
    """One row of the table, and the argmax predictions (for top-1 agreement). ``latency(model) -> (p50,
    p95)`` replaces the plain forward timing where a row's request costs more (rag: retrieval first)."""
    from corpus2model.tasks.model.modeling import count_params

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        model, tokenizer, size = load_row_model(source, ec.threads)
        cuda = str(_device(model)).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        ppl, acc, preds = score_tokens(model, tokenizer, records, template)
        em, n_math = exact_match(model, tokenizer, groups["math"], template, ec.max_new_tokens)
        rl, n_gen = generation_rouge(model, tokenizer, groups["generation"], template, ec.max_new_tokens)
        cacc, cf1, n_cls = classification_scores(model, tokenizer, groups["classification"], template)
        pacc, pmargin, n_pref, pair_margins = preference_accuracy(model, tokenizer, groups["preference"], template)
        p50, p95 = latency(model) if latency else forward_latency_ms(model, latency_ids, ec.latency_runs)
        rps, tps = throughput(model, latency_ids, ec.batch_size, ec.throughput_runs)
    peak = mem.mb
    if cuda:
        import torch

        peak = round(torch.cuda.max_memory_allocated() / 1e6, 2)
    params = None if not any(True for _ in model.parameters()) else count_params(model)
    row = {
        "perplexity": _round(ppl, 4),
        "token_accuracy": _round(acc, 4),
        "exact_match": _round(em, 4),
        "rouge_l": _round(rl, 4),
        "accuracy": _round(cacc, 4),
        "macro_f1": _round(cf1, 4),
        "preference_accuracy": _round(pacc, 4),
        "preference_margin": _round(pmargin, 4),
        "latency_p50_ms": round(p50, 3),
        "latency_p95_ms": round(p95, 3),
        "requests_per_s": round(rps, 2),
        "tokens_per_s": round(tps, 1),
        "size_mb": round(size / 1e6, 3),
        "params": params,
        "peak_memory_mb": peak,
        "records": len(records),
        "generated": n_math + n_gen,
        "classified": n_cls,
        "pairs": n_pref,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if pair_margins:
        row["_pair_margins"] = pair_margins  # made relative to the base row's by relative_preference
    return row, preds


def _round(x: float | None, nd: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


def training_hours(ft: Manifest) -> tuple[float | None, str]:
    """(hours, "cpu"|"gpu") of the fine-tuning run: wall seconds x threads on CPU, wall seconds on GPU."""
    s = ft.stats
    if not s.get("seconds"):
        return None, "cpu"
    if str(s.get("device", "cpu")).startswith("cuda"):
        return round(s["seconds"] / 3600, 5), "gpu"
    return round(s["seconds"] * (s.get("threads") or 1) / 3600, 5), "cpu"


def score_finetune(ft: Manifest, records: list[dict], groups: dict[str, list[dict]], template: str, ec,
                   seq_len: int) -> tuple[dict, list[int]]:
    """The tuned model of another finetune output (an evaluate.ablate branch's) scored like ``tuned``, with a
    latency probe encoded by its own tokenizer (its ids need not exist in the main run's vocabulary)."""
    from corpus2model.tasks.tokenize import load_tokenizer

    folders = variant_folders(ft, Manifest(stage="quantize"))
    probe, _ = encode_for_scoring(records[0], load_tokenizer(folders["base"]), template, min(seq_len, LATENCY_MAX_TOKENS))
    row, preds = evaluate_variant(folders["tuned"], records, groups, template, ec, probe)
    return {**row, "format": "peft" if isinstance(folders["tuned"], tuple) else "hf"}, preds


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 4 + len(cfg.evaluate.ablate):
        raise StageError(f"evaluate takes four upstream manifests (shard, tokenize, finetune, quantize) and one "
                         f"finetune per evaluate.ablate target {cfg.evaluate.ablate}, got {len(inputs)}")
    if task_of(inputs[2]) == "classification":  # the finetune output says what it is: tasks/model/classify.py
        return classify.evaluate_run(inputs, cfg, out_dir, ctx, held_out_records(inputs[0], cfg.evaluate.split, 10**9))
    if task_of(inputs[2]) == "reward":  # preference accuracy on held-out pairs: tasks/model/reward.py
        return reward.evaluate_run(inputs, cfg, out_dir, ctx)
    import torch

    from corpus2model.tasks.common.artifacts import publish_image, publish_markdown, publish_table
    from corpus2model.tasks.tokenize import load_tokenizer

    shard, tok, ft, quant, *ablated = inputs
    ec = cfg.evaluate
    template = tok.stats.get("prompt_template")
    if template is None:
        raise StageError(f"{tok.path}: the tokenize manifest has no stats.prompt_template")
    try:
        records, split, notes = held_out_records(shard, ec.split, ec.max_records)
    except StageError:
        # A corpus of preference pairs only (DPO): no record to compute perplexity on; the rows score the
        # pairs the finetune stage held out, and the latency probe is one of them.
        if not heldout_pairs(ft, []):
            raise
        records, split = [], "validation (preference pairs)"
        notes = ["no held-out training records (a corpus of preference pairs only): perplexity, token accuracy "
                 "and the task metrics are n/a; the rows score the pairs finetune held out"]
    groups = task_groups(records, ec.generate_records, heldout_pairs(ft, records), ec.max_records)
    if not groups["math"] and records:
        notes.append(f"no {MATH_TASK} records among the held-out records: exact_match is n/a")

    folders = variant_folders(ft, quant)
    # One fixed input for every variant's latency, tokenized with the shared tokenizer.
    tokenizer = load_tokenizer(folders["base"])
    seq_len = int(tok.stats.get("seq_len") or LATENCY_MAX_TOKENS)
    probe = records[0] if records else {"input": groups["preference"][0]["prompt"],
                                         "target": groups["preference"][0]["chosen"]}
    latency_ids, _ = encode_for_scoring(probe, tokenizer, template, min(seq_len, LATENCY_MAX_TOKENS))
    hours, hw = training_hours(ft)
    quant_stats = quant.stats

    threads_before = torch.get_num_threads()
    if ec.threads > 0:
        torch.set_num_threads(ec.threads)
    threads = torch.get_num_threads()
    rows, preds = [], {}
    try:
        for variant, source in folders.items():
            row, preds[variant] = evaluate_variant(source, records, groups, template, ec, latency_ids)
            row = {"variant": variant, **row,
                   "format": (quant_stats.get(variant) or {}).get("kind", "peft" if isinstance(source, tuple) else "hf"),
                   f"train_{hw}_hours": None if variant == "base" else hours}
            ctx.info("evaluate %s: %s", variant, row)
            rows.append(row)
        for row, pred in rag.rows(shard, records, groups, folders, template, seq_len, ec, evaluate_variant,
                                  notes, ctx.info):  # evaluate.rag: the retrieval baseline rows (off by default)
            rows.append(row)
            preds[row["variant"]] = pred
        for row, pred in distill.teacher_rows(  # a distill run: the teacher's row beside the student's
                ft.stats, lambda src: evaluate_variant(src, records, groups, template, ec, latency_ids), notes):
            rows.append(row)
            preds[row["variant"]] = pred
        grpo.add_reward_column(rows, folders, load_row_model, groups["math"], template, ec, ft.stats)  # a grpo run
        ablation.add_rows(rows, preds, dict(zip(ec.ablate, ablated)),  # evaluate.ablate: tuned_no_<target> after tuned
                          lambda m: score_finetune(m, records, groups, template, ec, seq_len), training_hours, notes)
        # finetune.init production/path: parent (base) and tuned on the parent's test records, forgetting
        notes += forgetting.add_rows(rows, ft, ec.max_records, lambda v, recs: score_tokens(
            *load_row_model(folders[v], ec.threads)[:2], recs, template)[0])
    finally:
        torch.set_num_threads(threads_before)
    relative_preference(rows)
    ref = "merged" if "merged" in preds else "tuned"
    for row in rows:  # against the fp32 model every variant was made from
        row["top1_agreement"] = _round(agreement(preds[row["variant"]], preds[ref]), 4)
    if records and any(r["perplexity"] is None for r in rows):
        notes.append("a variant has no finite perplexity (no target tokens scored, or the model diverged)")
    if any(r["format"] == "onnx" for r in rows):
        notes.append("onnx rows run in ONNX Runtime (CPU); their generation is a greedy loop without KV cache")

    report = {"rows": rows, "split": split, "notes": notes, "threads": threads, "batch_size": ec.batch_size,
              "latency_tokens": len(latency_ids), "task_records": {k: len(v) for k, v in groups.items()}}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = eval_markdown(rows, split, notes)
    (out_dir / "eval.md").write_text(md, encoding="utf-8")
    plot_eval(rows, out_dir / "eval.png")

    publish_table("evaluation", rows, f"held-out {split} split, {len(records)} records")
    publish_markdown("evaluation-summary", md, "evaluation table")
    publish_image("evaluation-chart", str(final_path(out_dir, ctx, "eval.png")), "perplexity and latency per variant")
    files = [FileEntry("eval.json", role="report"), FileEntry("eval.md", role="report"),
             FileEntry("eval.png", role="report")]
    by = {r["variant"]: r for r in rows}
    stats = {"split": split, "records": len(records), "generated": sum(len(v) for v in groups.values()),
             "notes": notes, "variants": list(by),
             "perplexity": {v: r["perplexity"] for v, r in by.items()},
             "latency_p50_ms": {v: r["latency_p50_ms"] for v, r in by.items()}}
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)


# ---------------------------------------------------------------------------------------------
# the table and the chart (also rendered by the registry with the gate's marks)
# ---------------------------------------------------------------------------------------------
COLUMNS = [("variant", "variant"), ("format", "format"), ("perplexity", "perplexity"),
           ("token_accuracy", "token acc"), ("top1_agreement", "top-1 vs fp32"), ("exact_match", "exact match"),
           ("rouge_l", "ROUGE-L"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
           ("preference_accuracy", "pref acc"), ("reward", "reward"), ("old_test_perplexity", "ppl old test"),
           ("forgetting", "forgetting"), ("latency_p50_ms", "p50 ms"), ("latency_p95_ms", "p95 ms"),
           ("retrieval_p50_ms", "retrieval p50 ms"), ("retrieval_p95_ms", "retrieval p95 ms"),
           ("requests_per_s", "requests/s"), ("tokens_per_s", "tokens/s"), ("size_mb", "size MB"),
           ("peak_memory_mb", "peak mem MB"), ("params", "params"), ("train_cpu_hours", "train CPU-h"),
           ("train_gpu_hours", "train GPU-h")]
LOWER_IS_BETTER = {"perplexity", "old_test_perplexity", "forgetting", "latency_p50_ms", "latency_p95_ms", "retrieval_p50_ms", "retrieval_p95_ms",
                   "size_mb", "peak_memory_mb"}


def gate_marks(gate: dict | None, rows: list[dict] | None = None) -> dict[str, str]:
    """variant -> "pass"/"fail" from a registry gate result (tasks.registry.check_gate). With ``rows``,
    every other variant gets "within"/"outside": whether it would pass the served variant's bound
    (informational: only the served variant decides the gate)."""
    marks: dict[str, str] = {}
    bound = None
    for c in (gate or {}).get("checks", []):
        variant = c.get("variant") or c["name"].split("_vs_")[0]
        # tuned is checked more than once (vs base, vs tuned_no_augment): one failed check marks it failed
        marks[variant] = "pass" if c["passed"] and marks.get(variant) != "fail" else "fail"
        if c["name"].endswith("_vs_tuned"):
            bound = c.get("threshold")
    if gate and rows and bound is not None:
        metric = gate["metric"]
        for r in rows:
            v = r.get(metric)
            # an ablation row is a reference to compare tuned with, never a candidate to serve
            if r["variant"] in marks or r["variant"] in ("base", "tuned") or ablation.is_ablation_row(r["variant"]) or v is None:
                continue
            if r["variant"].startswith(rag.ROW_PREFIX):  # so is a retrieval baseline row
                continue
            ok = v <= bound if metric in LOWER_IS_BETTER else v >= bound
            marks[r["variant"]] = "within" if ok else "outside"
    return marks


def eval_markdown(rows: list[dict], split: str, notes: list[str], gate: dict | None = None) -> str:
    def cell(v):
        return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))

    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows) or k in ("variant", "perplexity")]
    marks = gate_marks(gate, rows)
    if gate:
        cols.insert(1, ("_gate", "gate"))
    lines = [f"# Evaluation ({split} split)", ""]
    if gate:
        lines += [f"Deploy gate on **{gate['metric']}** (served: {gate['serve_variant']}): "
                  f"**{'PASSED' if gate['passed'] else 'FAILED'}** ({gate['reason']})", ""]
    lines += ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = {**r, "_gate": marks.get(r["variant"], "")}
        lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |")
    lines += [""] + [f"> {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_eval(rows: list[dict], path: Path, metric: str = "perplexity", gate: dict | None = None) -> None:
    """Bars of the main metric and of batch-1 latency per variant; with a gate, each checked variant's
    bar is green (pass) or red (fail) and the gate thresholds are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    marks = gate_marks(gate, rows)
    colors = [{"pass": "tab:green", "fail": "tab:red", "within": "tab:olive", "outside": "tab:orange"}.get(marks.get(n), "tab:gray" if n == "base" else "tab:blue")
              for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(names) * 2), 3.8))
    vals = [r.get(metric) if r.get(metric) is not None else 0.0 for r in rows]
    bars = a1.bar(names, vals, color=colors)
    if metric == "perplexity":
        a1.set_yscale("log")
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    a1.set_title(f"{metric} ({better} is better)")
    for bar, n in zip(bars, names):
        if n in marks:
            a1.annotate(marks[n].upper() if marks[n] in ("pass", "fail") else marks[n],
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, color="tab:red" if marks[n] in ("fail", "outside") else "tab:green")
    for c in (gate or {}).get("checks", []):
        if c.get("threshold") is not None:
            a1.axhline(c["threshold"], ls="--", lw=0.8, color="black", alpha=0.5)
    p50 = [r.get("latency_p50_ms") or 0.0 for r in rows]
    err = [max(0.0, (r.get("latency_p95_ms") or 0.0) - p) for r, p in zip(rows, p50)]
    a2.bar(names, p50, yerr=[[0] * len(err), err], capsize=4, color="tab:purple")
    a2.set_title("batch-1 forward latency ms (p50, bar to p95)")
    for ax in (a1, a2):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    if gate:
        fig.suptitle(f"deploy gate {'PASSED' if gate['passed'] else 'FAILED'}",
                     color="tab:green" if gate["passed"] else "tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
