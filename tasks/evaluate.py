"""evaluate: every model variant on the same held-out records, in one table.

Variants: ``base`` (finetune's base/, the model before training), ``tuned`` (finetune's merged/)
and one per quantize method (``dynamic_int8``). Each is loaded through
``tasks.modeling.load_causal_lm``, the loader the registry and the server use, so the numbers
describe the files that ship.

Metrics per variant, on the first ``max_records`` held-out records in id order (ids are content
hashes, so this is a fixed, order-free sample):

* perplexity = exp(mean NLL per target token) and top-1 token accuracy on the same tokens. Each
  record is rendered with the tokenize stage's prompt template and tokenized exactly as training
  tokenized it (prompt, target, eos; loss on target + eos), and scored on its own (no packing).
* exact_match on up to ``generate_records`` ``math_qa`` records: greedy generation, final answer
  = the number after "####", else the last number (GSM8K's convention), compared numerically.
* latency p50/p95 of one batch-1 forward pass over a fixed held-out record, after warm-up.
* size on disk and parameter count.

Baseline parts (replaced by later issues): no task-specific metrics besides math exact match,
no confidence intervals.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "evaluate"
VERSION = "1"
SECTIONS = ("evaluate",)

WARMUP_RUNS = 3
MATH_TASK = "math_qa"
LATENCY_MAX_TOKENS = 128  # the latency probe: the first held-out record, capped at this length

# A number: optional sign, digits with optional thousands commas ("1,234"), optional decimals; or ".5".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def extract_final_number(text: str | None) -> float | None:
    """GSM8K-style final answer: the first number after the last "####", else the last number in the text."""
    if not text:
        return None
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _to_float(found[0])
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def answers_match(predicted: str, reference: str, tol: float = 1e-6) -> bool:
    want, got = extract_final_number(reference), extract_final_number(predicted)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tol)


def encode_for_scoring(record: dict, tokenizer, template: str, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, exactly as tokenize encodes it; over-long ones keep their end
    (the target is what is scored, and it comes last)."""
    from tasks.tokenize import encode_example, render

    prompt, target = render(record, template)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    ex = encode_example(p, t, tokenizer.eos_token_id)
    ids, labels = ex["input_ids"], ex["labels"]
    if max_len and len(ids) > max_len:
        ids, labels = ids[-max_len:], labels[-max_len:]
    return ids, labels


def perplexity(model, tokenizer, records: list[dict], template: str) -> tuple[float, float]:
    """(exp(mean NLL), top-1 accuracy) over the target tokens of ``records``, each scored on its own."""
    import torch
    import torch.nn.functional as F

    max_len = getattr(model.config, "max_position_embeddings", None)
    nll, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for rec in records:
            ids, labels = encode_for_scoring(rec, tokenizer, template, max_len)
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            y = torch.tensor(labels[1:])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            keep = y != -100
            if not bool(keep.any()):
                continue
            nll += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == y[keep]).sum())
            n += int(keep.sum())
    if n == 0:
        return float("nan"), float("nan")
    return math.exp(nll / n), correct / n


def exact_match(model, tokenizer, records: list[dict], template: str, max_new_tokens: int) -> tuple[float | None, int]:
    """(share of math_qa records whose generated final number equals the reference's, records tried)."""
    from tasks.modeling import generate_text
    from tasks.tokenize import render

    math_records = [r for r in records if (r.get("metadata") or {}).get("task_type") == MATH_TASK]
    if not math_records:
        return None, 0
    prompts = [render(r, template)[0] for r in math_records]
    outputs = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    hits = sum(answers_match(out, r["target"]) for out, r in zip(outputs, math_records))
    return hits / len(math_records), len(math_records)


