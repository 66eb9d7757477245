"""evaluate: answer extraction and perplexity as pure functions, then the whole model side
(shard -> tokenize -> finetune -> quantize -> evaluate) on 200 small records."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from corpus2model.schemas.config import ModelConfig  # noqa: E402
from corpus2model.schemas.records import make_record  # noqa: E402
from corpus2model.tasks import evaluate  # noqa: E402
from corpus2model.tasks.model import metrics  # noqa: E402
from corpus2model.tasks.model.metrics import extract_final_number  # noqa: E402
from corpus2model.tasks.stage import StageContext, Store, run_stage  # noqa: E402
from helpers import chain_config, learnable_records, run_chain  # noqa: E402


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
    assert metrics.answers_match("so the total is 1234.0", "work...\n#### 1,234")
    assert not metrics.answers_match("so the total is 1235", "#### 1,234")
    assert not metrics.answers_match("no idea", "#### 5")


def test_percentile_interpolates_like_numpy():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert metrics.percentile(vals, 50) == 3.0
    assert metrics.percentile(vals, 95) == pytest.approx(4.8)
    assert metrics.percentile([7.0], 95) == 7.0


@pytest.fixture(scope="module")
def tiny_model():
    from corpus2model.tasks.model.modeling import build_model
    from corpus2model.tasks.tokenize import train_tokenizer

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


def test_rouge_l_and_macro_f1():
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert metrics.rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS "the cat on mat" (4 words) of 6 and 5: P 4/5, R 4/6
    assert metrics.rouge_l("the cat on a mat", "the cat sat on the mat") == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    # label a: tp 1 fp 2 fn 1 -> F1 2/5; label b: tp 1 fp 1 fn 1 -> 1/2; label c never predicted -> 0
    assert metrics.macro_f1(["a", "a", "b", "b", "c"], ["a", "b", "b", "a", "a"]) == pytest.approx((0.4 + 0.5 + 0) / 3)
    assert metrics.macro_f1([], []) is None
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert metrics.agreement([1], [1, 2]) is None


def test_classification_picks_the_most_likely_label(tiny_model):
    model, tok = tiny_model
    recs = [{"input": f"What is {a} plus {b}?", "target": t, "metadata": {"task_type": "classification"}}
            for a, b, t in [(2, 3, "five"), (4, 4, "eight"), (1, 1, "two")]]
    acc, f1, n = evaluate.classification_scores(model, tok, recs, TEMPLATE)
    labels = sorted({r["target"] for r in recs})
    want = [max(labels, key=lambda lab: (evaluate.continuation_logprob(model, tok, TEMPLATE.format(input=r["input"]), lab), lab))
            for r in recs]
    assert n == 3 and acc == pytest.approx(sum(w == r["target"] for w, r in zip(want, recs)) / 3)
    assert f1 == pytest.approx(metrics.macro_f1([r["target"] for r in recs], want))


def test_preference_accuracy_is_antisymmetric(tiny_model):
    model, tok = tiny_model
    pairs = [{"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "The sum of 9 and 9 is 1."},
             {"prompt": "What is 4 plus 1?", "chosen": "4 plus 1 is 5.", "rejected": "no"}]
    acc, margin, n, margins = evaluate.preference_accuracy(model, tok, pairs, TEMPLATE)
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    acc2, margin2, _, margins2 = evaluate.preference_accuracy(model, tok, swapped, TEMPLATE)
    assert margins == pytest.approx([-m for m in margins2]) and sum(margins) / 2 == pytest.approx(margin)
    assert n == 2 and acc + acc2 == pytest.approx(1.0) and margin == pytest.approx(-margin2)
    lp = evaluate.continuation_logprob(model, tok, TEMPLATE.format(input=pairs[0]["prompt"]), pairs[0]["chosen"])
    assert lp < 0


def test_preference_accuracy_is_relative_to_the_base_row():
    """DPO's implicit-reward accuracy: a pair counts when the variant widened chosen-minus-rejected beyond
    the base model's; the base ties itself everywhere (0.5). Rows without pairs are left as they are."""
    rows = [{"variant": "base", "preference_accuracy": 1.0, "_pair_margins": [5.0, 2.0, -1.0, 0.5]},
            {"variant": "tuned", "preference_accuracy": 0.75, "_pair_margins": [6.0, 1.0, -0.5, 0.5]},
            {"variant": "rag_base", "preference_accuracy": None}]
    evaluate.relative_preference(rows)
    base, tuned, other = rows
    assert base["preference_accuracy"] == 0.5 and base["preference_margin"] == 0.0
    assert tuned["preference_accuracy"] == pytest.approx((2 + 0.5) / 4)  # +1, -1, +0.5, tie
    assert tuned["preference_margin"] == pytest.approx(0.5 / 4) and tuned["raw_preference_accuracy"] == 0.75
    assert other == {"variant": "rag_base", "preference_accuracy": None} and "_pair_margins" not in tuned


def test_throughput_counts_requests_and_tokens(tiny_model):
    model, tok = tiny_model
    rps, tps = evaluate.throughput(model, [5, 6, 7, 8], batch_size=3, runs=2)
    assert rps > 0 and tps == pytest.approx(4 * rps)


