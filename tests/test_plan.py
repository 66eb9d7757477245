"""The plan: keys computed before running, and the 'why' wording users read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from corpus2model.flows.plan import config_diff, plan, source_diff
from corpus2model.flows.stages import DAG, DATA_STAGES, STAGES, TABLE, through
from corpus2model.schemas.config import load_config
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.stage import Manifest, Store, cache_key, canonical_json, stage_key, stage_sections
from helpers import ROOT

GOLDEN = Path(__file__).with_name("golden_demo_keys.json")


def test_config_diff_names_the_dotted_field():
    old = {"finetune": {"learning_rate": 0.002, "lora": {"r": 8}}}
    new = {"finetune": {"learning_rate": 0.0001, "lora": {"r": 8}}}
    assert config_diff(old, new) == ["finetune.learning_rate 0.002 → 0.0001"]
    assert config_diff(new, new) == []
    assert config_diff({"_extra": {"suite_sha256": "a"}}, {"_extra": {"suite_sha256": "b"}}) == ['suite_sha256 "a" → "b"']


def test_source_diff_says_added_changed_removed():
    old = {"a.txt": "1", "b.txt": "2", "c.txt": "3"}
    new = {"a.txt": "1", "b.txt": "9", "d.txt": "4"}
    assert source_diff(old, new) == ["raw file added: d.txt", "raw file changed: b.txt", "raw file removed: c.txt"]
    many = {f"f{i}.txt": "x" for i in range(5)}
    assert source_diff({}, many) == ["raw files added: f0.txt, f1.txt, f2.txt (+2 more)"]


def test_dag_is_ordered_and_closed():
    seen = {"source"}
    for stage, ups in DAG:
        assert set(ups) <= seen, f"{stage} depends on a stage that runs later"
        seen.add(stage)


def test_table_declares_every_stage_once_with_its_module_version():
    from corpus2model.tasks import finetune, validate

    assert len(STAGES) == len(TABLE) and [n for n, _ in DAG] == [s.name for s in TABLE]
    assert STAGES["finetune"].version == finetune.VERSION and STAGES["finetune"].sections == ("finetune", "model")
    assert [s.name for s in TABLE if s.validation] == ["check_raw", "check_clean", "check_augment", "validate"]
    assert STAGES["check_raw"].version == validate.VERSION and STAGES["check_raw"].inputs == ("source", "ingest")
    assert DATA_STAGES[-1] == "shard" and through("tokenize") == DATA_STAGES + ["tokenize"]


def test_finetune_reads_shard_but_keys_on_tokenize(make_cfg):
    cfg = make_cfg()
    tok, shard = Manifest(stage="tokenize", key="t1"), Manifest(stage="shard", key="s1")
    ft = STAGES["finetune"]
    assert ft.inputs == ("tokenize", "shard")
    assert stage_key(ft, cfg, [tok, shard]) == stage_key(ft, cfg, [tok])
    assert stage_key(ft, cfg, [Manifest(stage="tokenize", key="t2"), shard])[0] != stage_key(ft, cfg, [tok])[0]


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"raw": ROOT / cfg.paths.raw})})
    store = Store(tmp_path_factory.mktemp("store"))
    source = scan_raw(cfg.paths.raw, cfg.ingest.include, store)
    return cfg, source, {s.stage: s for s in plan(cfg, store, source)}


def test_demo_keys_move_only_with_a_version_or_their_content(demo_plan):
    """The restructuring moved no key: every stage whose VERSION and hashed sections (config and the
    content it points at, e.g. a suite file) are what tests/golden_demo_keys.json recorded gets the
    recorded key from the recorded upstream keys. A bumped or re-configured stage may differ."""
    cfg, source, steps = demo_plan
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))["stages"]
    assert list(golden) == [s.name for s in TABLE]
    keys = {"source": source.key, **{name: g["key"] for name, g in golden.items()}}
    same = []
    for st in TABLE:
        g = golden[st.name]
        sections = json.loads(canonical_json(stage_sections(st, cfg)))
        # The key function itself: the recorded inputs still give the recorded key.
        ups = [f"{u}:{keys[u]}" for u in (st.key_inputs or st.inputs)]
        assert cache_key(st.name, g["version"], g["sections"], ups) == g["key"], st.name
        if st.version == g["version"] and sections == g["sections"]:
            same.append(st.name)
            assert stage_key(st, cfg, ups)[0] == g["key"], f"{st.name}: key moved without a version bump"
        # And the plan computes what the table says, chained from its own upstream keys.
        plan_ups = [f"{u}:{steps[u].key if u in steps else source.key}" for u in st.inputs]
        assert steps[st.name].key == stage_key(st, cfg, plan_ups)[0]
    # The model half of the DAG was not touched by the restructuring's version bumps.
    assert {"finetune", "quantize", "evaluate"} <= set(same), same
