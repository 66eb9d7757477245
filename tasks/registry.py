"""registry: evaluated model -> an immutable, numbered version with a model card, lineage back to the
raw-file sha256s, and a ``production`` alias that moves only when the deploy gate passes.

Not a store-cached stage: ``register`` runs at the end of every flow run and is idempotent. A
version is identified by its *lineage key* (the evaluate output's key, which chains every upstream
key, plus the registry section), so a rerun on unchanged inputs finds its version and writes nothing.

Layout under ``paths.registry``::

    <model_name>/
      aliases.json        {"production": "v2", "history": [{"version", "at", "reason", "action"}]}
      v1/ v2/ ...         immutable version folders, each renamed into place in one step:
        model/            the merged tuned model (plain transformers from_pretrained)
        adapter/          the PEFT adapter it was merged from
        dynamic_int8/     the quantized variant (corpus2model.tasks.model.modeling.load_causal_lm)
        eval.json eval.md eval.png loss.png
        config.yaml       the full run config
        lineage.json      lineage key, config hash, every stage's key/version/counters, raw files
        gate.json         the deploy-gate result
        serve.json        what the server needs: prompt template, default variant, variant folders
        README.md         Hugging Face style model card
      _tmp/               versions being written
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterator

from corpus2model.tasks.common.artifacts import publish_markdown
from corpus2model.tasks.stage import Manifest, StageError, canonical_json, link_or_copy, write_json_atomic

LAYOUT_VERSION = "1"  # bump when a version folder's layout changes (part of the lineage key)
ALIASES = "aliases.json"
PRODUCTION = "production"
# serve variant -> folder inside a version
VARIANT_DIRS = {"tuned": "model", "dynamic_int8": "dynamic_int8"}
# Stage order for lineage and the model card (DAG order, top to bottom).
STAGE_ORDER = ["source", "ingest", "clean", "dedup", "augment", "validate", "shard", "tokenize",
               "finetune", "quantize", "evaluate"]
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# the deploy gate
# ---------------------------------------------------------------------------------------------
def _metric(rows: dict[str, dict], variant: str, metric: str) -> float | None:
    value = rows.get(variant, {}).get(metric)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


HIGHER_IS_BETTER = {"accuracy", "macro_f1", "exact_match", "rouge_l", "preference_accuracy", "token_accuracy"}


def check_gate(eval_rows: list[dict], gate, serve_variant: str) -> dict:
    """The deploy gate on ``gate.metric``.

    Lower-is-better (perplexity), relative bounds:
    - tuned <= base * (1 - min_improvement_over_base)   (fine-tuning must have helped)
    - served <= tuned * (1 + max_quantized_degradation) (quantization must not have undone it)

    Higher-is-better (accuracy, macro_f1: classifiers), absolute bounds (0.01 = 1 point):
    - tuned >= base + min_improvement_over_base
    - served >= tuned - max_quantized_degradation

    A missing or non-finite value fails its check, and the reason names the variant.
    """
    metric = gate.metric
    rows = {r.get("variant"): r for r in eval_rows}
    base, tuned, served = (_metric(rows, v, metric) for v in ("base", "tuned", serve_variant))
    checks = []

    def add(name: str, value, threshold, missing: list[str]) -> None:
        if missing:
            checks.append({"name": name, "value": value, "threshold": threshold, "passed": False,
                           "reason": f"no finite {metric} for variant(s) {', '.join(missing)} in eval.json "
                                     f"(variants present: {sorted(k for k in rows if k)})"})
            return
        ok = value >= threshold if higher else value <= threshold
        sign = (">=" if ok else "<") if higher else ("<=" if ok else ">")
        checks.append({"name": name, "value": round(value, 6), "threshold": round(threshold, 6), "passed": ok,
                       "reason": f"{name.split('_vs_')[0]} {metric} {value:.4g} {sign} {threshold:.4g}"})

    higher = metric in HIGHER_IS_BETTER
    missing = [v for v, x in (("tuned", tuned), ("base", base)) if x is None]
    bound = None if missing else (base + gate.min_improvement_over_base if higher
                                  else base * (1 - gate.min_improvement_over_base))
    add("tuned_vs_base", tuned, bound, missing)
    missing = [v for v, x in ((serve_variant, served), ("tuned", tuned)) if x is None]
    bound = None if missing else (tuned - gate.max_quantized_degradation if higher
                                  else tuned * (1 + gate.max_quantized_degradation))
    add(f"{serve_variant}_vs_tuned", served, bound, list(dict.fromkeys(missing)))
    passed = all(c["passed"] for c in checks)
    reason = "all gate checks passed" if passed else "; ".join(c["reason"] for c in checks if not c["passed"])
    return {"passed": passed, "metric": metric, "serve_variant": serve_variant, "checks": checks, "reason": reason}


# ---------------------------------------------------------------------------------------------
# hashes and lineage
# ---------------------------------------------------------------------------------------------
def config_dump(cfg) -> dict:
    return cfg.model_dump(mode="json", by_alias=True)


def config_hash(cfg) -> str:
    """sha256 of the whole config except ``paths`` (moving folders does not change the model)."""
    data = {k: v for k, v in config_dump(cfg).items() if k != "paths"}
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def lineage_key(evaluate: Manifest, cfg) -> str:
    """The evaluate key already chains every upstream key (data, tokenizer, training, quantization);
    the registry section adds the gate and serve variant this version was registered under."""
    payload = canonical_json({"evaluate": evaluate.key, "registry": cfg.section("registry"), "layout": LAYOUT_VERSION})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def build_lineage(manifests: dict[str, Manifest], cfg, key: str) -> dict:
    ordered = [s for s in STAGE_ORDER if s in manifests] + sorted(s for s in manifests if s not in STAGE_ORDER)
    stages = {
        s: {"key": manifests[s].key, "stage_version": manifests[s].stage_version,
            "config_hash": manifests[s].config_hash, "counters": manifests[s].counters}
        for s in ordered
    }
    raw = [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in manifests["source"].files]
    return {"lineage_key": key, "config_hash": config_hash(cfg), "stages": stages, "raw_files": raw, "created": _now()}


# ---------------------------------------------------------------------------------------------
# folders, locks, aliases
# ---------------------------------------------------------------------------------------------
def model_root(registry_root: str | Path, name: str) -> Path:
    return Path(registry_root) / name


def _version_num(v: str) -> int:
    return int(_VERSION_RE.match(v).group(1))


def version_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)), key=_version_num)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer per model: two flow runs must not both take "v3" or interleave alias updates."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_aliases(root: Path) -> dict:
    path = root / ALIASES
    if not path.is_file():
        return {PRODUCTION: None, "history": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON ({e}); restore it or delete it to start the alias history anew") from None
    data.setdefault(PRODUCTION, None)
    data.setdefault("history", [])
    return data


def _set_production(root: Path, aliases: dict, version: str, reason: str, action: str) -> dict:
    aliases = {**aliases, PRODUCTION: version,
               "history": [*aliases["history"], {"version": version, "at": _now(), "reason": reason, "action": action}]}
    write_json_atomic(root / ALIASES, aliases)
    return aliases


def _production_stack(history: list[dict]) -> list[str]:
    """Promotions push, rollbacks pop: rolling back twice goes two promotions back, not back and forth."""
    stack: list[str] = []
    for h in history:
        if h.get("action") == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(h["version"])
    return stack


# ---------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------
def safetensors_params(folder: Path) -> int:
    """Parameter count from the safetensors headers (8-byte length + JSON), without loading tensors."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


