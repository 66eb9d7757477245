"""The real pretrained case: all-MiniLM-L6-v2 language ID, base vs tuned vs dynamic INT8.

    c2m run configs/minilm.yaml && python bench/minilm_bench.py configs/minilm.yaml

Reads the evaluation table of the config's newest registered version (written by the evaluate
stage: every variant on the same held-out test records, batch-1 latency on the longest one with
evaluate.threads torch threads) and writes bench/results/minilm_bench.{json,md}, with the
quantization targets checked: INT8 >= 2x faster than fp32 (tuned), <= 0.3x its weight bytes, at
most 1 accuracy point lower. The figures are whatever the run measured: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from results_io import ROOT

# The row names issue 8 asks for, so the table reads on its own.
ROW_NAMES = {"latency_p50_ms": "p50 ms", "latency_p95_ms": "p95 ms", "weights_mb": "size MB",
             "speedup_vs_tuned": "int8 dynamic speedup x", "size_ratio_vs_tuned": "int8 size ratio",
             "accuracy_drop_points": "accuracy drop pt", "macro_f1": "macro-F1"}
TARGETS = {"speedup_vs_tuned": (">=", 2.0), "size_ratio_vs_tuned": ("<=", 0.3), "accuracy_drop_points": ("<=", 1.0)}


def target_checks(rows: list[dict], variant: str = "dynamic_int8") -> list[str]:
    row = next((r for r in rows if r["variant"] == variant), None)
    if row is None:
        return [f"no {variant} row in the evaluation table"]
    out = []
    for key, (op, bound) in TARGETS.items():
        v = row.get(key)
        ok = v is not None and (v >= bound if op == ">=" else v <= bound)
        out.append(f"{key} {v} {op} {bound}: {'met' if ok else 'NOT met'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, nargs="?", default=ROOT / "configs" / "minilm.yaml")
    p.add_argument("--ref", default=None, help="version or alias (default: the newest version)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)

    from results_io import RESULTS, write_results
    from corpus2model.schemas.config import load_config
    from corpus2model.tasks import registry

    cfg = load_config(args.config)
    name = cfg.registry.model_name
    versions = registry.version_names(registry.model_root(cfg.paths.registry, name))
    folder = registry.resolve(cfg.paths.registry, name, args.ref or (versions[-1] if versions else "production"))
    report = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    if report.get("task") != "classification":
        raise SystemExit(f"{folder}/eval.json is not a classification evaluation")
    conf = (f"{name} {folder.name}, {report['rows'][0]['records']} held-out {report['split']} records, labels "
            f"{'/'.join(report['labels'])}, max_length {report['latency_tokens']}, {report['threads']} torch threads")
    units = {"accuracy": "", "macro_f1": "", "latency_p50_ms": "ms", "latency_p95_ms": "ms", "weights_mb": "MB",
             "speedup_vs_tuned": "x", "size_ratio_vs_tuned": "x", "accuracy_drop_points": "points"}
    rows = []
    for r in report["rows"]:
        for metric, unit in units.items():
            if r.get(metric) is not None:
                rows.append({"system": f"MiniLM {r['variant']}", "metric": ROW_NAMES.get(metric, metric), "value": r[metric], "unit": unit,
                             "config": conf})
    checks = target_checks(report["rows"])
    gate = json.loads((folder / "gate.json").read_text(encoding="utf-8"))
    notes = ("base = frozen encoder + trained pooler/head; tuned = LoRA merged; dynamic_int8 = int8 Linear weights "
             "(per channel) + int8 word-embedding table. Targets: " + "; ".join(checks) +
             f". Deploy gate: {'passed' if gate['passed'] else 'failed'} ({gate['reason']}).")
    print("\n".join(checks))
    write_results("minilm_bench", rows, notes, out_dir=args.out or RESULTS,
                  title="MiniLM language ID: base vs tuned vs dynamic INT8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
