"""Kills, concurrent runs, damaged caches, a full disk: outputs stay whole and nothing is lost.

A killed process is simulated with SIGKILL from inside the victim stage, at the worst moment:
after the stage did all its work in its temp folder, before the runner renames it into place
(for ingest: after some per-file units are stored). The DAG runs without Prefect here
(flows.plan.run_local: the same keys, store and outputs as the flow)."""
from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from corpus2model.schemas.config import load_config
from corpus2model.flows import plan
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.stage import StageContext, StageError, Store, run_stage, verify
from helpers import ROOT

TINY = {
    "tokenize": {"vocab_size": 300, "seq_len": 64},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "finetune": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "warmup_steps": 1, "threads": 1},
    "evaluate": {"max_records": 8, "generate_records": 1, "max_new_tokens": 4, "latency_runs": 2, "threads": 1},
}

KILLER = textwrap.dedent("""
    import dataclasses, importlib, os, signal, sys
    from corpus2model.schemas.config import load_config
    from corpus2model.flows import plan, stages
    config, victim, after_units = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mod = importlib.import_module(stages.STAGES[victim].module)
    if after_units:  # die once that many per-file units are stored
        real_unit, seen = mod._ingest_unit, []
        def unit(args):
            info = real_unit(args)
            seen.append(1)
            if len(seen) == after_units:
                os.kill(os.getpid(), signal.SIGKILL)
            return info
        mod._ingest_unit = unit
    else:  # die after the stage's work, before its output is renamed into the store
        real_run = stages.STAGES[victim].run
        def dying(inputs, cfg, out_dir, ctx):
            real_run(inputs, cfg, out_dir, ctx)
            os.kill(os.getpid(), signal.SIGKILL)
        stages.STAGES[victim] = dataclasses.replace(stages.STAGES[victim], run=dying)
    plan.run_local(load_config(config))
""")


def make_project(root: Path, name: str) -> Path:
    raw = root / name / "raw"
    shutil.copytree(ROOT / "data" / "sample" / "raw" / "corpus", raw / "corpus")
    with gzip.open(ROOT / "data" / "sample" / "raw" / "sft" / "gsm8k_selfinstruct_600.jsonl.gz", "rt", encoding="utf-8") as f:
        (raw / "sft.jsonl").write_text("".join(f.readlines()[:80]), encoding="utf-8")
    cfg = {"name": name, "paths": {"raw": str(raw), "store": str(root / name / "store"), "registry": str(root / name / "reg")},
           "validate": {"suite": str(ROOT / "schemas" / "suites" / "training_records.yaml")}, **TINY}
    path = root / name / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def fingerprint(manifests) -> dict:
    """What must be equal between an interrupted-then-resumed run and an uninterrupted one: every key,
    and every data/model file byte for byte. Reports (role "report") carry timings and Great
    Expectations names its pages by timestamp, so only their number is compared."""
    return {s: (m.key, sorted((f.path, f.sha256) for f in m.files if f.role != "report"), len(m.entries("report")))
            for s, m in manifests.items() if s != "source"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return fingerprint(plan.run_local(load_config(make_project(root, "ref"))))


def run_killer(config: Path, victim: str, after_units: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, str(config), victim, str(after_units)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("victim", ["dedup", "shard", "finetune"])
def test_kill_inside_a_stage_then_resume(victim, tmp_path, reference):
    config = make_project(tmp_path, "ref")  # same name and content as the reference: same keys
    proc = run_killer(config, victim)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cfg = load_config(config)
    store = Store(cfg.paths.store)
    steps = {s.stage: s for s in plan.plan(cfg, store, scan_raw(cfg.paths.raw, cfg.ingest.include, store))}
    assert not steps[victim].cached  # nothing that looks finished was left behind
    upstream_of_victim = [s for s, _ in plan.DAG][: [s for s, _ in plan.DAG].index(victim)]
    assert all(steps[s].cached for s in upstream_of_victim)
    resumed = plan.run_local(cfg)
    assert all(resumed[s].stats["cache"] == "hit" for s in upstream_of_victim)
    assert fingerprint(resumed) == reference
    assert not any((store.root / "_tmp").iterdir())


def test_kill_during_ingest_reuses_the_stored_units(tmp_path, reference):
    config = make_project(tmp_path, "ref")
    proc = run_killer(config, "ingest", after_units=10)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = plan.run_local(load_config(config))
    assert resumed["ingest"].stats["units_reused"] == 10
    assert resumed["ingest"].stats["units_computed"] == resumed["ingest"].stats["units"] - 10
    assert fingerprint(resumed) == reference


def test_two_runs_at_once_on_one_store(tmp_path, reference):
    config = make_project(tmp_path, "ref")
    script = ("import json, sys; from corpus2model.schemas.config import load_config; from corpus2model.flows import plan; "
              "m = plan.run_local(load_config(sys.argv[1])); "
              "print(json.dumps({s: x.stats.get('cache') for s, x in m.items() if s != 'source'}))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    statuses = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    for stage, _ in plan.DAG:  # per-key lock: each output computed once, the other run reused it
        assert sorted(s[stage] for s in statuses) == ["computed", "hit"], stage
    assert fingerprint(plan.run_local(load_config(config))) == reference


def test_same_size_edit_of_a_cached_file_is_detected(tmp_path):
    config = make_project(tmp_path, "edit")
    cfg = load_config(config)
    first = plan.run_local(cfg)
    target = first["dedup"].files_with("data")[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    ok, why = verify(first["dedup"].dir)
    assert not ok and "edited" in why
    again = plan.run_local(cfg)
    assert again["dedup"].stats["cache"] == "computed" and again["augment"].stats["cache"] == "hit"
    assert verify(again["dedup"].dir)[0]


def test_full_disk_is_a_clear_error_and_nothing_is_marked_finished(make_cfg, ctx, records_manifest):
    from corpus2model.tasks import dedup

    records = [{"id": "a", "input": "", "target": "some text here", "metadata": {}}]
    up = records_manifest(records)

    class FullDisk:
        STAGE, VERSION, SECTIONS = dedup.STAGE, dedup.VERSION, dedup.SECTIONS

        @staticmethod
        def run(inputs, cfg, out_dir, c):
            (out_dir / "half.parquet").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "parts"))

    with pytest.raises(StageError, match="No space left on device.*paths.store"):
        run_stage(FullDisk, [up], make_cfg(), ctx)
    assert not (ctx.store.root / "dedup").exists() and not any((ctx.store.root / "_tmp").iterdir())
    # and the real stage then runs normally on the same store
    assert run_stage(dedup, [up], make_cfg(), StageContext(ctx.store)).counters["out"] == 1
