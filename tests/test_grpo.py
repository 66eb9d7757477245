"""GRPO (finetune.objective: grpo, tasks/model/grpo.py): the reward, the group advantages, the clipped loss,
the group batches, a short run whose held-out reward rises, and the stage + evaluation table plumbing."""
from __future__ import annotations

import random

import pytest
import torch

from corpus2model.schemas.records import make_record
from corpus2model.tasks import finetune
from corpus2model.tasks.model import grpo, trainer
from corpus2model.tasks.model.modeling import build_model
from corpus2model.tasks.tokenize import load_tokenizer

from helpers import chain_config, run_chain


def test_reward_format_and_correctness():
    ref = "3 plus 4 is 7.\n#### 7"
    assert grpo.reward("so 3 + 4 = 7\n#### 7", ref) == 1.5
    assert grpo.reward("#### 8", ref) == 0.5  # format without the right number
    assert grpo.reward("3 plus 4 is 7.", ref) == 0.0  # right number, no "#### N": no reward at all
    assert grpo.reward("####", ref) == 0.0 and grpo.reward("", ref) == 0.0
    assert grpo.reward("#### 1,234", "#### 1234", 0.2, 2.0) == pytest.approx(2.2)


def test_group_advantages_are_normalised_per_group():
    adv = grpo.group_advantages([0.0, 0.5, 0.5, 1.5, 0.5, 0.5, 0.5, 0.5], 4)
    first, second = adv[:4], adv[4:]
    assert float(first.mean()).__abs__() < 1e-6 and float(first.std()) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(second == 0)  # a group that all scores the same teaches nothing


def test_clipped_loss_clips_and_counts_completion_tokens():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # ratio 2 on the first token
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, n = grpo.clipped_loss(logp, old, adv, mask, clip_eps=0.2)
    assert n == 3
    # row 0: -min(2*1, 1.2*1) = -1.2, -min(1, 1) = -1; row 1: -min(2*-1, 1.2*-1) = 2 (unclipped: pessimistic)
    assert float(loss.detach()) == pytest.approx((-1.2 - 1.0 + 2.0) / 3)
    loss.backward()
    assert logp.grad[0, 0] == 0  # clipped: no gradient pushes the ratio further
    assert logp.grad[1, 1] == 0  # not a completion token
    with_kl, _ = grpo.clipped_loss(logp.detach(), old, adv, mask, 0.2, beta=0.5, ref_logp=old)
    assert float(with_kl) > float(loss)  # the k3 estimate is >= 0 and > 0 where policy != reference


def test_group_batches_reuse_a_group_for_num_iterations_steps():
    drawn = []

    def sample(idx):
        drawn.append(tuple(idx))
        return {"x": torch.tensor(idx)}

    b = grpo.GroupBatches(8, sample, 2, seed=0, grad_accum=2, num_iterations=3)
    steps = [[next(b) for _ in range(2)] for _ in range(6)]  # 6 optimizer steps of 2 micro-batches
    assert len(drawn) == 4  # two rounds of 3 steps, 2 group batches each
    assert steps[0][0] is steps[2][0] and steps[0][1] is steps[1][1] and steps[3][0] is not steps[0][0]
    order = trainer.batch_order(8, 2, 0, 0)
    assert drawn == [tuple(o) for o in order]
    assert b.position == 12


def _mixed_format_records(n: int = 200, every: int = 4) -> list[dict]:
    """Addition questions where only every ``every``-th target ends in "#### N": a model SFT-ed on them
    emits the format sometimes when sampling, rarely when greedy (what GRPO can reinforce)."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        target = f"{a} plus {b} is {a + b}." + (f"\n#### {a + b}" if i % every == 0 else "")
        out.append(make_record(f"What is {a} plus {b}?", target, task_type="math_qa", domain="math"))
    return out


def test_grpo_raises_heldout_reward_after_brief_sft(tmp_path):
    torch.set_num_threads(1)
    cfg = chain_config(tmp_path, finetune={"method": "full", "max_steps": 100, "eval_every": 1000, "checkpoint_every": 0,
                                           "learning_rate": 3e-3, "warmup_steps": 2, "batch_size": 8})
    m = run_chain(tmp_path, cfg, "tokenize", _mixed_format_records())
    tok, shard = m["tokenize"], m["shard"]
    tokenizer = load_tokenizer(finetune.tokenizer_dir(tok))
    model = build_model(cfg.model, tokenizer, int(tok.stats["seq_len"]))
    # The starting policy: a short SFT through the shared loop (a random init never writes "#### N").
    batches, _, loss_fn, *_ = finetune._sft_setup(tok, cfg.finetune, model, tmp_path / "hf")
    trainer.train(model, batches, lambda: 0.0, cfg.finetune, loss_fn, progress=False)

    ft = cfg.finetune.model_copy(update={
        "objective": "grpo", "max_steps": 10, "learning_rate": 1e-3, "eval_every": 5, "warmup_steps": 0, "batch_size": 4,
        "grpo": cfg.finetune.grpo.model_copy(update={"num_generations": 4, "max_new_tokens": 16, "heldout_prompts": 16})})
    batches, evaluate, loss_fn, n_train, n_held, notes, extra = grpo.setup(tok, shard, ft, model, tokenizer)
    assert extra["grpo"]["heldout_split"] == "validation" and n_held == 16 and n_train > 100
    res = trainer.train(model, batches, evaluate, ft, loss_fn, progress=False)
    rewards = [-r["eval_loss"] for r in res["history"] if r["eval_loss"] is not None]
    assert rewards[-1] >= rewards[0] + 0.2, f"held-out mean reward per evaluation (steps 0, 5, 10): {rewards}"


def test_grpo_stage_writes_stats_and_evaluate_adds_reward_column(tmp_path):
    torch.set_num_threads(1)
    cfg = chain_config(tmp_path, finetune={"objective": "grpo", "method": "full", "max_steps": 2, "eval_every": 2,
                                           "batch_size": 2, "checkpoint_every": 0,
                                           "grpo": {"num_generations": 2, "max_new_tokens": 6, "heldout_prompts": 3}},
                       evaluate={"max_records": 8, "generate_records": 3, "max_new_tokens": 6, "latency_runs": 2,
                                 "throughput_runs": 1})
    m = run_chain(tmp_path, cfg, "evaluate", _mixed_format_records(60))
    st = m["finetune"].stats
    assert st["objective"] == "grpo" and st["grpo"]["format_weight"] == 0.5 and st["steps"] == 2
    import json

    rows = {r["variant"]: r for r in json.loads((m["evaluate"].dir / "eval.json").read_text())["rows"]}
    assert rows["base"]["reward"] is not None and rows["tuned"]["reward"] is not None
    assert "reward" not in rows.get("dynamic_int8", {})
    assert "| reward |" in (m["evaluate"].dir / "eval.md").read_text()


def test_grpo_without_math_prompts_is_a_clear_error(tmp_path):
    cfg = chain_config(tmp_path, finetune={"objective": "grpo"})
    recs = [make_record(f"Say {i}", f"I say {i} and {i + 1}.", task_type="instruction") for i in range(40)]
    m = run_chain(tmp_path, cfg, "tokenize", recs)
    tokenizer = load_tokenizer(finetune.tokenizer_dir(m["tokenize"]))
    model = build_model(cfg.model, tokenizer, 64)
    with pytest.raises(finetune.StageError, match="no math_qa records"):
        grpo.setup(m["tokenize"], finetune.shard_of(m["tokenize"]), cfg.finetune, model, tokenizer)
