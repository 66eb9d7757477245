"""evaluate: answer extraction and perplexity as pure functions, then the whole model side
(shard -> tokenize -> finetune -> quantize -> evaluate) on 200 small records."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from schemas.config import ModelConfig  # noqa: E402
from tasks import evaluate  # noqa: E402
from tasks.evaluate import extract_final_number  # noqa: E402
from tasks.stage import StageContext, Store, run_stage  # noqa: E402
from test_finetune import chain_config, learnable_records, run_chain  # noqa: E402


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", 7.0),
    ("Total: 1,200 + 34 = 1,234\n#### 1,234", 1234.0),
    ("#### -5", -5.0),
    ("The answer is 2.50 dollars", 2.5),
    ("first 3, then 10, finally 42.", 42.0),
    ("#### $1,000,000.25 total", 1000000.25),
    ("costs .5 each", 0.5),
    ("it went from 8 to -12", -12.0),
    ("#### seven, not 7 or 9", 7.0),  # after "####" the first number there counts
    ("no digits here", None),
    ("", None),
    (None, None),
])
def test_extract_final_number(text, want):
    assert extract_final_number(text) == want


def test_answers_match_compares_numbers_not_strings():
    assert evaluate.answers_match("so the total is 1234.0", "work...\n#### 1,234")
    assert not evaluate.answers_match("so the total is 1235", "#### 1,234")
    assert not evaluate.answers_match("no idea", "#### 5")


def test_percentile_interpolates_like_numpy():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert evaluate._percentile(vals, 50) == 3.0
    assert evaluate._percentile(vals, 95) == pytest.approx(4.8)
    assert evaluate._percentile([7.0], 95) == 7.0


@pytest.fixture(scope="module")
def tiny_model():
    from tasks.modeling import build_model
    from tasks.tokenize import train_tokenizer

    texts = [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(15) for b in range(15)]
    tok = train_tokenizer(texts, vocab_size=280, min_frequency=1)
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64), tok, 64).eval()
    return model, tok


TEMPLATE = "Q: {input}\nA: "
RECORDS = [{"input": "What is 2 plus 3?", "target": "2 plus 3 is 5."},
           {"input": "", "target": "The sum of 4 and 4 is 8."}]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model):
    model, tok = tiny_model
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.zero_()  # every logit 0: p = 1/V for every token
    try:
        ppl, acc = evaluate.perplexity(model, tok, RECORDS, TEMPLATE)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert ppl == pytest.approx(len(tok), rel=1e-4)
    # argmax of all-equal logits is id 0 (pad), never a target token
    assert acc == 0.0


def test_perplexity_matches_a_direct_computation(tiny_model):
    model, tok = tiny_model
    ppl, acc = evaluate.perplexity(model, tok, RECORDS, TEMPLATE)
    nll, n, hits = 0.0, 0, 0
    for rec in RECORDS:
        prompt = TEMPLATE.format(input=rec["input"]) if rec["input"] else ""
        p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t = tok(rec["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = p + t
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for pos in range(max(len(p), 1), len(ids)):  # token ids[pos] predicted from position pos-1
            nll -= float(logp[pos - 1, ids[pos]])
            hits += int(logp[pos - 1].argmax()) == ids[pos]
            n += 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert acc == pytest.approx(hits / n)
    assert 1.0 < ppl < 10 * len(tok)


def test_exact_match_is_null_without_math_records(tiny_model):
    model, tok = tiny_model
    assert evaluate.exact_match(model, tok, [{"input": "x", "target": "y", "metadata": {"task_type": "text"}}],
                                TEMPLATE, 4) == (None, 0)


# ---------------------------------------------------------------------------------------------
# the stage, end to end from records
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    # lm_head trained in full beside the adapter (what a randomly initialised model needs to get confident)
    cfg = chain_config(root, evaluate={"threads": 1},
                       finetune={"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]}})
    return cfg, run_chain(root, cfg, upto="evaluate", records=learnable_records(200))


def test_evaluate_writes_three_rows_and_tuned_beats_base(evaluated):
    cfg, ms = evaluated
    m = ms["evaluate"]
    out = Path(m.path)
    report = json.loads((out / "eval.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["base", "tuned", "dynamic_int8"]
    assert report["split"] == "test"
    n_test = ms["shard"].stats["splits"]["test"]["records"]
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
        assert 0.0 <= r["token_accuracy"] <= 1.0
        assert r["records"] == min(n_test, cfg.evaluate.max_records)
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"]
        assert r["size_mb"] > 0 and r["params"] > 0
        assert r["exact_match"] is not None and 0.0 <= r["exact_match"] <= 1.0  # there are math_qa records
    assert rows["tuned"]["perplexity"] < 0.1 * rows["base"]["perplexity"]
    assert rows["tuned"]["token_accuracy"] > rows["base"]["token_accuracy"]
    # quantization keeps the tuned model's quality and shrinks it
    assert rows["dynamic_int8"]["perplexity"] == pytest.approx(rows["tuned"]["perplexity"], rel=0.05)
    assert rows["dynamic_int8"]["size_mb"] < 0.7 * rows["tuned"]["size_mb"]
    assert rows["base"]["size_mb"] == rows["tuned"]["size_mb"]

    md = (out / "eval.md").read_text()
    assert md.count("\n| ") == 4 and "dynamic_int8" in md
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert {f.path: f.role for f in m.files} == {"eval.json": "report", "eval.md": "report", "eval.png": "report"}
    assert m.stats["perplexity"]["tuned"] == rows["tuned"]["perplexity"]


def test_evaluate_rerun_is_a_cache_hit(evaluated):
    cfg, ms = evaluated
    again = run_stage(evaluate, [ms[s] for s in ("shard", "tokenize", "finetune", "quantize")], cfg,
                      StageContext(store=Store(cfg.paths.store)))
    assert again.stats["cache"] == "hit" and again.key == ms["evaluate"].key


def test_held_out_records_fall_back_with_a_note(evaluated):
    _, ms = evaluated
    records, split, notes = evaluate.held_out_records(ms["shard"], "no_such_split", 5)
    assert split == "validation" and len(records) == 5 and notes
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    full, _, _ = evaluate.held_out_records(ms["shard"], "validation", 10_000)
    assert records == full[:5]
