"""Does augmentation earn its place? The demo's finetune trained twice, with and without the augmented
records, scored on the same held-out records (issue 15).

    python bench/augment_ablation.py                  # ~2x the demo's data stages + finetune (minutes on 2 cores)
    python bench/augment_ablation.py --max-steps 20 --no-write   # smoke test

Both runs go through the project's own stage table (flows/stages.py, ``run_stage``) into one temp
store, stages up to finetune: configs/demo.yaml as is (``with augment``) and the same config with
``augment.max_ratio: 0`` (``without augment``: the augment stage runs but adds nothing, so every other
stage and setting is identical; the stages before augment are cache hits the second time).

Held-out set: the originals of the ``without`` run's test split (shard buckets a record by its
parent id, so the ``with`` run's test split holds the same originals plus augmented copies of them,
which are left out). Both models score the same records with tasks/evaluate.py's encoding (prompt
template, loss on target + eos). Metrics:
* ``eval loss``: mean NLL per target token; each run trains its own BPE tokenizer on its own corpus,
  so token-level figures are *not* strictly comparable between the rows;
* ``eval perplexity``: exp(eval loss), same caveat;
* ``eval NLL per target character``: the NLL summed over the target tokens divided by the target
  characters (+1 for eos): independent of the tokenizer, the comparable figure.
Rows are written through bench/results_io.py to bench/results/augment_ablation.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, ROOT, write_results

SYSTEMS = {"with": "corpus2model (with augment)", "without": "corpus2model (without augment)"}


def run_through_finetune(config: Path, store: Path, overrides: dict) -> dict:
    from corpus2model.flows.stages import STAGES, through
    from corpus2model.schemas.config import load_config
    from corpus2model.tasks.ingest import scan_raw
    from corpus2model.tasks.stage import StageContext, Store, run_stage

    cfg = load_config(config, {"paths.store": str(store), "paths.raw": str(ROOT / "data" / "sample" / "raw"), **overrides})
    st = Store(cfg.paths.store)
    done = {"source": scan_raw(cfg.paths.raw, cfg.ingest.include, st), "cfg": cfg}
    ctx = StageContext(store=st)
    for name in through("finetune"):
        t0 = time.perf_counter()
        done[name] = run_stage(STAGES[name], [done[u] for u in STAGES[name].inputs], cfg, ctx)
        print(f"  {name}: {done[name].stats.get('cache', '')} {time.perf_counter() - t0:.1f} s", flush=True)
    return done


def score(done: dict, records: list[dict]) -> dict:
    """Target-token NLL of the tuned model on ``records`` (tasks/evaluate.py's encoding)."""
    import torch
    import torch.nn.functional as F

    from corpus2model.tasks.evaluate import encode_for_scoring, load_row_model
    from corpus2model.tasks.tokenize import render

    ft = done["finetune"]
    st = ft.stats
    adapter = ft.dir / (st.get("adapter_dir") or "adapter")
    source = (ft.dir / (st.get("base_dir") or "base"), adapter) if adapter.is_dir() else ft.dir / (st.get("merged_dir") or "merged")
    model, tok, _ = load_row_model(source)
    model.eval()
    template = done["tokenize"].stats["prompt_template"]
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
    return {"loss": nll / n_tok, "ppl": math.exp(nll / n_tok), "nll_per_char": nll / n_chars, "tokens": n_tok,
            "chars": n_chars}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--max-steps", type=int, default=0, help="override finetune.max_steps (0: the config's)")
    ap.add_argument("--max-records", type=int, default=0, help="held-out records scored (0: all test originals)")
    ap.add_argument("--store", type=Path, default=None, help="store folder (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import shard_files

    common = {"finetune.max_steps": args.max_steps} if args.max_steps else {}
    with tempfile.TemporaryDirectory(prefix="augment-ablation-") as tmp:
        store = args.store or Path(tmp) / "store"
        runs = {}
        for name, extra in (("without", {"augment.max_ratio": 0.0}), ("with", {})):
            print(f"{SYSTEMS[name]}:", flush=True)
            t0 = time.perf_counter()
            runs[name] = run_through_finetune(args.config, store, {**common, **extra})
            runs[name]["seconds"] = time.perf_counter() - t0
        test = [r for p in shard_files(runs["without"]["shard"]).get("test", []) for r in pq.read_table(p).to_pylist()]
        test = sorted((r for r in test if not (r["metadata"] or {}).get("parent_id")), key=lambda r: r["id"])
        if args.max_records:
            test = test[: args.max_records]
        with_test = {r["id"] for p in shard_files(runs["with"]["shard"]).get("test", []) for r in pq.read_table(p).to_pylist()}
        missing = [r["id"] for r in test if r["id"] not in with_test]
        if missing:  # the held-out originals must be held out in both runs, or the comparison is void
            raise SystemExit(f"{len(missing)} held-out records of the 'without' run are not in the 'with' run's test split")
        scores = {name: score(done, test) for name, done in runs.items()}

    cfg = runs["with"]["cfg"]
    aug = runs["with"]["augment"].stats
    added = runs["with"]["augment"].counters["added"]
    train = {n: runs[n]["shard"].stats.get("splits", {}) for n in runs}
    rows = []
    for name in ("with", "without"):
        s = scores[name]
        conf = (f"configs/demo.yaml{'' if name == 'with' else ' + augment.max_ratio 0'}, finetune {cfg.finetune.method} "
                f"{args.max_steps or cfg.finetune.max_steps} steps; {len(test)} held-out test originals, {s['tokens']} target tokens"
                + (f"; +{added} augmented records ({aug['methods']}), {aug['candidates']} candidates, rejected {aug['rejected_by_reason']}"
                   if name == "with" else "; no augmented records"))
        rows += [
            {"system": SYSTEMS[name], "metric": "eval loss", "value": round(s["loss"], 4), "unit": "nats/token", "config": conf},
            {"system": SYSTEMS[name], "metric": "eval perplexity", "value": round(s["ppl"], 3), "unit": "per token",
             "config": "own tokenizer per run: not strictly comparable"},
            {"system": SYSTEMS[name], "metric": "eval NLL per target character", "value": round(s["nll_per_char"], 4),
             "unit": "nats/char", "config": f"{s['chars']} target chars (+eos); tokenizer-independent"},
        ]
    delta = scores["with"]["nll_per_char"] - scores["without"]["nll_per_char"]
    verdict = ("augmentation helped (lower held-out NLL per character)" if delta < 0 else
               "augmentation did not help (held-out NLL per character is not lower)")
    notes = (f"{verdict}: {delta:+.4f} nats/char ({100 * delta / scores['without']['nll_per_char']:+.2f}%). One seed per "
             f"system, so a difference of this size may be noise. Both runs train the same number of steps; the 'with' run "
             f"spreads them over {added} more records. Wall time: with {runs['with']['seconds']:.0f} s, without "
             f"{runs['without']['seconds']:.0f} s (stages before augment were cache hits in the second run).")
    for r in rows:
        print(f"{r['system']:32s} {r['metric']:30s} {r['value']} {r['unit']}")
    print(notes)
    if not args.no_write:
        write_results("augment_ablation", rows, notes, out_dir=args.out, title="augment ablation: finetune with and without augmented records",
                      extra={"splits": train, "scores": scores})
    return {"rows": rows, "scores": scores}


if __name__ == "__main__":
    main()
