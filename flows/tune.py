"""``c2m tune CONFIG``: an Optuna search over finetune settings, each trial a cached Prefect task.

The data half of the DAG runs as in ``c2m run`` (the stage table's stages through tokenize, with the
same run guards: log redaction, runtime checks, GPU limit, run record; flows/summary.py); then
``tune.trials`` trials are asked from a seeded TPE sampler over ``tune``'s space (learning rate
log-uniform, LoRA rank with alpha = 2 r, warmup steps). Each trial trains exactly as the finetune
stage does (tasks/finetune.train_only) and reports its eval loss at every evaluation; Optuna's
MedianPruner stops a trial that is worse than the median of the finished ones at the same step.

A trial's Prefect cache key is the tokenize key + the trial's finetune/model sections + what the
finetune stage's key adds (objective files, ``finetune.init``'s parent version), so running
the same search again (same seed, so the same proposals) replays every trial from the cache, and a
longer search (more trials) computes only the new ones. The best trial's config, the input config
with the best settings applied, is written to ``<store>/_tune/<name>/best.yaml`` beside
``trials.json``; ``c2m run <that file>`` trains the final model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from corpus2model.flows.stages import through
from corpus2model.flows.summary import guarded_run
from corpus2model.schemas.config import apply_overrides, load_config, parse_config
from corpus2model.tasks import finetune
from corpus2model.tasks.common.artifacts import publish_table
from corpus2model.tasks.stage import Manifest, canonical_json, sha256_bytes

# Trials hand their Optuna trial to the running task through this table (keyed by trial number):
# a trial object is live state, not a task parameter to hash or persist.
_LIVE: dict[int, object] = {}


def suggest(trial, tc, max_steps: int) -> dict:
    """Dotted finetune overrides for one trial."""
    r = trial.suggest_categorical("lora_r", list(tc.lora_r))
    return {
        "finetune.learning_rate": trial.suggest_float("learning_rate", tc.learning_rate[0], tc.learning_rate[1], log=True),
        "finetune.lora.r": r,
        "finetune.lora.alpha": 2 * r,
        "finetune.warmup_steps": trial.suggest_categorical("warmup_steps", list(tc.warmup_steps)),
        "finetune.max_steps": max_steps,
    }


def with_overrides(cfg, overrides: dict):
    """A new validated config: ``cfg`` with dotted ``overrides`` applied."""
    data = json.loads(cfg.model_dump_json(by_alias=True))
    return parse_config(apply_overrides(data, overrides), source="tune trial")


def trial_key(tok: Manifest, cfg) -> str:
    # + what the finetune stage's key adds beyond its sections (objective files, finetune.init's parent
    # version): a trial replayed from the cache must have started where a new one would
    return sha256_bytes(canonical_json({"tokenize": tok.key, "finetune": cfg.section("finetune"),
                                        "model": cfg.section("model"),
                                        "extra": finetune.key_extra(cfg, [f"tokenize:{tok.key}"])}).encode())[:24]


def run_trial_local(tok: Manifest, cfg, number: int) -> dict:
    """Train one trial; report each evaluation to the live Optuna trial (pruning)."""
    trial = _LIVE.get(number)

    def on_eval(step: int, loss: float) -> bool:
        if trial is None:
            return False
        trial.report(loss, step)
        return trial.should_prune()

    res = finetune.train_only(tok, cfg.finetune, cfg.model, on_eval=on_eval)
    evals = [(r["step"], r["eval_loss"]) for r in res["history"] if r["eval_loss"] is not None]
    return {"value": res["final_eval_loss"], "best": res["best_eval_loss"], "pruned": res["pruned"],
            "steps": res["steps"], "evals": evals}


def run_study(tok: Manifest, cfg, out_dir: Path, run_trial: Callable[[Manifest, object, int], dict],
              trials: int | None = None, log=print) -> dict:
    """Ask/tell loop; writes best.yaml and trials.json into ``out_dir``; returns the summary."""
    import optuna

    # ERROR: a replayed pruned trial re-reports steps its live run already reported (a warning each).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tc = cfg.tune
    n = trials or tc.trials
    max_steps = tc.max_steps or cfg.finetune.max_steps
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=tc.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=tc.pruner_startup_trials,
                                                                   n_warmup_steps=0))
    rows = []
    for _ in range(n):
        trial = study.ask()
        overrides = suggest(trial, tc, max_steps)
        tcfg = with_overrides(cfg, overrides)
        _LIVE[trial.number] = trial
        try:
            res = run_trial(tok, tcfg, trial.number)
        finally:
            _LIVE.pop(trial.number, None)
        if res["pruned"]:
            # A replayed (cached) pruned trial never reported live: give Optuna its curve now.
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # steps a live run already reported are ignored, with a warning
                for step, loss in res["evals"]:
                    trial.report(loss, step)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, res["value"])
        rows.append({"trial": trial.number, **trial.params, "eval_loss": res["value"],
                     "state": "pruned" if res["pruned"] else "complete", "steps": res["steps"],
                     "overrides": overrides})
        log(f"trial {trial.number}: {trial.params} -> eval {res['value']:.4f}" + (" (pruned)" if res["pruned"] else ""))
    done = [r for r in rows if r["state"] == "complete"]
    if not done:
        raise RuntimeError("every trial was pruned: raise tune.pruner_startup_trials or tune.trials")
    best = min(done, key=lambda r: r["eval_loss"])
    # The final run keeps finetune.max_steps (trials may be shorter: tune.max_steps).
    best_cfg = with_overrides(cfg, {**best["overrides"], "finetune.max_steps": cfg.finetune.max_steps})
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path = out_dir / "best.yaml"
    best_path.write_text(yaml.safe_dump(json.loads(best_cfg.model_dump_json(by_alias=True)), sort_keys=False),
                         encoding="utf-8")
    (out_dir / "trials.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1), encoding="utf-8")
    return {"rows": rows, "best": best, "best_config": str(best_path)}


def _prefect_trial(tok: Manifest, cfg, number: int) -> dict:
    from prefect import task

    @task(name="tune-trial", task_run_name=f"trial-{number}", persist_result=True, result_serializer="json",
          cache_key_fn=lambda ctx, params: f"c2m-tune-{trial_key(params['tok'], params['cfg'])}")
    def tune_trial(tok: Manifest, cfg, number: int) -> dict:
        return run_trial_local(tok, cfg, number)

    return tune_trial(tok, cfg, number)


def tune_flow_fn(config_path: str, overrides: dict | None = None, trials: int | None = None) -> dict:
    """The data stages through tokenize (the table's sequence, cached and guarded as in ``c2m run``),
    then the search."""
    cfg = load_config(config_path, overrides)
    with guarded_run(cfg) as run:
        tok = run.run(through("tokenize"))["tokenize"]
    result = run_study(tok, cfg, run.store.root / "_tune" / cfg.name, _prefect_trial, trials)
    publish_table("tune-trials", result["rows"], description=f"{cfg.name}: Optuna trials (best: trial {result['best']['trial']})")
    return result


def tune_flow():
    """The Prefect flow object (built on first use so importing this module stays light)."""
    from prefect import flow

    return flow(name="c2m-tune", log_prints=True)(tune_flow_fn)
