"""The plan: keys computed before running, and the 'why' wording users read."""
from __future__ import annotations

from corpus2model.flows.plan import DAG, config_diff, source_diff


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