CLASSIFIER_COLUMNS = ["variant", "accuracy", "macro_f1", "latency_p50_ms", "latency_p95_ms", "size_mb",
                      "speedup_vs_tuned", "size_ratio_vs_tuned", "accuracy_drop_points", "records"]


def eval_table(rows: list[dict]) -> str:
    cols = ["variant", "perplexity", "token_accuracy", "exact_match", "latency_p50_ms", "latency_p95_ms", "size_mb", "records"]
    if rows and all("accuracy" in r and "perplexity" not in r for r in rows):
        cols = CLASSIFIER_COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def gate_table(gate_result: dict) -> str:
    lines = ["| check | value | threshold | passed |", "|---|---|---|---|"]
    for c in gate_result["checks"]:
        lines.append(f"| {c['name']} | {_fmt(c['value'])} | {_fmt(c['threshold'])} | {'yes' if c['passed'] else 'no'} |")
    return "\n".join(lines)


def _stage_lines(lineage: dict) -> list[str]:
    """The records-per-stage table of the model card (lineage.json holds the same counters)."""
    stage_lines = ["| stage | key | in | added | out | rejected | duplicates |", "|---|---|---|---|---|---|---|"]
    for s, info in lineage["stages"].items():
        c = info["counters"] or {}
        rej = sum((c.get("rejected") or {}).values()) if c else None
        stage_lines.append(f"| {s} | `{info['key']}` | {_fmt(c.get('in'))} | {_fmt(c.get('added', 0 if c else None))} | "
                           f"{_fmt(c.get('out'))} | {_fmt(rej)} | "
                           f"{_fmt(c.get('duplicates'))} |")
    return stage_lines


