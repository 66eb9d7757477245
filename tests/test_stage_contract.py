"""The stage contract: content keys, verified hits, atomic outputs, counters, config errors."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from corpus2model.schemas.config import ConfigError, load_config, parse_config
from corpus2model.tasks.stage import (
    CounterMismatch, FileEntry, Manifest, StageContext, Store, cache_key, check_counters, run_stage, stage_key, verify,
)


def make_stage(name="toy", version="1", counters=None, calls=None):
    """A tiny stage module: writes one file whose content depends on its config."""

    def run(inputs, cfg, out_dir: Path, ctx):
        if calls is not None:
            calls.append(1)
        (out_dir / "out.txt").write_text(f"lr={cfg.finetune.learning_rate}", encoding="utf-8")
        return Manifest(stage=name, files=[FileEntry("out.txt", role="data", records=1)],
                        counters=counters if counters is not None else {"in": 1, "out": 1, "rejected": {}, "duplicates": 0})

    return types.SimpleNamespace(STAGE=name, VERSION=version, SECTIONS=("finetune",), run=run)


def test_cache_key_is_content_only_and_sensitive():
    k = cache_key("clean", "1", {"a": 1, "b": [1, 2]}, ["ingest:x"])
    assert k == cache_key("clean", "1", {"b": [1, 2], "a": 1}, ["ingest:x"])  # key order irrelevant
    assert k != cache_key("clean", "2", {"a": 1, "b": [1, 2]}, ["ingest:x"])
    assert k != cache_key("clean", "1", {"a": 2, "b": [1, 2]}, ["ingest:x"])
    assert k != cache_key("clean", "1", {"a": 1, "b": [1, 2]}, ["ingest:y"])


def test_stage_hashes_only_its_sections(make_cfg):
    mod = make_stage()
    base = make_cfg()
    k0, _ = stage_key(mod, base, [])
    assert stage_key(mod, make_cfg({"clean": {"min_chars": 3}}), [])[0] == k0  # another stage's section
    assert stage_key(mod, make_cfg({"finetune": {"threads": 1}}), [])[0] == k0  # speed-only field
    assert stage_key(mod, make_cfg({"finetune": {"learning_rate": 1e-4}}), [])[0] != k0


def test_run_stage_hit_miss_and_atomic_layout(make_cfg, ctx):
    calls = []
    mod = make_stage(calls=calls)
    cfg = make_cfg()
    m = run_stage(mod, [], cfg, ctx)
    assert m.stats["cache"] == "computed" and len(calls) == 1
    folder = Path(m.path)
    assert folder == ctx.store.stage_dir("toy", m.key)
    saved = json.loads((folder / "manifest.json").read_text())
    assert saved["files"][0]["bytes"] == len("lr=0.002") and len(saved["files"][0]["sha256"]) == 64
    assert saved["counters"]["in"] == 1 and saved["config_hash"]
    again = run_stage(mod, [], cfg, ctx)
    assert again.stats["cache"] == "hit" and len(calls) == 1
    assert not any((ctx.store.root / "_tmp").iterdir())  # nothing half-written left behind


def test_stage_is_told_its_final_folder(make_cfg, ctx):
    seen = []
    mod = make_stage()
    inner = mod.run
    mod.run = lambda inputs, cfg, out_dir, c: (seen.append((out_dir, c.final_dir)), inner(inputs, cfg, out_dir, c))[1]
    m = run_stage(mod, [], make_cfg(), ctx)
    (tmp, final), = seen
    assert final == Path(m.path) and tmp != final and ctx.final_dir is None


def test_damaged_output_is_detected_and_recomputed(make_cfg, ctx):
    calls = []
    mod = make_stage(calls=calls)
    m = run_stage(mod, [], make_cfg(), ctx)
    (Path(m.path) / "out.txt").write_text("truncated")
    ok, why = verify(Path(m.path))
    assert not ok and "changed size" in why
    run_stage(mod, [], make_cfg(), ctx)
    assert len(calls) == 2 and verify(Path(m.path))[0]
    (Path(m.path) / "out.txt").unlink()
    assert verify(Path(m.path)) == (False, "output file missing: out.txt")


def test_failed_stage_leaves_nothing_that_looks_finished(make_cfg, ctx):
    mod = make_stage()

    def boom(inputs, cfg, out_dir, ctx):
        (out_dir / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    mod.run = boom
    with pytest.raises(RuntimeError):
        run_stage(mod, [], make_cfg(), ctx)
    key, _ = stage_key(mod, make_cfg(), [])
    assert not ctx.store.stage_dir("toy", key).exists()
    assert not any((ctx.store.root / "_tmp").iterdir())


def test_counters_must_add_up(make_cfg, ctx):
    check_counters("x", {"in": 5, "added": 2, "out": 4, "rejected": {"too_short": 2}, "duplicates": 1})
    with pytest.raises(CounterMismatch, match="in 5"):
        check_counters("x", {"in": 5, "out": 4, "rejected": {}, "duplicates": 0})
    lossy = make_stage(counters={"in": 3, "out": 1, "rejected": {"too_short": 1}, "duplicates": 0})
    with pytest.raises(CounterMismatch):
        run_stage(lossy, [], make_cfg(), ctx)


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("finetune:\n  learning_rate: -1\n  lora: {r: zero}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "finetune.learning_rate" in str(e.value) and "finetune.lora.r" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="shard.splits"):
        parse_config({"shard": {"splits": {"train": 0.5}}})
    with pytest.raises(ConfigError, match="fine_tune"):
        parse_config({"fine_tune": {}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_demo_config_is_valid():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cfg.shard.target_bytes == 1_000_000_000 and cfg.finetune.method == "lora"


def test_overrides_use_dotted_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("finetune: {learning_rate: 0.1}\n")
    assert load_config(p, {"finetune.learning_rate": 0.5}).finetune.learning_rate == 0.5


def test_two_writers_one_key_compute_once(make_cfg, tmp_path):
    """Per-key lock: two runs racing on one store compute once; the second reuses the output."""
    import threading

    calls = []
    mod = make_stage(calls=calls)
    cfg = make_cfg()
    results = []

    def go():
        results.append(run_stage(mod, [], cfg, StageContext(Store(tmp_path / "store"))))

    threads = [threading.Thread(target=go) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and {r.key for r in results} == {results[0].key}


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from corpus2model.flows.prefect_tasks import retry_transient
    from corpus2model.tasks.stage import StageError

    def failed(exc):
        return Failed(data=exc)

    assert retry_transient(None, None, failed(OSError(5, "Input/output error")))
    assert retry_transient(None, None, failed(TimeoutError()))
    assert not retry_transient(None, None, failed(StageError("bad record")))
    assert not retry_transient(None, None, failed(ValueError("bug")))


def test_a_declared_stage_runs_and_keys_like_the_same_module(make_cfg, ctx):
    """A tasks.stage.Stage (what flows/stages.py declares) and a stage module with the same name,
    version, sections and run give the same key and the same output; the manifest names its upstream."""
    from corpus2model.tasks.stage import Stage

    mod = make_stage(name="declared")
    st = Stage(name="declared", version="1", sections=("finetune",), inputs=("a", "b"), run=mod.run,
               key_inputs=("a",), module=__name__)
    cfg = make_cfg()
    a, b = Manifest(stage="a", key="ka"), Manifest(stage="b", key="kb")
    assert stage_key(st, cfg, [a, b]) == stage_key(mod, cfg, [a])  # b is read, not keyed (key_inputs)
    assert stage_key(mod, cfg, [a, b])[0] != stage_key(mod, cfg, [a])[0]  # a module keys every input
    m = run_stage(st, [a, b], cfg, ctx)
    assert m.stage == "declared" and m.stage_version == "1" and m.upstream == {"a": "ka", "b": "kb"}
    assert run_stage(mod, [a], cfg, ctx).stats["cache"] == "hit"  # the same key: the same store entry
