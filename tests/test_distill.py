"""Distillation (finetune.objective: distill, tasks/model/distill.py): the loss, the teacher checks, the
teacher in the finetune key, and a student trained from a registry production teacher with the teacher's
row beside it in the evaluation table."""
from __future__ import annotations

import json

import pytest
import torch

import tiny_lm
from corpus2model.flows.stages import STAGES
from corpus2model.schemas.config import FinetuneConfig, ModelConfig
from corpus2model.tasks import finetune
from corpus2model.tasks.model import distill, trainer
from corpus2model.tasks.model.losses import causal_lm_loss
from corpus2model.tasks.model.modeling import build_model, save_model
from corpus2model.tasks.stage import StageContext, StageError, Store, run_stage, stage_key
from corpus2model.tasks.tokenize import load_tokenizer

from helpers import chain_config, run_chain


def _batch():
    data = tiny_lm.packed_tensors(16)
    return {k: v[:4] for k, v in data.items()}


def test_alpha_zero_is_the_sft_loss_and_alpha_one_with_itself_is_zero():
    student, teacher, batch = tiny_lm.model(0), tiny_lm.model(1), _batch()
    ce, n = causal_lm_loss(student, batch)
    loss, k = distill.distill_loss(student, teacher, batch, alpha=0.0, temperature=2.0)
    assert k == n and float(loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)
    self_kd, _ = distill.distill_loss(student, student, batch, alpha=1.0, temperature=3.0)
    assert abs(float(self_kd.detach())) < 1e-5
    other_kd, _ = distill.distill_loss(student, teacher, batch, alpha=1.0, temperature=3.0)
    assert float(other_kd.detach()) > 1e-4  # KL >= 0, > 0 between different models


def test_chunked_loss_and_gradients_equal_the_full_ones():
    teacher, batch = tiny_lm.model(1), _batch()
    grads = []
    for chunk in (0, 7):
        student = tiny_lm.model(0)
        loss, n = distill.distill_loss(student, teacher, batch, alpha=0.7, temperature=2.0, chunk_tokens=chunk)
        loss.backward()
        grads.append((float(loss.detach()), student.lm_head.weight.grad.clone(), student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert torch.allclose(a, b, atol=1e-6)
    assert teacher.lm_head.weight.grad is None  # the teacher is never trained


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    from helpers import tiny_tokenizer

    other = tiny_tokenizer()
    teacher = build_model(ModelConfig(**tiny_lm.TINY), other, tiny_lm.SEQ_LEN)
    save_model(teacher, other, tmp_path / "teacher")
    student = tiny_lm.model(0)
    ft = tiny_lm.ft_config(objective="distill", distill={"teacher": str(tmp_path / "teacher")})
    with pytest.raises(StageError, match=r"one vocabulary: teacher .*teacher has \d+ tokens .*student \(model section\)"):
        distill.setup((None, None, None, 0, 0, [], {}), ft, student, tiny_lm.tokenizer())


def test_missing_production_teacher_is_a_clear_error(tmp_path):
    ft = FinetuneConfig(objective="distill", registry_root=tmp_path / "registry", registry_model="m")
    with pytest.raises(ValueError, match="teacher_model"):  # a student registering under its teacher's name
        chain_config(tmp_path, finetune={"objective": "distill"}, registry={"model_name": "m"})
    with pytest.raises(StageError, match="has no production version"):
        distill.teacher_folder(ft)
    assert "distill_teacher_unresolved" in distill.key_extra(ft)  # planning does not fail on an empty registry


def _register(registry, name: str, version: str, model, tokenizer) -> None:
    """A registry version as tasks/registry.py lays it out: <root>/<name>/<version>/model + aliases.json."""
    save_model(model, tokenizer, registry / name / version / "model")
    (registry / name / version / "lineage.json").write_text("{}")
    (registry / name / "aliases.json").write_text(json.dumps({"production": version, "history": []}))


def test_student_distilled_from_production_teacher(tmp_path):
    torch.set_num_threads(1)
    cfg = chain_config(tmp_path,
                       model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                       finetune={"objective": "distill", "method": "full", "max_steps": 30, "eval_every": 15,
                                 "checkpoint_every": 0, "distill": {"teacher": "production", "teacher_model": "teach", "alpha": 0.7,
                                                                    "temperature": 2.0}},
                       evaluate={"max_records": 12, "generate_records": 2, "max_new_tokens": 6, "latency_runs": 3,
                                 "throughput_runs": 1},
                       registry={"model_name": "student"})
    assert cfg.finetune.registry_root == tmp_path / "registry"  # handed over from paths.registry
    m = run_chain(tmp_path, cfg, "tokenize")
    tok, shard = m["tokenize"], m["shard"]
    tokenizer = load_tokenizer(finetune.tokenizer_dir(tok))
    # The teacher: a wider model of the same vocabulary, SFT-ed briefly through the shared loop.
    teacher_cfg = chain_config(tmp_path, finetune={"method": "full", "max_steps": 40, "checkpoint_every": 0,
                                                   "eval_every": 100})
    teacher = build_model(teacher_cfg.model, tokenizer, int(tok.stats["seq_len"]))
    b, _, lf, *_ = finetune._sft_setup(tok, teacher_cfg.finetune, teacher, tmp_path / "hf")
    trainer.train(teacher, b, lambda: 0.0, teacher_cfg.finetune, lf, progress=False)
    _register(tmp_path / "registry", "teach", "v1", teacher.eval(), tokenizer)

    ctx = StageContext(store=Store(cfg.paths.store))
    ft = run_stage(STAGES["finetune"], [tok, shard], cfg, ctx)
    st = ft.stats
    assert st["objective"] == "distill" and st["distill"]["teacher_dir"].endswith("teach/v1/model")
    assert st["final_eval_loss"] < st["initial_eval_loss"] - 1.0, (st["initial_eval_loss"], st["final_eval_loss"])
    q = run_stage(STAGES["quantize"], [ft, tok], cfg, ctx)
    ev = run_stage(STAGES["evaluate"], [shard, tok, ft, q], cfg, ctx)
    rows = {r["variant"]: r for r in json.loads((ev.dir / "eval.json").read_text())["rows"]}
    t, s = rows["teacher"], rows["tuned"]
    assert t["params"] > 2 * s["params"] and t["size_mb"] > s["size_mb"], (t, s)
    assert t["perplexity"] < s["perplexity"] and t["latency_p50_ms"] > 0 and t.get("train_cpu_hours") is None
    assert "| teacher |" in (ev.dir / "eval.md").read_text()

    # The teacher is part of the key: a new production version means a new student; the same one hits.
    key_v1 = stage_key(STAGES["finetune"], cfg, [tok, shard])[0]
    assert key_v1 == ft.key
    _register(tmp_path / "registry", "teach", "v2", build_model(teacher_cfg.model, tokenizer, 64), tokenizer)
    assert stage_key(STAGES["finetune"], cfg, [tok, shard])[0] != key_v1
