"""evaluate.ablate: [augment] (issue 15): the branch the flow reruns without augmentation, the
tuned_no_augment row on the same held-out records, and the deploy gate's "augmentation must not hurt"."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.flows.plan import plan
from corpus2model.flows.stages import STAGES, TABLE, ablated_config, ablation_branch, nodes
from corpus2model.schemas.config import ConfigError, Gate, load_config, parse_config
from corpus2model.schemas.records import make_record, records_table
from corpus2model.tasks import evaluate, registry
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, run_stage, sha256_file
from helpers import ROOT, chain_config

AUG = ["augment_no_augment", "validate_no_augment", "shard_no_augment", "tokenize_no_augment", "finetune_no_augment"]


# ---------------------------------------------------------------------------------------------
# config and graph
# ---------------------------------------------------------------------------------------------
def test_unknown_or_unsupported_ablation_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"unknown ablation target\(s\) \['dedup'\]; supported: \['augment'\]"):
        parse_config({"evaluate": {"ablate": ["dedup"]}})
    with pytest.raises(ConfigError, match="lists a target twice"):
        parse_config({"evaluate": {"ablate": ["augment", "augment"]}})
    with pytest.raises(ConfigError, match="needs model.task: causal_lm"):
        parse_config({"evaluate": {"ablate": ["augment"]}, "model": {"task": "classification"}})


def test_switches_enter_keys_only_when_set():
    off, on = parse_config({}), parse_config({"evaluate": {"ablate": ["augment"]},
                                              "registry": {"gate": {"max_augment_regression": 0.0}}})
    assert "ablate" not in off.section("evaluate") and on.section("evaluate")["ablate"] == ["augment"]
    assert "max_augment_regression" not in off.section("registry")["gate"]
    assert on.section("registry")["gate"]["max_augment_regression"] == 0.0


def test_branch_runs_augment_through_finetune_and_feeds_evaluate():
    assert nodes() == nodes([]) and [n.label for n in nodes()] == [s.name for s in TABLE]
    assert ablation_branch("augment") == ["augment", "validate", "shard", "tokenize", "finetune"]
    by = {n.label: n for n in nodes(["augment"])}
    labels = list(by)
    assert labels[labels.index("quantize") + 1: labels.index("evaluate")] == AUG  # after the main run, before evaluate
    assert by["augment_no_augment"].inputs == ("dedup",)  # the same deduplicated records as the main run
    assert by["finetune_no_augment"].inputs == ("tokenize_no_augment", "shard_no_augment")
    assert by["finetune_no_augment"].stage is STAGES["finetune"] and by["finetune_no_augment"].ablation == "augment"
    assert by["evaluate"].inputs == STAGES["evaluate"].inputs + ("finetune_no_augment",)


def test_ablated_config_changes_only_what_augment_adds():
    cfg = parse_config({"augment": {"methods": ["synonym"], "max_ratio": 0.5}, "evaluate": {"ablate": ["augment"]}})
    abl = ablated_config(cfg, "augment")
    assert abl.augment.methods == [] and cfg.augment.methods == ["synonym"]
    full, cut = cfg.model_dump(), abl.model_dump()
    assert full.pop("augment") != cut.pop("augment") and full == cut
    # the rest of augment is reset: tuning augment never retrains the model trained without it
    tuned = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"max_ratio": 0.2, "seed": 7})})
    assert ablated_config(tuned, "augment").section("augment") == abl.section("augment")


def test_plan_lists_the_branch_with_its_own_keys(tmp_path):
    """``c2m status``: the branch's steps are planned (labels, keys) from the config alone; the stages before
    augment are shared, the ones after get keys of their own, and a config without the ablation keeps its keys."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", {"paths.raw": str(ROOT / "data" / "sample" / "raw"),
                                                        "paths.store": str(tmp_path / "store")})
    store = Store(cfg.paths.store)
    source = scan_raw(cfg.paths.raw, cfg.ingest.include, store)
    plain = {s.stage: s for s in plan(cfg, store, source)}
    abl = {s.stage: s for s in plan(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"ablate": ["augment"]})}),
                                    store, source)}
    assert list(plain) == [s.name for s in TABLE] and set(abl) == set(plain) | set(AUG)
    for name in plain:
        assert (abl[name].key == plain[name].key) == (name != "evaluate"), name
    for label in AUG:
        main = label.removesuffix("_no_augment")
        assert abl[label].key != plain[main].key and not abl[label].cached
        assert abl[label].detail == f"evaluate.ablate: {main} without augment"
    assert abl["augment_no_augment"].sections["augment"]["methods"] == []
    assert abl["evaluate"].upstream[-1] == f"finetune_no_augment:{abl['finetune_no_augment'].key}"


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------
ROWS = [{"variant": "base", "perplexity": 100.0, "exact_match": 0.0},
        {"variant": "tuned", "perplexity": 20.0, "exact_match": 0.30},
        {"variant": "tuned_no_augment", "perplexity": 19.0, "exact_match": 0.35},
        {"variant": "dynamic_int8", "perplexity": 20.5, "exact_match": 0.30}]


