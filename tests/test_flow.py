"""The whole DAG under one session-scoped prefect_test_harness, on a slice of the demo data with a
tiny model. The tests run in file order and share one project: a cold run, a rerun that executes
nothing, a learning-rate change that reruns only model stages, one added raw file, one deleted
cached file."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml

from corpus2model.flows.stages import DAG, DATA_STAGES
from helpers import ROOT

pytestmark = pytest.mark.flow

TINY = {
    "tokenize": {"vocab_size": 400, "seq_len": 64},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "finetune": {"max_steps": 12, "batch_size": 4, "eval_every": 6, "warmup_steps": 2, "learning_rate": 0.005},
    "evaluate": {"max_records": 12, "generate_records": 2, "max_new_tokens": 8, "latency_runs": 3},
    "registry": {"model_name": "flow-test", "gate": {"min_improvement_over_base": 0.0, "max_quantized_degradation": 1.0}},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("project")
    raw = root / "raw"
    shutil.copytree(ROOT / "data" / "sample" / "raw" / "corpus", raw / "corpus")
    (raw / "sft").mkdir()
    with gzip.open(ROOT / "data" / "sample" / "raw" / "sft" / "gsm8k_selfinstruct_600.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()[:160]
    (raw / "sft" / "sample.jsonl").write_text("".join(lines), encoding="utf-8")
    cfg = {"name": "flowtest", "paths": {"raw": str(raw), "store": str(root / "store"), "registry": str(root / "registry")},
           "validate": {"suite": str(ROOT / "schemas" / "suites" / "training_records.yaml")}, **TINY}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"root": root, "config": path, "raw": raw}


def run(project, **overrides):
    from corpus2model.flows.pipeline import pipeline

    result = pipeline(config_path=str(project["config"]), overrides=overrides or None)
    return result, {r["stage"]: r for r in result["rows"]}


def test_cold_run_builds_everything(project):
    result, rows = run(project)
    assert [s for s, _ in DAG] == list(rows)
    assert all(r["status"] == "ran" for r in rows.values()), rows
    assert rows["ingest"]["why"] == "first run"
    # every record is accounted for: ingest's rejects are counted, clean quarantines with reasons
    ing = rows["ingest"]
    assert ing["records_in"] == ing["records_out"] + ing["rejected"]
    assert rows["dedup"]["duplicates"] >= 1  # the sample's planted byte-identical copies
    reg = result["registered"]
    assert reg["version"] == "v1" and Path(reg["path"], "model", "model.safetensors").is_file()
    assert Path(result["links"]["validation report"]).is_file()
    store = Path(project["root"], "store")
    for stage, ups in DAG:  # the flow wires exactly the DAG table
        (folder,) = [p for p in (store / stage).iterdir()]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sorted(manifest["upstream"]) == sorted(ups), stage


def test_rerun_executes_no_stage(project):
    result, rows = run(project)
    assert [r["status"] for r in rows.values()] == ["cached"] * len(DAG)
    assert result["registered"]["created"] is False and result["registered"]["version"] == "v1"


def test_learning_rate_change_reruns_no_data_stage(project):
    _, rows = run(project, **{"finetune.learning_rate": 0.004})
    assert all(rows[s]["status"] == "cached" for s in DATA_STAGES + ["tokenize"])
    assert rows["finetune"]["status"] == "ran"
    assert "finetune.learning_rate 0.005 → 0.004" in rows["finetune"]["why"]
    assert rows["quantize"]["status"] == "ran" and rows["evaluate"]["status"] == "ran"


def test_added_raw_file_is_the_only_one_ingested(project):
    (project["raw"] / "corpus" / "added.txt").write_text(
        "A new document arrives in the raw folder. It is long enough to pass the length filter.\n", encoding="utf-8")
    _, rows = run(project)
    assert rows["ingest"]["status"] == "ran" and "raw file added: corpus/added.txt" in rows["ingest"]["why"]
    assert rows["ingest"]["detail"].startswith("1/")  # "1/N units computed"
    assert rows["clean"]["detail"].startswith("1/")
    assert rows["ingest"]["records_out"] >= 1


def test_deleted_cached_file_recomputes_only_that_stage(project):
    store = Path(project["root"], "store")
    _, before = run(project)
    assert all(r["status"] == "cached" for r in before.values())
    (shard_dir,) = [p for p in (store / "shard").iterdir() if p.name.startswith(before["shard"]["key"])]
    victim = next(shard_dir.glob("train/*.parquet"))
    victim.unlink()
    _, rows = run(project)
    assert rows["shard"]["status"] == "ran" and "output file missing" in rows["shard"]["why"]
    assert victim.is_file()
    assert [s for s, r in rows.items() if r["status"] == "ran"] == ["shard"]
