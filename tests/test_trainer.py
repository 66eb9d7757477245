"""tasks.model.trainer: schedule, data order, accumulation, early stopping, and exact resume after a crash."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tiny_lm  # noqa: E402  (tests/ is on sys.path: pytest rootdir-relative import)
from corpus2model.tasks.model import peft_methods, trainer  # noqa: E402
from corpus2model.tasks.finetune import evaluate_loss, sft_loss_fn  # noqa: E402


def test_lr_has_warmup_cosine_and_a_floor():
    lrs = [trainer.lr_at(s, 100, 10, 1.0, min_ratio=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert min(lrs[10:]) >= 0.2 and trainer.lr_at(100, 100, 10, 1.0, 0.2) == pytest.approx(0.2)
    assert trainer.lr_at(55, 100, 10, 1.0, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_batch_order_is_a_seeded_permutation_and_batches_resume_by_position():
    a = trainer.batch_order(10, 4, seed=3, epoch=0)
    assert a == trainer.batch_order(10, 4, 3, 0) and a != trainer.batch_order(10, 4, 3, 1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]
    full = trainer.Batches(10, lambda idx: idx, 4, seed=3)
    seq = [next(full) for _ in range(7)]  # crosses into epoch 2
    resumed = trainer.Batches(10, lambda idx: idx, 4, seed=3, position=4)
    assert [next(resumed) for _ in range(3)] == seq[4:]


def _run(ft, ckpt=None, crash_after=None, data=None):
    data = data if data is not None else tiny_lm.packed_tensors()
    n_val = 4
    val = {k: v[:n_val] for k, v in data.items()}
    train = {k: v[n_val:] for k, v in data.items()}
    model = peft_methods.prepare(tiny_lm.model(), ft)
    loss_fn = sft_loss_fn()
    batches = trainer.Batches(train["input_ids"].shape[0], tiny_lm.getter(train), ft.batch_size, ft.seed)
    loader = [val]
    return trainer.train(model, batches, lambda: evaluate_loss(model, loader, loss_fn), ft, loss_fn,
                         ckpt_dir=ckpt, crash_after=crash_after, progress=False), model


def _losses(history):
    return [(r["step"], r["train_loss"], r["lr"], r["eval_loss"]) for r in history]


def test_a_crashed_run_resumes_from_its_checkpoint_with_the_same_loss_curve(tmp_path):
    """LoRA dropout 0.1 draws from torch's RNG every step: only a restored RNG state (and data
    position and AdamW moments) makes the resumed curve equal the uninterrupted one exactly."""
    ft = tiny_lm.ft_config(max_steps=10, checkpoint_every=3)
    whole, _ = _run(ft, ckpt=tmp_path / "a")
    with pytest.raises(trainer.SimulatedCrash):
        _run(ft, ckpt=tmp_path / "b", crash_after=7)
    # The kill came after step 7; the newest complete checkpoint is step 6 (keep_checkpoints=2).
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000003", "step-00000006"]
    assert all(p.suffix == ".safetensors" or p.name == "state.json" for p in (tmp_path / "b" / "step-00000006").iterdir())
    resumed, model = _run(ft, ckpt=tmp_path / "b")
    assert resumed["resumed_from"] == 6 and whole["resumed_from"] is None
    assert _losses(resumed["history"]) == _losses(whole["history"])
    assert resumed["final_eval_loss"] == whole["final_eval_loss"]
    assert whole["final_eval_loss"] < whole["initial_eval_loss"] - 0.3


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    ft = tiny_lm.ft_config(max_steps=3, checkpoint_every=2, eval_every=3)
    with pytest.raises(trainer.SimulatedCrash):
        _run(ft, ckpt=tmp_path, crash_after=2)
    (tmp_path / "step-00000004.tmp").mkdir()  # a kill while writing the next one
    assert trainer.latest_checkpoint(tmp_path).name == "step-00000002"


def test_grad_accumulation_equals_one_big_batch():
    # batch_order cuts one permutation: 2 micro-batches of 4 are the first batch of 8.
    big, _ = _run(tiny_lm.ft_config(max_steps=3, batch_size=8, lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    acc, _ = _run(tiny_lm.ft_config(max_steps=3, batch_size=4, grad_accum=2, lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    for a, b in zip(big["history"][1:], acc["history"][1:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert big["final_eval_loss"] == pytest.approx(acc["final_eval_loss"], rel=1e-4)


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    res, _ = _run(tiny_lm.ft_config(max_steps=12, eval_every=2, early_stopping_patience=2,
                                    early_stopping_min_delta=100.0))
    assert res["stopped_early"] and res["steps"] == 4
    assert [r["step"] for r in res["history"] if r["eval_loss"] is not None] == [0, 2, 4]


def test_fp16_is_refused_on_cpu_and_bf16_trains():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        trainer.autocast_for("fp16", "cpu")
    res, _ = _run(tiny_lm.ft_config(max_steps=3, precision="bf16"))
    assert all(r["train_loss"] > 0 for r in res["history"][1:])


def test_on_eval_returning_true_prunes_the_run():
    seen = []
    ft = tiny_lm.ft_config(max_steps=12, eval_every=2, checkpoint_every=0)
    data = tiny_lm.packed_tensors()
    model = peft_methods.prepare(tiny_lm.model(), ft)
    loss_fn = sft_loss_fn()
    val = [{k: v[:4] for k, v in data.items()}]
    res = trainer.train(model, trainer.Batches(20, tiny_lm.getter(data), 4, 0),
                        lambda: evaluate_loss(model, val, loss_fn), ft, loss_fn, progress=False,
                        on_eval=lambda step, loss: seen.append(step) or step >= 4)
    assert res["pruned"] and res["steps"] == 4 and seen == [2, 4]


def test_one_accelerate_process_trains_exactly_as_without_it(tmp_path):
    from pathlib import Path

    import yaml
    from accelerate import Accelerator

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_use_orig_params"] is True
    ft = tiny_lm.ft_config(max_steps=4, checkpoint_every=2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    plain, _ = _run(ft)
    data = tiny_lm.packed_tensors()
    val = [{k: v[:4] for k, v in data.items()}]
    train = {k: v[4:] for k, v in data.items()}
    model = peft_methods.prepare(tiny_lm.model(), ft)
    loss_fn = sft_loss_fn()
    acc = Accelerator(cpu=True)
    res = trainer.train(model, trainer.Batches(train["input_ids"].shape[0], tiny_lm.getter(train), 4, 0),
                        lambda: evaluate_loss(model, val, loss_fn), ft, loss_fn, progress=False, accelerator=acc,
                        ckpt_dir=tmp_path)
    assert [r["train_loss"] for r in res["history"][1:]] == pytest.approx([r["train_loss"] for r in plain["history"][1:]], rel=1e-6)
    assert trainer.latest_checkpoint(tmp_path).name == "step-00000002"
