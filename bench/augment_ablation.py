"""Does augmentation earn its place? The demo's DAG with ``evaluate.ablate: [augment]`` (issue 15): the same
finetune trained with and without the augmented records, both scored on the same held-out records.

    python bench/augment_ablation.py            # the demo DAG + its no-augment branch: ~10 min cold on 2 quiet cores
    python bench/augment_ablation.py --smoke    # 20 steps, no quantization, 16 held-out records: ~2 min; writes nothing

The run is the project's own: ``flows.plan.run_local`` (the flow's stages, keys and store, without Prefect)
on configs/demo.yaml plus ``evaluate.ablate: [augment]``, in a temp store. The flow then reruns augment ..
finetune with augment switched off (flows/stages.py ``nodes``; augment's records pass through), and the
evaluate stage scores that model as the row ``tuned_no_augment`` beside ``tuned``.

Reported per system (rows "with augment" = ``tuned``, "without augment" = ``tuned_no_augment``):
* the evaluation table's figures on its held-out records (evaluate.max_records of the test split by id):
  perplexity, token accuracy, exact match (math_qa), ROUGE-L (open generation). Each branch trains its own
  BPE tokenizer on its own train split, so perplexity / token accuracy count slightly different tokens;
* ``eval NLL per target character`` on the held-out *originals* (the test split without augmented copies,
  which the no-augment branch does not have): the NLL summed over the target tokens divided by the target
  characters (+1 for eos), independent of the tokenizer: the figure that compares strictly.
Rows are written through bench/results_io.py to bench/results/augment_ablation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, ROOT, write_results

SYSTEMS = {"tuned": "corpus2model (with augment)", "tuned_no_augment": "corpus2model (without augment)"}
FINETUNE = {"tuned": "finetune", "tuned_no_augment": "finetune_no_augment"}
TABLE_METRICS = [("perplexity", "per token (own tokenizer)"), ("token_accuracy", "share"),
                 ("exact_match", "share (math_qa)"), ("rouge_l", "F1 (open generation)")]
SMOKE = {"finetune.max_steps": 20, "finetune.eval_every": 10, "quantize.methods": [], "evaluate.max_records": 16,
         "evaluate.generate_records": 2, "evaluate.max_new_tokens": 8, "evaluate.latency_runs": 2,
         "evaluate.throughput_runs": 1}


def score(ft, template: str, records: list[dict]) -> dict:
    """Target-token NLL of a finetune output's tuned model on ``records`` (tasks/evaluate.py's encoding)."""
    import torch
    import torch.nn.functional as F

    from corpus2model.tasks.evaluate import encode_for_scoring, load_row_model, variant_folders
    from corpus2model.tasks.stage import Manifest
    from corpus2model.tasks.tokenize import render

    model, tok, _ = load_row_model(variant_folders(ft, Manifest(stage="quantize"))["tuned"])
    model.eval()
    max_len = getattr(model.config, "max_position_embeddings", None)
    nll, n_tok, n_chars = 0.0, 0, 0
    with torch.inference_mode():
        for rec in records:
            ids, labels = encode_for_scoring(rec, tok, template, max_len)
            y = torch.tensor(labels[1:])
            keep = y != -100
            if len(ids) < 2 or not bool(keep.any()):
                continue
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits[keep], y[keep], reduction="sum"))
            n_tok += int(keep.sum())
            n_chars += len(render(rec, template)[1]) + 1  # + eos, which is scored too
    return {"loss": nll / n_tok, "nll_per_char": nll / n_chars, "tokens": n_tok, "chars": n_chars}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--smoke", action="store_true", help="a quick check of the wiring: tiny training, nothing written")
    ap.add_argument("--max-steps", type=int, default=0, help="override finetune.max_steps (0: the config's)")
    ap.add_argument("--store", type=Path, default=None, help="store folder (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from corpus2model.flows.plan import run_local
    from corpus2model.schemas.config import load_config
    from corpus2model.tasks.tokenize import shard_files

    overrides = {"evaluate.ablate": ["augment"], "paths.raw": str(ROOT / "data" / "sample" / "raw"),
                 **(SMOKE if args.smoke else {}), **({"finetune.max_steps": args.max_steps} if args.max_steps else {})}
    with tempfile.TemporaryDirectory(prefix="augment-ablation-") as tmp:
        overrides["paths.store"] = str(args.store or Path(tmp) / "store")
        cfg = load_config(args.config, overrides)
        t0 = time.perf_counter()
        done = run_local(cfg, log=None)
        seconds = time.perf_counter() - t0
        report = json.loads((done["evaluate"].dir / "eval.json").read_text(encoding="utf-8"))
        table = {r["variant"]: r for r in report["rows"]}
        # the held-out originals: the no-augment branch's test split (the main one adds augmented copies of them)
        test = [r for p in shard_files(done["shard_no_augment"]).get("test", []) for r in pq.read_table(p).to_pylist()]
        test = sorted(test, key=lambda r: r["id"])
        template = done["tokenize"].stats["prompt_template"]
        scores = {v: score(done[FINETUNE[v]], template, test) for v in SYSTEMS}

    aug, added = done["augment"].stats, done["augment"].counters["added"]
    steps = cfg.finetune.max_steps
    base_conf = (f"{args.config.name}{' --smoke' if args.smoke else ''}, finetune {cfg.finetune.method} {steps} steps; "
                 f"{table['tuned']['records']} held-out records (evaluate table)")
    rows = []
    for variant, system in SYSTEMS.items():
        conf = base_conf + (f"; +{added} augmented records ({aug['methods']}), rejected {aug['rejected_by_reason']}"
                            if variant == "tuned" else "; augment switched off (evaluate.ablate), its own tokenizer")
        for metric, unit in TABLE_METRICS:
            if table[variant].get(metric) is not None:
                rows.append({"system": system, "metric": metric, "value": table[variant][metric], "unit": unit,
                             "config": conf})
        s = scores[variant]
        rows.append({"system": system, "metric": "eval NLL per target character", "value": round(s["nll_per_char"], 4),
                     "unit": "nats/char", "config": f"{len(test)} held-out originals, {s['chars']} target chars (+eos); "
                                                    f"tokenizer-independent"})
    delta = scores["tuned"]["nll_per_char"] - scores["tuned_no_augment"]["nll_per_char"]
    verdict = ("augmentation helped (lower held-out NLL per character)" if delta < 0 else
               "augmentation did not help (held-out NLL per character is not lower)")
    ppl = (table["tuned"]["perplexity"], table["tuned_no_augment"]["perplexity"])
    notes = (f"{verdict}: {delta:+.4f} nats/char ({100 * delta / scores['tuned_no_augment']['nll_per_char']:+.2f}%); "
             f"table perplexity tuned {ppl[0]} vs tuned_no_augment {ppl[1]} (per token of each run's own tokenizer). "
             f"One seed per system, so a difference of this size may be noise. Both runs train the same number of "
             f"steps; the 'with' run spreads them over {added} more records. One cold run_local of the DAG with "
             f"evaluate.ablate: [augment]: {seconds:.0f} s wall (stages before augment are shared by both branches).")
    for r in rows:
        print(f"{r['system']:32s} {r['metric']:30s} {r['value']} {r['unit']}")
    print(notes)
    if not (args.no_write or args.smoke):
        write_results("augment_ablation", rows, notes, out_dir=args.out,
                      title="augment ablation: finetune with and without augmented records (evaluate.ablate)",
                      extra={"scores": scores, "eval_rows": [table[v] for v in SYSTEMS], "seconds": round(seconds, 1),
                             "splits": {v: done[k].stats.get("splits", {}) for v, k in
                                        (("tuned", "shard"), ("tuned_no_augment", "shard_no_augment"))}})
    return {"rows": rows, "scores": scores, "seconds": seconds}


if __name__ == "__main__":
    main()
