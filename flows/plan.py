"""The DAG, its keys before anything runs, and why each stage will run or is cached.

Because a key depends only on (stage, version, own config sections, upstream keys), the whole
chain of keys follows from the config and the raw-folder fingerprint: ``c2m status`` shows the
plan without running a stage, and ``c2m run`` explains every stage it ran by comparing with the
last run of the same config name ("finetune.learning_rate 0.002 -> 0.001", "raw file X added").
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from corpus2model.flows.stages import DAG, STAGES, ablated_config, nodes
from corpus2model.tasks.common.fingerprint import check_entry
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.quantize import plan_detail
from corpus2model.tasks.stage import Manifest, StageContext, Store, cache_key, run_stage, stage_key, stage_sections, verify, write_json_atomic

def check_runtime(runtime) -> None:
    """Stage names in the runtime section must name DAG stages: a typo would silently drop a timeout
    or the GPU tag."""
    from corpus2model.schemas.config import ConfigError

    known = {name for name, _ in DAG}
    for field_name, names in (("runtime.stage_timeout_s", runtime.stage_timeout_s), ("runtime.gpu_stages", runtime.gpu_stages)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise ConfigError(f"{field_name}: unknown stage(s) {unknown}; stages are {[n for n, _ in DAG]}")


@dataclass
class StepPlan:
    stage: str
    key: str
    cached: bool
    why: str
    sections: dict = field(default_factory=dict)
    upstream: list[str] = field(default_factory=list)
    detail: str = ""


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """``["finetune.learning_rate 0.002 → 0.001", ...]`` for the hashed sections of one stage."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            name = k.replace("_extra.", "")
            changes.append(f"{name} {json.dumps(a.get(k), default=str)} → {json.dumps(b.get(k), default=str)}")
    return changes


def source_diff(old_files: dict[str, str], new_files: dict[str, str]) -> list[str]:
    added = sorted(set(new_files) - set(old_files))
    removed = sorted(set(old_files) - set(new_files))
    changed = sorted(p for p in set(old_files) & set(new_files) if old_files[p] != new_files[p])
    parts = []
    for label, items in (("added", added), ("changed", changed), ("removed", removed)):
        if items:
            shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
            parts.append(f"raw file{'s' if len(items) > 1 else ''} {label}: {shown}")
    return parts


class RunRecord:
    """What the last run of a config name used, so the next one can say what changed."""

    def __init__(self, store: Store, name: str):
        self.path = store.root / "_runs" / f"{name}.json"

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def save(self, source: Manifest, steps: list[StepPlan], extra: dict | None = None) -> None:
        """Record the stages that finished; a stage this run did not reach (``c2m tune`` stops at
        tokenize, a failed run stops early) keeps what its last run used."""
        data = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {f.path: f.sha256 for f in source.files},
            "stages": {**self.load().get("stages", {}),
                       **{s.stage: {"key": s.key, "sections": s.sections, "upstream": s.upstream} for s in steps}},
            **(extra or {}),
        }
        write_json_atomic(self.path, data)


def _ingest_detail(source: Manifest, cfg, store: Store) -> str:
    section = cfg.ingest.hashed()
    missing = [
        f.path for f in source.files
        if store.unit_lookup("ingest", cache_key("ingest", STAGES["ingest"].version, section, [f.path, f.sha256])) is None
    ]
    return f"{len(missing)} of {len(source.files)} raw files to ingest"


def plan(cfg, store: Store, source: Manifest) -> list[StepPlan]:
    """Keys and cached/why for every stage, from the config and the raw fingerprint alone."""
    last = RunRecord(store, cfg.name).load()
    last_stages = last.get("stages", {})
    keys = {"source": source.key}
    steps: list[StepPlan] = []
    src_changes = source_diff(last.get("source", {}), {f.path: f.sha256 for f in source.files}) if last else []
    # evaluate.ablate: branch nodes (flows/stages.py nodes) run their stage under the ablated config
    configs = {None: cfg, **{t: ablated_config(cfg, t) for t in cfg.evaluate.ablate}}
    stage_of = {"source": "source"}
    for node in nodes(cfg.evaluate.ablate):
        mod, stage, ups, ncfg = node.stage, node.stage.name, node.inputs, configs[node.ablation]
        stage_of[node.label] = stage
        upstream = [f"{u}:{keys[u]}" for u in ups]  # by label: what the run record keeps and the next run diffs
        # also what the next run diffs against; finetune's key_extra reads its inputs' keys (its parent version)
        sections = stage_sections(mod, ncfg, [f"{stage_of[u]}:{keys[u]}" for u in ups])
        # by stage name, as run_stage names its input manifests (a branch's finetune is "finetune:<key>")
        key, _ = stage_key(mod, ncfg, [f"{stage_of[u]}:{keys[u]}" for u in ups], sections)
        keys[node.label] = key
        ok, verdict = verify(store.stage_dir(stage, key))
        code_note = ""
        if ok:  # code changed since this entry without a VERSION bump: named; runtime.on_code_change decides
            ok, code_note = check_entry(store.stage_dir(stage, key), mod, ncfg)
        prev = last_stages.get(node.label)
        if ok:
            why = f"cached ({code_note})" if code_note else "cached"
        elif code_note:
            why = code_note
        elif store.stage_dir(stage, key).exists():
            why = f"recompute: {verdict}"  # this output was made before, but it is damaged now
        elif prev:
            reasons = config_diff(prev.get("sections", {}), sections)
            if prev.get("upstream") != upstream:
                if "source" in ups and src_changes:
                    reasons += src_changes
                else:
                    moved = [u.split(":")[0] for u in upstream if u not in prev.get("upstream", [])]
                    reasons += [f"input changed: {', '.join(moved)}"] if moved else []
            if not reasons:
                reasons = [f"stage version is now {mod.VERSION}" if prev.get("sections") == sections else "key changed"]
            why = "; ".join(reasons)
        else:
            why = "first run" if not last else "not in store"
        detail = _ingest_detail(source, cfg, store) if node.label == "ingest" and not ok else ""
        if node.label == "quantize" and not ok:  # each variant is cached on its own: say which ones are new
            detail = plan_detail(cfg.quantize, store, keys["finetune"], keys.get("tokenize"))
        if node.ablation:
            detail = f"evaluate.ablate: {stage} without {node.ablation}"
        steps.append(StepPlan(node.label, key, ok, why, sections, upstream, detail))
    return steps


def run_local(cfg, log=None) -> dict[str, Manifest]:
    """The DAG without Prefect: the same keys, store and outputs as the flow, in DAG order.
    For debugging a stage and for the kill/concurrency tests (a process that may be killed)."""
    store = Store(cfg.paths.store)
    done: dict[str, Manifest] = {"source": scan_raw(cfg.paths.raw, cfg.ingest.include, store)}
    ctx = StageContext(store=store, log=log)
    for node in nodes(cfg.evaluate.ablate):  # an ablation branch's stages under the ablated config
        ncfg = ablated_config(cfg, node.ablation) if node.ablation else cfg
        done[node.label] = run_stage(node.stage, [done[u] for u in node.inputs], ncfg, ctx)
    return done