def forward_latency_ms(model, ids: list[int], runs: int, warmup: int = WARMUP_RUNS) -> tuple[float, float]:
    """(p50, p95) milliseconds of one batch-1 forward pass."""
    import torch

    x = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return _percentile(times, 50), _percentile(times, 95)


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def held_out_records(shard: Manifest, split: str, max_records: int) -> tuple[list[dict], str, list[str]]:
    """The first ``max_records`` records (by id) of ``split``, falling back to validation, then train."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.tokenize import shard_files

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
            return rows[:max_records], name, notes
    raise StageError(f"{shard.path}: no records in split {split!r}, 'validation' or 'train' to evaluate on")


def variant_folders(finetune: Manifest, quantize: Manifest) -> dict[str, Path]:
    out = {"base": finetune.dir / finetune.stats.get("base_dir", "base"),
           "tuned": finetune.dir / finetune.stats.get("merged_dir", "merged")}
    for method in quantize.stats.get("methods", []):
        out[method] = quantize.dir / method
    for name, folder in out.items():
        if not (folder / "config.json").is_file():
            raise StageError(f"variant {name}: {folder} holds no saved model; rerun the stage that writes it")
    return out


def evaluate_variant(folder: Path, records: list[dict], math_records: list[dict], template: str, ec,
                     latency_ids: list[int]) -> dict:
    from tasks.modeling import count_params, folder_size_bytes, load_causal_lm

    model, tokenizer = load_causal_lm(folder)
    t0 = time.perf_counter()
    ppl, acc = perplexity(model, tokenizer, records, template)
    em, n_gen = exact_match(model, tokenizer, math_records, template, ec.max_new_tokens)
    p50, p95 = forward_latency_ms(model, latency_ids, ec.latency_runs)
    return {
        "perplexity": _round(ppl, 4),
        "token_accuracy": _round(acc, 4),
        "exact_match": _round(em, 4),
        "latency_p50_ms": round(p50, 3),
        "latency_p95_ms": round(p95, 3),
        "size_mb": round(folder_size_bytes(folder) / 1e6, 3),
        "params": count_params(model),
        "records": len(records),
        "generated": n_gen,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _round(x: float | None, nd: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, nd)


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    import torch

    from tasks.artifacts import publish_image, publish_markdown, publish_table
    from tasks.finetune import final_path
    from tasks.tokenize import load_tokenizer

    if len(inputs) != 4:
        raise StageError(f"evaluate takes four upstream manifests (shard, tokenize, finetune, quantize), "
                         f"got {len(inputs)}")
    shard, tok, ft, quant = inputs
    ec = cfg.evaluate
    template = tok.stats.get("prompt_template")
    if template is None:
        raise StageError(f"{tok.path}: the tokenize manifest has no stats.prompt_template")
    records, split, notes = held_out_records(shard, ec.split, ec.max_records)
    math_records = [r for r in records if (r.get("metadata") or {}).get("task_type") == MATH_TASK][: ec.generate_records]
    if not math_records:
        notes.append(f"no {MATH_TASK} records among the held-out records: exact_match is null")

    folders = variant_folders(ft, quant)
    # One fixed input for every variant's latency, tokenized with the shared tokenizer.
    tokenizer = load_tokenizer(folders["tuned"])
    seq_len = int(tok.stats.get("seq_len") or LATENCY_MAX_TOKENS)
    latency_ids, _ = encode_for_scoring(records[0], tokenizer, template, min(seq_len, LATENCY_MAX_TOKENS))

    threads_before = torch.get_num_threads()
    if ec.threads > 0:
        torch.set_num_threads(ec.threads)
    threads = torch.get_num_threads()
    rows = []
    try:
        for variant, folder in folders.items():
            row = {"variant": variant, **evaluate_variant(folder, records, math_records, template, ec, latency_ids)}
            ctx.info("evaluate %s: %s", variant, row)
            rows.append(row)
    finally:
        torch.set_num_threads(threads_before)
    if any(r["perplexity"] is None for r in rows):
        notes.append("a variant has no finite perplexity (no target tokens scored, or the model diverged)")

    report = {"rows": rows, "split": split, "notes": notes, "threads": threads,
              "latency_tokens": len(latency_ids)}
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
    stats = {"split": split, "records": len(records), "generated": len(math_records), "notes": notes,
             "perplexity": {v: r["perplexity"] for v, r in by.items()},
             "latency_p50_ms": {v: r["latency_p50_ms"] for v, r in by.items()}}
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)


COLUMNS = [("variant", "variant"), ("perplexity", "perplexity"), ("token_accuracy", "token acc"),
           ("exact_match", "exact match"), ("latency_p50_ms", "p50 ms"), ("latency_p95_ms", "p95 ms"),
           ("size_mb", "size MB"), ("params", "params"), ("records", "records")]


def eval_markdown(rows: list[dict], split: str, notes: list[str]) -> str:
    def cell(v):
        return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))

    lines = [f"# Evaluation ({split} split)", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    lines += [""] + [f"> {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_eval(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ppl = [r["perplexity"] if r["perplexity"] is not None else 0.0 for r in rows]
    a1.bar(names, ppl, color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][: len(names)])
    a1.set_yscale("log")
    a1.set_title("perplexity (lower is better)")
    p50 = [r["latency_p50_ms"] for r in rows]
    err = [max(0.0, r["latency_p95_ms"] - r["latency_p50_ms"]) for r in rows]
    a2.bar(names, p50, yerr=[[0] * len(err), err], capsize=4, color="tab:purple")
    a2.set_title("forward latency ms (p50, bar to p95)")
    for ax in (a1, a2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