def classifier_card(*, name: str, version: str, cfg, lineage: dict, rows: list[dict], gate_result: dict,
                    model_cfg: dict, ft_stats: dict, n_params: int, variants: list[str], has_adapter: bool) -> str:
    """Model card for a sequence classifier (model.task: classification, tasks/model/classify.py)."""
    import yaml

    serve_variant = cfg.registry.serve_variant
    labels = ft_stats["labels"]
    metrics = [{"type": m, "name": f"{m} ({r['variant']})", "value": r[m]}
               for r in rows for m in ("accuracy", "macro_f1") if r.get(m) is not None]
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2" if "minilm" in str(cfg.model.pretrained).lower()
        else str(cfg.model.pretrained),
        "tags": ["corpus2model", "text-classification", cfg.finetune.method],
        "model-index": [{
            "name": f"{name}-{version}",
            "results": [{
                "task": {"type": "text-classification", "name": f"classification of metadata.{ft_stats['label_field']}"},
                "dataset": {"name": f"corpus2model {cfg.evaluate.split} split", "type": "corpus2model",
                            "split": cfg.evaluate.split},
                "metrics": metrics,
            }],
        }],
    }
    raw = lineage["raw_files"]
    raw_bytes = sum(f["bytes"] or 0 for f in raw)
    arch = ", ".join(model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")])
    gate = cfg.registry.gate
    method = cfg.finetune.method
    lora = cfg.finetune.lora
    how = (f"LoRA (r={lora.r}, alpha={lora.alpha}, targets {', '.join(lora.target_modules)}; pooler and head trained "
           f"in full), merged into `model/`, the adapter kept in `adapter/`") if method == "lora" else "full fine-tuning"
    peft_snippet = f"""
# or the adapter on the pretrained encoder (its trained head travels in the adapter):
from peft import PeftModel
base = AutoModelForSequenceClassification.from_pretrained(PRETRAINED_ENCODER_FOLDER, num_labels={len(labels)})
model = PeftModel.from_pretrained(base, "{name}/{version}/adapter")""" if has_adapter else ""
    body = f"""
# {name} {version}

A {len(labels)}-way text classifier ({', '.join(labels)}) produced by the corpus2model pipeline (config
`{cfg.name}`, config hash `{lineage['config_hash'][:16]}`). Served variant: **{serve_variant}** (folder
`{VARIANT_DIRS[serve_variant]}/`). Variants in this version: {', '.join(variants)}.

## Model description

- Architecture: {arch} ({model_cfg.get('num_hidden_layers')} layers, hidden size {model_cfg.get('hidden_size')},
  vocabulary {model_cfg.get('vocab_size')}), {n_params:,} parameters
- Base model: `{cfg.model.pretrained}`, loaded offline
- Labels: `metadata.{ft_stats['label_field']}` of each record, ids {dict(enumerate(labels))}
- Training: first the encoder frozen and only the pooler and classification head trained
  ({cfg.model.classifier.head_epochs} epochs; that model is the `base` row below), then {how};
  {cfg.finetune.max_steps} steps, learning rate {cfg.finetune.learning_rate}, batch {cfg.finetune.batch_size},
  inputs truncated to {ft_stats['max_length']} tokens; {ft_stats['train_records']} training records.
- `dynamic_int8/`: per-channel int8 Linear weights (activations quantized at run time) and an int8
  word-embedding table (one scale per row, dequantized at load); loads with
  `tasks.model.classify.load_classifier`.

## Training data

Lineage key `{lineage['lineage_key']}`: {len(raw)} raw files, {raw_bytes:,} bytes in total, each listed with its
sha256 in `lineage.json`. Records per stage:

{chr(10).join(_stage_lines(lineage))}

## Evaluation

On the held-out `{cfg.evaluate.split}` split (up to {cfg.evaluate.max_records} labelled records); latency is one
batch-1 forward pass of the longest scored record, on CPU:

{eval_table(rows)}

Deploy gate ({gate.metric}; tuned at least {gate.min_improvement_over_base} above base, {serve_variant} at most
{gate.max_quantized_degradation} below tuned, absolute): **{'PASSED' if gate_result['passed'] else 'FAILED'}**
({gate_result['reason']}).

{gate_table(gate_result)}

## Intended use

Classifying short texts into the labels above, as the pipeline's training data defines them, and
exercising the pipeline's classification path (training, quantization, registry, serving).

## Limitations

Trained on a small slice of one source ({ft_stats['train_records']} records); accuracy on other domains,
on very short or mixed-language texts, or on labels outside ({', '.join(labels)}) is unknown: every
input gets one of these labels, whatever it is. The base encoder's tokenizer is an English uncased
WordPiece vocabulary: scripts it covers poorly (most CJK characters map to few pieces) are
recognised by their script, not their content. Inputs longer than {ft_stats['max_length']} tokens are truncated.

## How to load

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# paths are relative to the registry folder (paths.registry in the run config)
model = AutoModelForSequenceClassification.from_pretrained("{name}/{version}/model")
tokenizer = AutoTokenizer.from_pretrained("{name}/{version}/model")
logits = model(**tokenizer(["some text"], return_tensors="pt")).logits
print(model.config.id2label[int(logits.argmax())]){peft_snippet}
```

The server (`c2m serve`) resolves the `production` alias and answers `POST /classify`.
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def model_card(*, name: str, version: str, cfg, lineage: dict, rows: list[dict], gate_result: dict,
               model_cfg: dict, n_params: int, prompt_template: str, variants: list[str]) -> str:
    import yaml

    serve_variant = cfg.registry.serve_variant
    metrics = [{"type": cfg.registry.gate.metric, "name": f"{cfg.registry.gate.metric} ({r['variant']})",
                "value": r.get(cfg.registry.gate.metric)} for r in rows if r.get(cfg.registry.gate.metric) is not None]
    metrics += [{"type": "accuracy", "name": f"token accuracy ({r['variant']})", "value": r["token_accuracy"]}
                for r in rows if r.get("token_accuracy") is not None]
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["corpus2model", "causal-lm", cfg.finetune.method, "tiny", "demo"],
        "model-index": [{
            "name": f"{name}-{version}",
            "results": [{
                "task": {"type": "text-generation", "name": "held-out next-token prediction"},
                "dataset": {"name": f"corpus2model {cfg.evaluate.split} split", "type": "corpus2model",
                            "split": cfg.evaluate.split},
                "metrics": metrics,
            }],
        }],
    }
    stage_lines = _stage_lines(lineage)
    raw = lineage["raw_files"]
    raw_bytes = sum(f["bytes"] or 0 for f in raw)
    arch = ", ".join(model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")])
    shape = (f"hidden size {model_cfg.get('hidden_size')}, layers {model_cfg.get('num_hidden_layers')}, "
             f"attention heads {model_cfg.get('num_attention_heads')}, vocabulary {model_cfg.get('vocab_size')}")
    lora = cfg.finetune.lora
    gate = cfg.registry.gate
    gate_word = "PASSED" if gate_result["passed"] else "FAILED"
    prompt_example = prompt_template.format(input="What is 2 + 3?")
    body = f"""
# {name} {version}

Produced by the corpus2model pipeline (config `{cfg.name}`, config hash `{lineage['config_hash'][:16]}`).
Served variant: **{serve_variant}** (folder `{VARIANT_DIRS[serve_variant]}/`). Variants in this version: {', '.join(variants)}.

## Model description

- Architecture: {arch} ({shape})
- Parameters: {n_params:,}
- Fine-tuning: {cfg.finetune.method} (r={lora.r}, alpha={lora.alpha}, targets {', '.join(lora.target_modules)}), \
{cfg.finetune.max_steps} steps, learning rate {cfg.finetune.learning_rate}, batch {cfg.finetune.batch_size}; the adapter \
is merged into `model/` and kept in `adapter/`.
- Base model: {cfg.model.pretrained or 'built from config (random initialisation, no pretrained weights)'}
- Prompt template (the model was trained on prompts rendered this way):

```text
{prompt_template}
```

## Training data

Lineage key `{lineage['lineage_key']}`: {len(raw)} raw files, {raw_bytes:,} bytes in total, each listed with its
sha256 in `lineage.json`. Records per stage:

{chr(10).join(stage_lines)}

## Evaluation

On the held-out `{cfg.evaluate.split}` split (up to {cfg.evaluate.max_records} records for perplexity):

{eval_table(rows)}

Deploy gate ({gate.metric}; tuned at least {gate.min_improvement_over_base:.0%} better than base, {serve_variant} at most
{gate.max_quantized_degradation:.0%} worse than tuned): **{gate_word}** ({gate_result['reason']}).

{gate_table(gate_result)}

## Intended use

A demonstration of a reproducible data-to-model pipeline: checking that the data lineage, caching,
evaluation, quantization, registry and serving work end to end. Use it to exercise the pipeline and
its server, not to answer questions.

## Limitations

This is a tiny demo model ({n_params:,} parameters, {cfg.finetune.max_steps} fine-tuning steps; the demo
configuration trains it in minutes on a CPU) fitted to a small sample corpus. Its answers are
mostly wrong or incoherent, its perplexity is only meaningful relative to the base model it was tuned
from, and exact match on generated answers is expected to be near zero. It has seen no safety tuning
and inherits whatever biases the sample corpus has. Do not use it for any real task.

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# paths are relative to the registry folder (paths.registry in the run config)
model = AutoModelForCausalLM.from_pretrained("{name}/{version}/model")
tokenizer = AutoTokenizer.from_pretrained("{name}/{version}/model")
prompt = {prompt_example!r}
ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

The quantized variant loads with the project's loader (`corpus2model.tasks.model.modeling.load_causal_lm("{name}/{version}/dynamic_int8")`),
and the server with `c2m serve` (it resolves the `production` alias and serves the `{serve_variant}` variant).
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


# ---------------------------------------------------------------------------------------------
# register
# ---------------------------------------------------------------------------------------------
def _need(manifests: dict[str, Manifest], stage: str) -> Manifest:
    if stage not in manifests:
        raise StageError(f"registry needs the {stage!r} stage output; got only {sorted(manifests)}")
    return manifests[stage]


def _need_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise StageError(f"registry: {what} folder {folder} is missing or empty; rerun that stage (its store entry is incomplete)")
    return folder


def _copy_tree(src: Path, dst: Path) -> None:
    # Store files are never modified in place (stages replace whole folders), so hard links are safe
    # and keep a version from doubling disk use; link_or_copy falls back to a copy across filesystems.
    for p in sorted(src.rglob("*")):
        if p.is_file():
            link_or_copy(p, dst / p.relative_to(src))


def find_version(root: Path, key: str) -> str | None:
    for v in version_names(root):
        lin = root / v / "lineage.json"
        if lin.is_file() and json.loads(lin.read_text(encoding="utf-8")).get("lineage_key") == key:
            return v
    return None


def gated_report(folder: Path, report: dict, gate_result: dict) -> None:
    """eval.md and eval.png of a version: the evaluation table and chart with the gate's marks."""
    from corpus2model.tasks.evaluate import eval_markdown, plot_eval

    rows = report.get("rows", [])
    md = eval_markdown(rows, report.get("split", "?"), report.get("notes", []), gate_result)
    (folder / "eval.md").write_text(md, encoding="utf-8")
    plot_eval(rows, folder / "eval.png", gate_result["metric"], gate_result)


def publish_gated(folder: Path, name: str, version: str) -> None:
    """The gated evaluation table as Prefect table + markdown artifacts and the chart as an image link."""
    from corpus2model.tasks.common.artifacts import publish_image, publish_table
    from corpus2model.tasks.evaluate import gate_marks

    try:
        report = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        gate_result = json.loads((folder / "gate.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    marks = gate_marks(gate_result, report.get("rows", []))
    rows = [{"variant": r["variant"], "gate": marks.get(r["variant"], ""),
             **{k: v for k, v in r.items() if k != "variant"}} for r in report.get("rows", [])]
    what = f"{name} {version}: deploy gate {'PASSED' if gate_result['passed'] else 'FAILED'} ({gate_result['reason']})"
    publish_table("evaluation-gated", rows, what)
    if (folder / "eval.md").is_file():
        publish_markdown("evaluation-gated-md", (folder / "eval.md").read_text(encoding="utf-8"), what)
    if (folder / "eval.png").is_file():
        publish_image("evaluation-gated-chart", str(folder / "eval.png"), what)


def _write_version(tmp: Path, manifests: dict[str, Manifest], cfg, name: str, version: str, key: str) -> dict:
    finetune, evaluate = manifests["finetune"], manifests["evaluate"]
    serve_variant = cfg.registry.serve_variant

    merged, adapter = finetune.stats.get("merged_dir", "merged"), finetune.stats.get("adapter_dir", "adapter")
    _copy_tree(_need_dir(finetune.dir / merged, f"finetune {merged}/"), tmp / "model")
    if adapter:  # full fine-tuning has no adapter (its stats say adapter_dir: null)
        _copy_tree(_need_dir(finetune.dir / adapter, f"finetune {adapter}/"), tmp / "adapter")
    classifier = finetune.stats.get("task") == "classification"
    variants = ["tuned"]
    quant = manifests.get("quantize")
    if quant is not None and (quant.dir / "dynamic_int8").is_dir():
        _copy_tree(_need_dir(quant.dir / "dynamic_int8", "quantize dynamic_int8/"), tmp / "dynamic_int8")
        variants.append("dynamic_int8")
    if serve_variant not in variants:
        raise StageError(f"registry.serve_variant is {serve_variant!r} but the quantize output "
                         f"{quant.dir if quant else '(none)'} has no dynamic_int8/ folder; add dynamic_int8 to "
                         f"quantize.methods or set registry.serve_variant: tuned")

    eval_json = evaluate.dir / "eval.json"
    if not eval_json.is_file():
        raise StageError(f"registry: {eval_json} is missing; rerun the evaluate stage")
    rows = json.loads(eval_json.read_text(encoding="utf-8")).get("rows", [])
    # The causal-LM table and chart are re-rendered below with the gate's pass/fail marks (written, not
    # linked: a hard link would let the registry's copy edit the evaluate stage's file).
    gated = any("perplexity" in r for r in rows)  # a causal-LM table (a classifier's has its own layout)
    reports = [(eval_json, "eval.json"), (finetune.dir / "loss.png", "loss.png")]
    if not gated:
        reports += [(evaluate.dir / "eval.md", "eval.md"), (evaluate.dir / "eval.png", "eval.png")]
    for src, dst in reports:
        if src.is_file():  # the plots and the markdown table are for people; eval.json is what is checked
            link_or_copy(src, tmp / dst)

    import yaml

    (tmp / "config.yaml").write_text(
        f"# run config of {name} {version}\n" + yaml.safe_dump(config_dump(cfg), sort_keys=False, allow_unicode=True),
        encoding="utf-8")
    lineage = build_lineage(manifests, cfg, key)
    (tmp / "lineage.json").write_text(json.dumps(lineage, indent=1, ensure_ascii=False), encoding="utf-8")
    gate_result = check_gate(rows, cfg.registry.gate, serve_variant)
    (tmp / "gate.json").write_text(json.dumps(gate_result, indent=1), encoding="utf-8")
    if gated:
        gated_report(tmp, json.loads(eval_json.read_text(encoding="utf-8")), gate_result)

    tok = manifests.get("tokenize")
    # The tokenize stage records the template it rendered training text with; the config is the same
    # source one step earlier, for runs whose tokenize stats predate the field.
    prompt_template = (tok.stats.get("prompt_template") if tok else None) or cfg.tokenize.prompt_template
    serve_info = {"model": name, "version": version, "serve_variant": serve_variant, "prompt_template": prompt_template,
                  "variants": {v: VARIANT_DIRS[v] for v in variants}}
    if classifier:
        serve_info.update(task="classification", labels=finetune.stats["labels"],
                          max_length=finetune.stats["max_length"])
    (tmp / "serve.json").write_text(json.dumps(serve_info, indent=1, ensure_ascii=False), encoding="utf-8")

    model_cfg_path = tmp / "model" / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text(encoding="utf-8")) if model_cfg_path.is_file() else {}
    if classifier:
        card = classifier_card(name=name, version=version, cfg=cfg, lineage=lineage, rows=rows,
                               gate_result=gate_result, model_cfg=model_cfg, ft_stats=finetune.stats,
                               n_params=safetensors_params(tmp / "model"), variants=variants,
                               has_adapter=bool(adapter))
    else:
        card = model_card(name=name, version=version, cfg=cfg, lineage=lineage, rows=rows, gate_result=gate_result,
                          model_cfg=model_cfg, n_params=safetensors_params(tmp / "model"),
                          prompt_template=prompt_template, variants=variants)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    return gate_result


def register(manifests: dict[str, Manifest], cfg) -> dict:
    """Register the evaluated model as a new version (or find the one these inputs already made),
    and move ``production`` to it when the gate passes."""
    name = cfg.registry.model_name
    root = model_root(cfg.paths.registry, name)
    evaluate = _need(manifests, "evaluate")
    _need(manifests, "finetune")
    _need(manifests, "source")
    key = lineage_key(evaluate, cfg)

    with _locked(root):
        version = find_version(root, key)
        created = version is None
        if created:
            existing = version_names(root)
            version = f"v{_version_num(existing[-1]) + 1 if existing else 1}"
            (root / "_tmp").mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=root / "_tmp"))
            try:
                gate_result = _write_version(tmp, manifests, cfg, name, version, key)
                os.rename(tmp, root / version)  # the version appears complete or not at all
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        else:
            gate_result = json.loads((root / version / "gate.json").read_text(encoding="utf-8"))

        aliases = read_aliases(root)
        ever_production = any(h["version"] == version for h in aliases["history"])
        promoted = False
        if gate_result["passed"] and not ever_production:
            # Promote a version once: a rerun must not undo a manual rollback, yet a run that died
            # between writing the version and the alias still gets its promotion on the rerun.
            aliases = _set_production(root, aliases, version, "gate passed", "promote")
            promoted = True
            why = f"gate passed: production -> {version}"
        elif gate_result["passed"] and aliases[PRODUCTION] == version:
            why = f"gate passed; {version} is already production"
        elif gate_result["passed"]:
            why = (f"gate passed, but {version} was promoted before and production was moved away from it since; "
                   f"production stays {aliases[PRODUCTION]} (promote {version} to move it back)")
        else:
            why = f"gate failed ({gate_result['reason']}); production stays {aliases[PRODUCTION] or 'unset'}"

    card = (root / version / "README.md").read_text(encoding="utf-8")
    publish_markdown(f"model-card-{name}", card, description=f"{name} {version}: {why}")
    publish_gated(root / version, name, version)
    return {"name": name, "version": version, "path": str(root / version), "created": created,
            "lineage_key": key, "gate": gate_result, "production": aliases[PRODUCTION], "promoted": promoted,
            "reason": why}


