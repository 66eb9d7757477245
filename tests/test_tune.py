"""flows/tune.py: a seeded Optuna search over the tiny chain writes a loadable best config; the
trainer stops a trial its pruning callback rejects."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")
torch = pytest.importorskip("torch")

from corpus2model.flows import tune  # noqa: E402
from corpus2model.schemas.config import load_config  # noqa: E402


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_search_writes_the_best_trials_config(tmp_path):
    from helpers import chain_config, run_chain

    cfg = chain_config(tmp_path, finetune={"eval_every": 3, "max_steps": 40},
                       tune={"trials": 3, "max_steps": 6, "lora_r": [2, 4], "warmup_steps": [0, 2],
                             "learning_rate": [1e-3, 3e-2], "pruner_startup_trials": 1})
    tok = run_chain(tmp_path, cfg, upto="tokenize")["tokenize"]
    calls = []

    def run_trial(tok_, tcfg, number):
        calls.append((number, tcfg.finetune.learning_rate, tcfg.finetune.lora.r, tcfg.finetune.max_steps))
        return tune.run_trial_local(tok_, tcfg, number)

    res = tune.run_study(tok, cfg, tmp_path / "tune", run_trial, log=lambda m: None)
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[3] == 6 for c in calls)
    assert all(1e-3 <= c[1] <= 3e-2 and c[2] in (2, 4) for c in calls)
    rows = json.loads((tmp_path / "tune" / "trials.json").read_text())["rows"]
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"complete", "pruned"}
    done = [r for r in rows if r["state"] == "complete"]
    assert res["best"]["eval_loss"] == min(r["eval_loss"] for r in done)
    best = load_config(res["best_config"])
    assert best.finetune.learning_rate == pytest.approx(res["best"]["learning_rate"])
    assert best.finetune.lora.r == res["best"]["lora_r"] and best.finetune.lora.alpha == 2 * res["best"]["lora_r"]
    assert best.finetune.max_steps == 40  # the final run keeps its own length
    assert tune.trial_key(tok, best) != tune.trial_key(tok, cfg)


def test_trials_are_cached_prefect_tasks(tmp_path, monkeypatch, prefect_harness):
    """Run the same search twice in Prefect flows: the second replays every trial from the cache
    (the trainer is not called again); one more trial computes only the new one. The trainer is
    replaced by a fake here: this test is about the caching, the one above about training."""
    import uuid

    from prefect import flow

    from corpus2model.tasks import finetune
    from corpus2model.tasks.stage import Manifest
    from helpers import chain_config

    calls = []

    def fake_train_only(tok, ft, mc, on_eval=None, work_dir=None):
        calls.append(ft.learning_rate)
        loss = abs(ft.learning_rate - 3e-3) * 100 + ft.lora.r / 100
        on_eval and on_eval(3, loss)
        return {"final_eval_loss": loss, "best_eval_loss": loss, "pruned": False, "steps": 6,
                "history": [{"step": 3, "eval_loss": loss}]}

    monkeypatch.setattr(finetune, "train_only", fake_train_only)
    tok = Manifest(stage="tokenize", key=uuid.uuid4().hex[:24], stats={"seq_len": 64})
    cfg = chain_config(tmp_path, tune={"trials": 3, "max_steps": 6, "pruner_startup_trials": 3})

    @flow(name="tune-cache-test")
    def search(trials: int):
        return tune.run_study(tok, cfg, tmp_path / "tune", tune._prefect_trial, trials, log=lambda m: None)

    first = search(3)
    assert len(calls) == 3
    again = search(3)
    assert len(calls) == 3 and again["best"] == first["best"]  # all three from the cache
    search(4)
    assert len(calls) == 4  # only the new trial trained