def test_peak_memory_sees_an_allocation():
    with evaluate.PeakMemory(interval=0.001) as mem:
        block = bytearray(64_000_000)
        import time as _t

        _t.sleep(0.05)
        del block
    assert mem.mb is None or mem.mb >= 50  # None only off Linux


GATE = {"passed": False, "metric": "perplexity", "serve_variant": "dynamic_int8", "reason": "dynamic_int8 too slow",
        "checks": [{"name": "tuned_vs_base", "value": 10.0, "threshold": 90.0, "passed": True},
                   {"name": "dynamic_int8_vs_tuned", "value": 12.0, "threshold": 11.0, "passed": False}]}
ROWS = [{"variant": "base", "perplexity": 100.0, "latency_p50_ms": 2.0, "latency_p95_ms": 3.0},
        {"variant": "tuned", "perplexity": 10.0, "latency_p50_ms": 2.0, "latency_p95_ms": 2.5},
        {"variant": "dynamic_int8", "perplexity": 12.0, "latency_p50_ms": 1.0, "latency_p95_ms": 1.5},
        {"variant": "fp16", "perplexity": 10.5, "latency_p50_ms": 1.5, "latency_p95_ms": 1.6}]


def test_gated_table_and_chart_mark_pass_and_fail(tmp_path):
    assert evaluate.gate_marks(GATE, ROWS) == {"tuned": "pass", "dynamic_int8": "fail", "fp16": "within"}
    md = evaluate.eval_markdown(ROWS, "test", [], GATE)
    assert "**FAILED**" in md and "| gate |" in md
    assert "| tuned | pass |" in md and "| dynamic_int8 | fail |" in md and "| fp16 | within |" in md
    evaluate.plot_eval(ROWS, tmp_path / "g.png", "perplexity", GATE)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    plain = evaluate.eval_markdown(ROWS, "test", [])
    assert "gate" not in plain and "ROUGE" not in plain  # columns no row has are left out


# ---------------------------------------------------------------------------------------------
# the stage, end to end from records
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    # lm_head trained in full beside the adapter (what a randomly initialised model needs to get confident)
    cfg = chain_config(root, evaluate={"threads": 1, "batch_size": 2, "throughput_runs": 2},
                       quantize={"methods": ["dynamic_int8", "onnx_int8_dynamic"]},
                       finetune={"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]}})
    # a few open-generation records, so ROUGE-L has something to score
    extra = [make_record(f"Repeat the word {w}.", f"{w} {w}", task_type="instruction", domain="general")
             for w in ("apple", "river", "stone", "cloud", "green", "seven", "table", "light", "music", "paper")]
    return cfg, run_chain(root, cfg, upto="evaluate", records=learnable_records(200) + extra)


def test_evaluate_writes_one_row_per_variant_and_tuned_beats_base(evaluated):
    cfg, ms = evaluated
    m = ms["evaluate"]
    out = Path(m.path)
    report = json.loads((out / "eval.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["base", "tuned", "merged", "dynamic_int8", "onnx_int8_dynamic"]
    assert report["split"] == "test" and report["batch_size"] == 2
    n_test = ms["shard"].stats["splits"]["test"]["records"]
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
        assert 0.0 <= r["token_accuracy"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert r["records"] == min(n_test, cfg.evaluate.max_records)
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"]
        assert r["requests_per_s"] > 0 and r["tokens_per_s"] > r["requests_per_s"]
        assert r["size_mb"] > 0
        assert r["exact_match"] is not None and 0.0 <= r["exact_match"] <= 1.0  # there are math_qa records
    assert rows["onnx_int8_dynamic"]["format"] == "onnx" and rows["onnx_int8_dynamic"]["params"] is None
    assert rows["tuned"]["format"] == "peft" and rows["merged"]["params"] > 0
    assert rows["tuned"]["perplexity"] < 0.1 * rows["base"]["perplexity"]
    assert rows["tuned"]["token_accuracy"] > rows["base"]["token_accuracy"]
    # adapter applied on the fly and merged weights are the same function
    assert rows["tuned"]["perplexity"] == pytest.approx(rows["merged"]["perplexity"], rel=1e-3)
    assert rows["merged"]["top1_agreement"] == 1.0 and rows["tuned"]["top1_agreement"] > 0.99
    assert rows["base"]["train_cpu_hours"] is None and rows["merged"]["train_cpu_hours"] > 0
    # quantization keeps the tuned model's quality and shrinks it
    for q in ("dynamic_int8", "onnx_int8_dynamic"):
        assert rows[q]["perplexity"] == pytest.approx(rows["tuned"]["perplexity"], rel=0.05)
        assert rows[q]["top1_agreement"] > 0.8
    assert rows["dynamic_int8"]["size_mb"] < 0.7 * rows["merged"]["size_mb"]
    assert rows["base"]["size_mb"] == rows["merged"]["size_mb"]
    # open generation scored by ROUGE-L on the instruction records (when the test split has any)
    if any((r.get("metadata") or {}).get("task_type") == "instruction" for r in
           evaluate.held_out_records(ms["shard"], "test", 10_000)[0]):
        assert all(r["rouge_l"] is not None and 0.0 <= r["rouge_l"] <= 1.0 for r in rows.values())

    md = (out / "eval.md").read_text()
    assert md.count("\n| ") == 6 and "onnx_int8_dynamic" in md and "top-1 vs fp32" in md
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