def _check(rows, **gate):
    result = registry.check_gate(rows, Gate(**gate), "dynamic_int8")
    return result, {c["name"]: c for c in result["checks"]}


def test_gate_augmentation_must_not_hurt_relative_for_perplexity():
    result, _ = _check(ROWS)
    assert result["passed"] and len(result["checks"]) == 2  # off by default
    result, checks = _check(ROWS, max_augment_regression=0.10)  # 20 <= 19 * 1.10
    assert result["passed"] and checks["tuned_vs_tuned_no_augment"]["threshold"] == pytest.approx(20.9)
    result, checks = _check(ROWS, max_augment_regression=0.02)  # 20 > 19 * 1.02
    assert not result["passed"] and "augmentation hurt" in result["reason"]
    assert evaluate.gate_marks(result, ROWS)["tuned"] == "fail"  # vs base passed, vs no-augment failed


def test_gate_augmentation_must_not_hurt_absolute_for_higher_is_better():
    _, checks = _check(ROWS, metric="exact_match", min_improvement_over_base=0.0, max_augment_regression=0.05)
    assert checks["tuned_vs_tuned_no_augment"]["passed"]  # 0.30 >= 0.35 - 0.05
    _, checks = _check(ROWS, metric="exact_match", min_improvement_over_base=0.0, max_augment_regression=0.04)
    assert not checks["tuned_vs_tuned_no_augment"]["passed"]


def test_gate_without_ablation_rows_fails_and_says_how_to_get_them():
    rows = [r for r in ROWS if r["variant"] != "tuned_no_augment"]
    result, checks = _check(rows, max_augment_regression=0.1)
    assert not result["passed"] and "set evaluate.ablate: [augment]" in checks["tuned_vs_tuned_no_augment"]["reason"]


def test_ablation_row_is_no_serving_candidate_in_the_marks():
    gate, _ = _check(ROWS, max_augment_regression=0.1)
    marks = evaluate.gate_marks(gate, ROWS)
    assert marks["tuned"] == "pass" and "tuned_no_augment" not in marks


