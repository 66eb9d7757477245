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
        README.md         Hugging Face style model card (tasks/model/templates/*.md, string.Template)
      _tmp/               versions being written

Config: like a stage under run_stage, the code that writes a version sees only the sections it declares
(``SECTIONS``, narrowed by tasks/stage.py ``stage_config``), so a setting it reads is a setting it says it
reads. The resolved full config comes in as one more explicit input, ``run_config``: a version records
the whole config that produced it (config.yaml, the lineage's config hash) because the model depends on
every stage's settings, not just the registry's. It is a record, not identity: the lineage key stays the
evaluate key (which chains every stage's hashed sections) plus the registry section, so a change to a
setting no stage hashes (runtime, serve) finds the same version instead of making a copy of the model.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
import types
from pathlib import Path
from string import Template
from typing import Iterator

from corpus2model.tasks.common.artifacts import publish_markdown
from corpus2model.tasks.common.resources import package_path
from corpus2model.tasks.finetune import task_of
from corpus2model.tasks.model import ablation, reward
from corpus2model.tasks.model import continual
from corpus2model.tasks.stage import (Manifest, StageError, canonical_json, link_or_copy, stage_config,
                                      write_json_atomic)

STAGE = "registry"
# The config sections the version-writing code reads: registry (name, gate, serve variant), paths (the
# registry folder), and what the model card and serve.json describe: model (base model, classifier head),
# finetune (method, steps, learning rate), tokenize (the prompt template of outputs that predate its
# record in the tokenize stats), evaluate (split, record limit).
SECTIONS = ("registry", "paths", "model", "finetune", "tokenize", "evaluate")

LAYOUT_VERSION = "1"  # bump when a version folder's layout changes (part of the lineage key)
ALIASES = "aliases.json"
PRODUCTION = "production"
# serve variant -> folder inside a version
VARIANT_DIRS = {"tuned": "model", "dynamic_int8": "dynamic_int8", "onnx_int8_dynamic": "onnx_int8_dynamic"}
# Quantize variants a version ships (copied when the quantize output has them); onnx_int8_dynamic only for
# encoder classifiers, whose server loads it through ONNX Runtime (classify.load_classifier).
SHIPPED_VARIANTS = ("dynamic_int8", "onnx_int8_dynamic")
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

    Optional (None = off): max_augment_regression (augment_check: tuned vs tuned_no_augment, same kind of bound).
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
    if getattr(gate, "max_augment_regression", None) is not None:
        checks.append(augment_check(rows, metric, higher, tuned, gate.max_augment_regression))
    if getattr(gate, "max_forgetting", None) is not None:
        checks.append(forgetting_check(rows, gate.max_forgetting))
    passed = all(c["passed"] for c in checks)
    reason = "all gate checks passed" if passed else "; ".join(c["reason"] for c in checks if not c["passed"])
    return {"passed": passed, "metric": metric, "serve_variant": serve_variant, "checks": checks, "reason": reason}


def augment_check(rows: dict[str, dict], metric: str, higher: bool, tuned: float | None, allowed: float) -> dict:
    """"Augmentation must not hurt" (gate.max_augment_regression): tuned may be at most ``allowed`` worse than
    tuned_no_augment (the evaluate.ablate: [augment] row), relative when lower is better, absolute points
    when higher is better. Without that row the check fails and says how to get it."""
    name = f"tuned_vs_{ablation.row_name('augment')}"
    ref = _metric(rows, ablation.row_name("augment"), metric)
    if ablation.row_name("augment") not in rows:
        return {"name": name, "value": tuned, "threshold": None, "passed": False,
                "reason": f"gate.max_augment_regression is set but eval.json has no {ablation.row_name('augment')} row: "
                          f"set evaluate.ablate: [augment] so the run also trains the model without augmentation"}
    if tuned is None or ref is None:
        missing = [v for v, x in (("tuned", tuned), (ablation.row_name("augment"), ref)) if x is None]
        return {"name": name, "value": tuned, "threshold": None, "passed": False,
                "reason": f"no finite {metric} for variant(s) {', '.join(missing)} in eval.json"}
    bound = ref - allowed if higher else ref * (1 + allowed)
    ok = tuned >= bound if higher else tuned <= bound
    sign = (">=" if ok else "<") if higher else ("<=" if ok else ">")
    verdict = "augmentation did not hurt" if ok else "augmentation hurt"
    return {"name": name, "value": round(tuned, 6), "threshold": round(bound, 6), "passed": ok,
            "reason": f"{verdict}: tuned {metric} {tuned:.4g} {sign} {bound:.4g} "
                      f"({ablation.row_name('augment')} {ref:.4g}, max_augment_regression {allowed})"}


def forgetting_check(rows: dict[str, dict], allowed: float) -> dict:
    """gate.max_forgetting: tuned's forgetting (tasks/model/forgetting.py: its perplexity on the parent
    version's test records / the parent's - 1) at most ``allowed``. A run without a parent has nothing to
    forget and passes; a parent row without a finite forgetting fails."""
    tuned, base = rows.get("tuned", {}), rows.get("base", {})
    if "old_test_perplexity" not in base and "forgetting" not in tuned:
        return {"name": "forgetting", "value": None, "threshold": allowed, "passed": True,
                "reason": "no parent version (finetune.init scratch, or none to continue from): nothing to forget"}
    value = _metric(rows, "tuned", "forgetting")
    if value is None:
        return {"name": "forgetting", "value": None, "threshold": allowed, "passed": False,
                "reason": "no finite forgetting for tuned in eval.json (the parent's or tuned's old-test perplexity "
                          "is missing)"}
    ok = value <= allowed
    return {"name": "forgetting", "variant": "tuned", "value": round(value, 6), "threshold": allowed, "passed": ok,
            "reason": f"tuned forgetting {value:.4g} {'<=' if ok else '>'} {allowed:.4g} (perplexity on the parent's "
                      f"test records {tuned.get('old_test_perplexity')} vs the parent's {base.get('old_test_perplexity')})"}


# ---------------------------------------------------------------------------------------------
# hashes and lineage
# ---------------------------------------------------------------------------------------------
def config_dump(cfg) -> dict:
    """The resolved full config as plain JSON data (what ``run_config`` is)."""
    return cfg.model_dump(mode="json", by_alias=True)


def declared(cfg) -> types.SimpleNamespace:
    """The registry's view of a run's config: its declared SECTIONS only (tasks/stage.py stage_config)."""
    return stage_config(types.SimpleNamespace(SECTIONS=SECTIONS), cfg)


def config_hash(run_config: dict) -> str:
    """sha256 of the whole resolved config except ``paths`` (moving folders does not change the model)."""
    data = {k: v for k, v in run_config.items() if k != "paths"}
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def lineage_key(evaluate: Manifest, cfg) -> str:
    """The evaluate key already chains every upstream key (data, tokenizer, training, quantization);
    the registry section adds the gate and serve variant this version was registered under.
    ``registry.hashed()`` is what ``PipelineConfig.section("registry")`` returned before the registry
    saw only its sections: the same key, so existing registries still find their versions."""
    payload = canonical_json({"evaluate": evaluate.key, "registry": cfg.registry.hashed(), "layout": LAYOUT_VERSION})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def build_lineage(manifests: dict[str, Manifest], run_config: dict, key: str) -> dict:
    # In the order given: the flow passes the raw scan, then the stage table's order (flows/stages.py).
    ordered = list(manifests)
    stages = {
        s: {"key": manifests[s].key, "stage_version": manifests[s].stage_version,
            "config_hash": manifests[s].config_hash, "counters": manifests[s].counters}
        for s in ordered
    }
    raw = [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in manifests["source"].files]
    lineage = {"lineage_key": key, "config_hash": config_hash(run_config), "stages": stages, "raw_files": raw,
               "created": _now()}
    ft = manifests.get("finetune")
    if ft is not None and ft.stats.get("init") not in (None, "scratch"):
        # Continual fine-tuning: the version this one continued from (None: it started from the base model),
        # and the data added since (tasks/model/continual.py data_added). The next run's parent rule reads
        # "parent" and stages.tokenize.key from here.
        parent_lineage = ft.dir / continual.PARENT_DIR / continual.LINEAGE
        lineage.update(init=ft.stats["init"], parent=ft.stats.get("parent"), data_added=continual.data_added(
            json.loads(parent_lineage.read_text(encoding="utf-8")) if parent_lineage.is_file() else None, lineage))
    return lineage


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


LM_COLUMNS = ["variant", "perplexity", "token_accuracy", "exact_match", "latency_p50_ms", "latency_p95_ms", "size_mb",
              "records"]


def eval_table(rows: list[dict], task: str = "causal_lm") -> str:
    """The evaluation rows as a markdown table, with the columns of the model's task (finetune.task_of)."""
    cols = {"classification": CLASSIFIER_COLUMNS, "reward": reward.EVAL_COLUMNS}.get(task, LM_COLUMNS)
    if cols is LM_COLUMNS:  # continual runs: the parent's test split (tasks/model/forgetting.py)
        cols = cols + [c for c in ("old_test_perplexity", "forgetting") if any(r.get(c) is not None for r in rows)]
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


# The card texts live in template files (package data, ``tasks/model/templates/``), filled with
# string.Template: a writer edits the prose without touching code, and no templating dependency is added.
TEMPLATE_PACKAGE = "corpus2model.tasks.model"


@functools.lru_cache(maxsize=None)
def card_template(name: str) -> Template:
    return Template(package_path(TEMPLATE_PACKAGE, "templates", name).read_text(encoding="utf-8"))


def render(template_name: str, /, **values) -> str:
    """Fill a template with exactly its placeholders (positional-only name: ``name`` is a placeholder). A
    placeholder without a value, or a value no placeholder shows, means the template and this code drifted
    apart: that fails here, naming both, rather than writing a card with a ``${gap}`` or silently dropping
    a fact."""
    template = card_template(template_name)
    wanted = set(template.get_identifiers())
    missing, unused = sorted(wanted - values.keys()), sorted(values.keys() - wanted)
    if missing or unused or not template.is_valid():
        raise StageError(f"model card template {template_name} ({TEMPLATE_PACKAGE} templates/) does not match the "
                         f"registry code: placeholders without a value {missing}, values without a placeholder {unused}"
                         + ("" if template.is_valid() else "; it has a '$' that is no placeholder (write '$$')"))
    return template.substitute(values)


def _front_matter(front: dict) -> str:
    import yaml

    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True)


def _training_data(lineage: dict) -> dict:
    raw = lineage["raw_files"]
    return {"lineage_key": lineage["lineage_key"], "raw_files": len(raw),
            "raw_bytes": f"{sum(f['bytes'] or 0 for f in raw):,}", "stage_table": "\n".join(_stage_lines(lineage))}


def classifier_card(*, name: str, version: str, cfg, config_name: str, lineage: dict, rows: list[dict],
                    gate_result: dict, model_cfg: dict, ft_stats: dict, n_params: int, variants: list[str],
                    has_adapter: bool) -> str:
    """Model card for a sequence classifier (model.task: classification, tasks/model/classify.py), from
    templates/classifier_card.md. ``cfg`` holds the registry's declared sections only."""
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
    gate = cfg.registry.gate
    lora = cfg.finetune.lora
    how = (f"LoRA (r={lora.r}, alpha={lora.alpha}, targets {', '.join(lora.target_modules)}; pooler and head trained "
           f"in full), merged into `model/`, the adapter kept in `adapter/`") if cfg.finetune.method == "lora" \
        else "full fine-tuning"
    # The adapter lines join the end of the loading snippet, so the fragment's own final newline goes.
    adapter = ("\n" + render("classifier_card_adapter.md", n_labels=len(labels), name=name, version=version)
               .rstrip("\n")) if has_adapter else ""
    return render(
        "classifier_card.md",
        front_matter=_front_matter(front), name=name, version=version, n_labels=len(labels),
        labels=", ".join(labels), config_name=config_name, config_hash=lineage["config_hash"][:16],
        serve_variant=serve_variant, serve_folder=VARIANT_DIRS[serve_variant], variants=", ".join(variants),
        architecture=", ".join(model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")]),
        num_hidden_layers=model_cfg.get("num_hidden_layers"), hidden_size=model_cfg.get("hidden_size"),
        vocab_size=model_cfg.get("vocab_size"), n_params=f"{n_params:,}", pretrained=cfg.model.pretrained,
        label_field=ft_stats["label_field"], label_ids=dict(enumerate(labels)),
        head_epochs=cfg.model.classifier.head_epochs, how=how, max_steps=cfg.finetune.max_steps,
        learning_rate=cfg.finetune.learning_rate, batch_size=cfg.finetune.batch_size,
        max_length=ft_stats["max_length"], train_records=ft_stats["train_records"], **_training_data(lineage),
        eval_split=cfg.evaluate.split, eval_max_records=cfg.evaluate.max_records,
        eval_table=eval_table(rows, "classification"), gate_metric=gate.metric,
        gate_min_improvement=gate.min_improvement_over_base, gate_max_degradation=gate.max_quantized_degradation,
        gate_word="PASSED" if gate_result["passed"] else "FAILED", gate_reason=gate_result["reason"],
        gate_table=gate_table(gate_result), adapter_snippet=adapter,
    )


def reward_card(*, name: str, version: str, cfg, config_name: str, lineage: dict, rows: list[dict],
                gate_result: dict, model_cfg: dict, ft_stats: dict, n_params: int, variants: list[str]) -> str:
    """Model card for a reward model (model.task: reward, tasks/model/reward.py), from
    templates/reward_card.md. ``cfg`` holds the registry's declared sections only."""
    metrics = [{"type": "accuracy", "name": f"preference accuracy ({r['variant']})", "value": r["preference_accuracy"]}
               for r in rows if r.get("preference_accuracy") is not None]
    base_model = ("sentence-transformers/all-MiniLM-L6-v2" if "minilm" in str(cfg.model.pretrained).lower()
                  else str(cfg.model.pretrained))
    front = {
        "library_name": "transformers", "pipeline_tag": "text-classification", "base_model": base_model,
        "tags": ["corpus2model", "reward-model", cfg.finetune.method],
        "model-index": [{"name": f"{name}-{version}", "results": [{
            "task": {"type": "text-classification", "name": "preference ranking (reward model)"},
            "dataset": {"name": f"corpus2model {cfg.evaluate.split} split preference pairs", "type": "corpus2model",
                        "split": cfg.evaluate.split},
            "metrics": metrics}]}],
    }
    gate, lora = cfg.registry.gate, cfg.finetune.lora
    how = (f"LoRA (r={lora.r}, alpha={lora.alpha}, targets {', '.join(lora.target_modules)}; pooler and head "
           f"trained in full), merged into `model/`, the adapter kept in `adapter/`") if cfg.finetune.method == "lora" \
        else "full fine-tuning"
    return render(
        "reward_card.md",
        front_matter=_front_matter(front), name=name, version=version, config_name=config_name,
        config_hash=lineage["config_hash"][:16], serve_variant=cfg.registry.serve_variant,
        serve_folder=VARIANT_DIRS[cfg.registry.serve_variant], variants=", ".join(variants),
        architecture=", ".join(model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")]),
        num_hidden_layers=model_cfg.get("num_hidden_layers"), hidden_size=model_cfg.get("hidden_size"),
        vocab_size=model_cfg.get("vocab_size"), n_params=f"{n_params:,}", pretrained=cfg.model.pretrained,
        max_length=ft_stats["max_length"], min_prompt_tokens=ft_stats["min_prompt_tokens"], how=how,
        max_steps=cfg.finetune.max_steps, learning_rate=cfg.finetune.learning_rate, batch_size=cfg.finetune.batch_size,
        train_pairs=ft_stats["train_pairs"], **_training_data(lineage), eval_split=cfg.evaluate.split,
        eval_max_records=cfg.evaluate.max_records, eval_table=eval_table(rows, "reward"), gate_metric=gate.metric,
        gate_min_improvement=gate.min_improvement_over_base, gate_max_degradation=gate.max_quantized_degradation,
        gate_word="PASSED" if gate_result["passed"] else "FAILED", gate_reason=gate_result["reason"],
        gate_table=gate_table(gate_result),
    )


def model_card(*, name: str, version: str, cfg, config_name: str, lineage: dict, rows: list[dict],
               gate_result: dict, model_cfg: dict, n_params: int, prompt_template: str, variants: list[str]) -> str:
    """Model card for a causal LM, from templates/model_card.md. ``cfg`` holds the registry's declared
    sections only."""
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
    lora = cfg.finetune.lora
    gate = cfg.registry.gate
    return render(
        "model_card.md",
        front_matter=_front_matter(front), name=name, version=version, config_name=config_name,
        config_hash=lineage["config_hash"][:16], serve_variant=serve_variant,
        serve_folder=VARIANT_DIRS[serve_variant], variants=", ".join(variants),
        architecture=", ".join(model_cfg.get("architectures") or [model_cfg.get("model_type", "unknown")]),
        shape=(f"hidden size {model_cfg.get('hidden_size')}, layers {model_cfg.get('num_hidden_layers')}, "
               f"attention heads {model_cfg.get('num_attention_heads')}, vocabulary {model_cfg.get('vocab_size')}"),
        n_params=f"{n_params:,}", method=cfg.finetune.method, lora_r=lora.r, lora_alpha=lora.alpha,
        lora_targets=", ".join(lora.target_modules), max_steps=cfg.finetune.max_steps,
        learning_rate=cfg.finetune.learning_rate, batch_size=cfg.finetune.batch_size,
        base_model=cfg.model.pretrained or "built from config (random initialisation, no pretrained weights)",
        prompt_template=prompt_template, **_training_data(lineage), continual=continual_card(lineage),
        eval_split=cfg.evaluate.split,
        eval_max_records=cfg.evaluate.max_records, eval_table=eval_table(rows), gate_metric=gate.metric,
        gate_min_improvement=f"{gate.min_improvement_over_base:.0%}",
        gate_max_degradation=f"{gate.max_quantized_degradation:.0%}",
        gate_word="PASSED" if gate_result["passed"] else "FAILED", gate_reason=gate_result["reason"],
        gate_table=gate_table(gate_result), prompt_example=repr(prompt_template.format(input="What is 2 + 3?")),
    )


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


def _continual_files(tmp: Path, finetune: Manifest, shard: Manifest | None, cfg) -> None:
    """What the versions that continue from this one read (tasks/model/continual.py): the blocks it trained
    on (replay) and its Fisher (EWC) from the finetune output, and its held-out test records (forgetting:
    the first evaluate.max_records of evaluate.split, the records its own evaluation scored)."""
    for name in (continual.REPLAY, continual.FISHER):
        if (finetune.dir / name).is_file():
            link_or_copy(finetune.dir / name, tmp / name)
    if shard is None or not isinstance(shard.stats.get("shards"), dict):
        return
    from corpus2model.tasks.evaluate import held_out_records

    try:
        records, split, _ = held_out_records(shard, cfg.evaluate.split, cfg.evaluate.max_records)
    except StageError:
        return
    if split == cfg.evaluate.split:  # not a fallback to validation/train: forgetting is measured on held-out data
        (tmp / continual.TEST_RECORDS).write_text(
            "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records),
            encoding="utf-8")


def continual_card(lineage: dict) -> str:
    """The model card's paragraph on the version this one continued from and the data added since."""
    if lineage.get("init") in (None, "scratch"):
        return ""
    parent, added = lineage.get("parent"), lineage.get("data_added") or {}
    if not parent:
        return (f"Continual fine-tuning (`finetune.init: {lineage['init']}`): no parent version, this version was "
                f"trained from the base model; later runs continue from it.\n")
    name = parent.get("version") or parent.get("path")
    lines = [f"Continual fine-tuning (`finetune.init: {lineage['init']}`): continued from **{name}** "
             f"(lineage `{parent.get('lineage_key') or parent.get('sha256')}`), whose weights are this version's "
             f"starting point and the `base` row of the evaluation table."]
    if added:
        lines.append(f"Data since the parent: {len(added['raw_files_added'])} raw files added, "
                     f"{len(added['raw_files_changed'])} changed, {len(added['raw_files_removed'])} removed; records "
                     f"{_fmt(added.get('records_parent'))} -> {_fmt(added.get('records'))} "
                     f"({_fmt(added.get('records_added'))} added). Files added: "
                     f"{', '.join(added['raw_files_added'][:10]) or 'none'}"
                     + (" ..." if len(added['raw_files_added']) > 10 else "") + ".")
    return "\n".join(lines) + "\n"


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


def _write_version(tmp: Path, manifests: dict[str, Manifest], cfg, run_config: dict, name: str, version: str,
                   key: str) -> dict:
    finetune, evaluate = manifests["finetune"], manifests["evaluate"]
    serve_variant = cfg.registry.serve_variant

    merged, adapter = finetune.stats.get("merged_dir", "merged"), finetune.stats.get("adapter_dir", "adapter")
    _copy_tree(_need_dir(finetune.dir / merged, f"finetune {merged}/"), tmp / "model")
    if adapter:  # full fine-tuning has no adapter (its stats say adapter_dir: null)
        _copy_tree(_need_dir(finetune.dir / adapter, f"finetune {adapter}/"), tmp / "adapter")
    if finetune.stats.get("init") not in (None, "scratch"):
        _continual_files(tmp, finetune, manifests.get("shard"), cfg)
    task = task_of(finetune)  # decided once, by model.task, in the finetune output
    classifier = task == "classification"
    variants = ["tuned"]
    quant = manifests.get("quantize")
    for v in SHIPPED_VARIANTS:
        if quant is not None and (quant.dir / v).is_dir() and (v == "dynamic_int8" or task != "causal_lm"):
            _copy_tree(_need_dir(quant.dir / v, f"quantize {v}/"), tmp / VARIANT_DIRS[v])
            variants.append(v)
    if serve_variant not in variants:
        raise StageError(f"registry.serve_variant is {serve_variant!r} but the quantize output "
                         f"{quant.dir if quant else '(none)'} has no {serve_variant}/ folder; add {serve_variant} to "
                         f"quantize.methods or set registry.serve_variant: tuned")

    eval_json = evaluate.dir / "eval.json"
    if not eval_json.is_file():
        raise StageError(f"registry: {eval_json} is missing; rerun the evaluate stage")
    rows = json.loads(eval_json.read_text(encoding="utf-8")).get("rows", [])
    # The causal-LM table and chart are re-rendered below with the gate's pass/fail marks (written, not
    # linked: a hard link would let the registry's copy edit the evaluate stage's file).
    gated = task == "causal_lm"  # a causal-LM table (a classifier's or reward model's has its own layout)
    reports = [(eval_json, "eval.json"), (finetune.dir / "loss.png", "loss.png")]
    if not gated:
        reports += [(evaluate.dir / "eval.md", "eval.md"), (evaluate.dir / "eval.png", "eval.png")]
    for src, dst in reports:
        if src.is_file():  # the plots and the markdown table are for people; eval.json is what is checked
            link_or_copy(src, tmp / dst)

    import yaml

    (tmp / "config.yaml").write_text(
        f"# run config of {name} {version}\n" + yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True),
        encoding="utf-8")
    lineage = build_lineage(manifests, run_config, key)
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
    elif task == "reward":  # the truncation the scores were trained with (tasks/model/reward.py score_texts)
        serve_info.update(task="reward", max_length=finetune.stats["max_length"],
                          min_prompt_tokens=finetune.stats["min_prompt_tokens"])
    (tmp / "serve.json").write_text(json.dumps(serve_info, indent=1, ensure_ascii=False), encoding="utf-8")

    model_cfg_path = tmp / "model" / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text(encoding="utf-8")) if model_cfg_path.is_file() else {}
    if classifier:
        card = classifier_card(name=name, version=version, cfg=cfg, config_name=run_config["name"], lineage=lineage,
                               rows=rows, gate_result=gate_result, model_cfg=model_cfg, ft_stats=finetune.stats,
                               n_params=safetensors_params(tmp / "model"), variants=variants,
                               has_adapter=bool(adapter))
    elif task == "reward":
        card = reward_card(name=name, version=version, cfg=cfg, config_name=run_config["name"], lineage=lineage,
                           rows=rows, gate_result=gate_result, model_cfg=model_cfg, ft_stats=finetune.stats,
                           n_params=safetensors_params(tmp / "model"), variants=variants)
    else:
        card = model_card(name=name, version=version, cfg=cfg, config_name=run_config["name"], lineage=lineage,
                          rows=rows, gate_result=gate_result, model_cfg=model_cfg,
                          n_params=safetensors_params(tmp / "model"), prompt_template=prompt_template,
                          variants=variants)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    return gate_result


def register(manifests: dict[str, Manifest], cfg) -> dict:
    """Register the evaluated model under a run's full config: what run_stage is to a stage. The
    version-writing code gets the declared SECTIONS only, and the resolved full config as the explicit
    record a version keeps (see the module docstring for why both)."""
    return register_version(manifests, declared(cfg), config_dump(cfg))


def register_version(manifests: dict[str, Manifest], cfg, run_config: dict) -> dict:
    """Register the evaluated model as a new version (or find the one these inputs already made),
    and move ``production`` to it when the gate passes. ``cfg`` holds the declared SECTIONS only
    (``declared``); ``run_config`` is the resolved full config (``config_dump``), written to config.yaml
    and hashed into the lineage, never into the lineage key."""
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
                gate_result = _write_version(tmp, manifests, cfg, run_config, name, version, key)
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