# ---------------------------------------------------------------------------------------------
# reading and moving aliases
# ---------------------------------------------------------------------------------------------
def _existing_models(registry_root: Path) -> list[str]:
    if not registry_root.is_dir():
        return []
    return sorted(p.name for p in registry_root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _require_model(registry_root: Path, name: str) -> list[str]:
    versions = version_names(model_root(registry_root, name))
    if not versions:
        raise StageError(f"no model named {name!r} in registry {registry_root}; models there: "
                         f"{_existing_models(registry_root) or 'none'} (run the pipeline to register one)")
    return versions


def resolve(registry_root: str | Path, name: str, ref: str = PRODUCTION) -> Path:
    """``ref`` is an alias (``production``) or a version (``v3``); returns the version folder."""
    registry_root = Path(registry_root)
    root = model_root(registry_root, name)
    versions = _require_model(registry_root, name)
    if _VERSION_RE.match(ref):
        if ref not in versions:
            raise StageError(f"model {name!r} has no version {ref}; versions: {', '.join(versions)}")
        return root / ref
    aliases = read_aliases(root)
    if ref not in aliases or ref == "history":
        raise StageError(f"{ref!r} is neither a version nor an alias of {name!r}; versions: {', '.join(versions)}; "
                         f"aliases: {PRODUCTION}")
    target = aliases[ref]
    if target is None:
        raise StageError(f"model {name!r} has no {ref} version yet (no version passed the deploy gate); versions: "
                         f"{', '.join(versions)}; pass one explicitly or promote it")
    return root / target


def list_versions(registry_root: str | Path, name: str) -> list[dict]:
    root = model_root(registry_root, name)
    production = read_aliases(root)[PRODUCTION] if root.is_dir() else None
    out = []
    for v in version_names(root):
        folder = root / v
        lineage = json.loads((folder / "lineage.json").read_text(encoding="utf-8"))
        gate = json.loads((folder / "gate.json").read_text(encoding="utf-8"))
        serve = json.loads((folder / "serve.json").read_text(encoding="utf-8"))
        rows = json.loads((folder / "eval.json").read_text(encoding="utf-8")).get("rows", [])
        out.append({
            "version": v, "created": lineage.get("created"), "gate_passed": gate["passed"],
            gate["metric"]: {r["variant"]: r.get(gate["metric"]) for r in rows},
            "serve_variant": serve["serve_variant"], "lineage_key": lineage["lineage_key"],
            "is_production": v == production,
        })
    return out


def promote(registry_root: str | Path, name: str, version: str, reason: str = "manual") -> str:
    """Point ``production`` at ``version`` (any version: a manual promotion overrides the gate); returns it."""
    root = model_root(registry_root, name)
    folder = resolve(registry_root, name, version)
    with _locked(root):
        aliases = read_aliases(root)
        if aliases[PRODUCTION] != folder.name:
            # Already there: no history entry, so a rollback still goes one promotion back.
            _set_production(root, aliases, folder.name, reason, "promote")
    return folder.name


def rollback(registry_root: str | Path, name: str) -> str:
    """Move ``production`` back to the version it pointed at before the latest promotion; returns it."""
    root = model_root(registry_root, name)
    _require_model(Path(registry_root), name)
    with _locked(root):
        aliases = read_aliases(root)
        stack = _production_stack(aliases["history"])
        if len(stack) < 2:
            raise StageError(f"cannot roll back {name!r}: production is {aliases[PRODUCTION] or 'unset'} and there is no "
                             f"earlier production version in {root / ALIASES}; use promote to pick a version "
                             f"({', '.join(version_names(root))})")
        current, previous = stack[-1], stack[-2]
        _set_production(root, aliases, previous, f"rollback from {current}", "rollback")
    return previous