# ---------------------------------------------------------------------------------------------
# the branch through run_stage, on small data
# ---------------------------------------------------------------------------------------------
def _records(n: int = 120) -> list[dict]:
    """math_qa prompts long enough to augment (synonyms: big, began, quickly) with a learnable answer."""
    out = []
    for i in range(n):
        a, b = 3 + i % 37, 5 + (i * 7) % 41
        out.append(make_record(f"Question {i}: the big dog began to run {a} km and then ran {b} km more quickly, "
                               f"how far did it go?", f"{a} plus {b} is {a + b}.\n#### {a + b}",
                               task_type="math_qa", domain="math", source="t", source_path="t.jsonl", source_line=i))
    return out


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    cfg = chain_config(root, augment={"methods": ["synonym"], "max_ratio": 0.5, "min_words": 4},
                       validate={"suite": str(ROOT / "schemas" / "suites" / "training_records.yaml")},
                       finetune={"max_steps": 16, "eval_every": 8},
                       quantize={"methods": []},
                       evaluate={"ablate": ["augment"], "max_records": 16, "generate_records": 2, "max_new_tokens": 6,
                                 "latency_runs": 2, "throughput_runs": 1, "batch_size": 2, "threads": 1})
    # what dedup hands to augment: one records Parquet file with role "data"
    folder = root / "dedup"
    (folder / "parts").mkdir(parents=True)
    p = folder / "parts" / "000000.parquet"
    recs = _records()
    pq.write_table(records_table(recs), p)
    dedup = Manifest(stage="dedup", stage_version="1", key="dedup0001", path=str(folder),
                     files=[FileEntry("parts/000000.parquet", p.stat().st_size, sha256_file(p), "data", len(recs))],
                     counters={"in": len(recs), "out": len(recs), "rejected": {}, "duplicates": 0})
    ctx = StageContext(store=Store(cfg.paths.store))
    by = {n.label: n for n in nodes(cfg.evaluate.ablate)}
    done = {"dedup": dedup}
    order = ["augment", "validate", "shard", "tokenize", "finetune", "quantize", *AUG, "evaluate"]
    for label in order:
        node = by[label]
        ncfg = ablated_config(cfg, node.ablation) if node.ablation else cfg
        done[label] = run_stage(node.stage, [done[u] for u in node.inputs], ncfg, ctx)
    return cfg, ctx, by, done


def test_ablated_augment_passes_records_through_under_its_own_key(branches):
    _, _, _, done = branches
    main, abl = done["augment"], done["augment_no_augment"]
    assert main.counters["added"] > 0 and abl.counters["added"] == 0
    assert abl.counters["out"] == abl.counters["in"] == done["dedup"].counters["out"]
    assert abl.key != main.key and Path(abl.path).parent == Path(main.path).parent  # the augment store folder


def test_held_out_originals_are_the_same_in_both_branches(branches):
    cfg, _, _, done = branches
    main, _, _ = evaluate.held_out_records(done["shard"], "test", 10_000)
    abl, _, _ = evaluate.held_out_records(done["shard_no_augment"], "test", 10_000)
    children = [r for r in main if (r["metadata"] or {}).get("parent_id")]
    originals = {r["id"] for r in main} - {r["id"] for r in children}
    assert originals == {r["id"] for r in abl} and originals  # per-record split: the same originals held out
    assert all(c["metadata"]["parent_id"] in originals for c in children)  # a copy lands in its parent's split


def test_evaluate_adds_the_ablation_row_on_the_same_records(branches):
    _, _, _, done = branches
    report = json.loads((Path(done["evaluate"].path) / "eval.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["base", "tuned", "tuned_no_augment", "merged"]
    t, a = rows["tuned"], rows["tuned_no_augment"]
    assert a["records"] == t["records"] and a["generated"] == t["generated"]
    assert a["perplexity"] > 1.0 and a["format"] == t["format"] == "peft" and a["train_cpu_hours"] > 0
    assert a["top1_agreement"] is None  # another tokenizer: argmax ids are not comparable
    assert any("tuned_no_augment" in n and "tokenizer" in n for n in report["notes"])
    assert "tuned_no_augment" in (Path(done["evaluate"].path) / "eval.md").read_text()


def test_branch_rerun_recomputes_nothing(branches):
    cfg, ctx, by, done = branches
    for label in AUG + ["evaluate"]:
        node = by[label]
        ncfg = ablated_config(cfg, node.ablation) if node.ablation else cfg
        again = run_stage(node.stage, [done[u] for u in node.inputs], ncfg, ctx)
        assert again.stats["cache"] == "hit" and again.key == done[label].key, label
