"""The RAG baseline rows (tasks/model/rag.py): BM25 retrieval, prompt assembly within seq_len, and the
rag_<model> rows in the evaluate stage's eval.json (shard -> ... -> evaluate on 120 small records)."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("torch")

from corpus2model.schemas.config import parse_config  # noqa: E402
from corpus2model.schemas.records import make_record  # noqa: E402
from corpus2model.tasks.model import rag  # noqa: E402
from corpus2model.tasks.shard import assign_split  # noqa: E402
from helpers import chain_config, learnable_records, run_chain, tiny_tokenizer  # noqa: E402

TEMPLATE = "Q: {input}\nA: "
CORPUS = [
    "How do I bake sourdough bread?\nFeed the starter, mix flour and water, proof overnight, bake hot.",
    "What is the capital of France?\nParis is the capital of France.",
    "How do volcanoes erupt?\nMagma rises through the crust and pressure forces it out.",
    "Name a prime number above ten.\nThirteen is a prime number.",
]


def test_retrieval_ranks_the_relevant_passage_first_and_drops_non_matches():
    index = rag.build_index(CORPUS)
    assert rag.retrieve(index, "what is the capital city of france", k=2)[0] == 1
    assert rag.retrieve(index, "why does magma erupt from volcanoes?", k=3)[0] == 2
    # no query term in any passage (or only stopwords): no passages rather than arbitrary ones
    assert rag.retrieve(index, "zebra quantum", k=3) == []
    assert rag.retrieve(index, "the of and", k=3) == []
    assert rag.retrieve(index, "", k=3) == []
    assert len(rag.retrieve(index, "capital prime bread magma", k=10)) == 4  # k above the corpus size


def test_prompt_assembly_cuts_passages_first_and_fits_seq_len():
    tok = tiny_tokenizer()

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    record = {"id": "r1", "input": "what is two plus three?", "target": "five"}
    prompt = TEMPLATE.format(input=record["input"])
    long_passages = ["the cat sat on the mat " * 20, "Q: what is two plus three?\nA: five " * 10]
    seq_len = 64
    out, used, cut = rag.augment(record, long_passages, TEMPLATE, tok, seq_len, max_passage_tokens=200)
    assert used >= 1 and cut
    assert out["input"].endswith(prompt)  # the record's own prompt is whole, after the passages
    assert out["target"] == record["target"] and out["id"] == record["id"]
    assert n(out["input"]) + n(record["target"]) + 1 <= seq_len
    assert out["input"].startswith("the cat sat")  # best passage first

    # each passage capped at max_passage_tokens
    out, used, cut = rag.augment(record, long_passages, TEMPLATE, tok, 512, max_passage_tokens=5)
    assert used == 2 and cut
    parts = out["input"][: -len(prompt)].split(rag.PASSAGE_SEPARATOR)
    assert [p for p in parts if p] and all(n(p) <= 5 for p in parts if p)

    # short passages go in whole; answer room reserved for generation leaves less for them
    short = ["two plus three is five", "one plus one is two"]
    out, used, cut = rag.augment(record, short, TEMPLATE, tok, 512, max_passage_tokens=64)
    assert (used, cut) == (2, False) and out["input"] == "".join(p + "\n\n" for p in short) + prompt
    tight = n(prompt) + 1 + 12
    _, used_gen, _ = rag.augment(record, short, TEMPLATE, tok, tight, 64, answer_room=12)
    _, used_score, _ = rag.augment(record, short, TEMPLATE, tok, tight, 64)
    assert used_gen == 0 < used_score

    # no room at all, or no input to put passages before: the record as it was
    assert rag.augment(record, short, TEMPLATE, tok, n(prompt) + 2, 64)[:2] == (record, 0)
    doc = {"id": "d", "input": "", "target": "a plain document"}
    assert rag.augment(doc, short, TEMPLATE, tok, 512, 64) == (doc, 0, False)


def test_a_disabled_rag_leaves_the_evaluate_key_alone():
    off = parse_config({}).section("evaluate")
    assert "rag" not in off and parse_config({"evaluate": {"rag": {"k": 5}}}).section("evaluate") == off
    on = parse_config({"evaluate": {"rag": {"enabled": True, "k": 5}}}).section("evaluate")
    assert on["rag"]["k"] == 5
    with pytest.raises(ValueError):
        parse_config({"evaluate": {"rag": {"enabled": True, "models": ["base", "base"]}}})


def _leaked_copy(cfg) -> list[dict]:
    """Two occurrences of one text (same content_hash, different ids), one in train and one in test."""
    splits, seed = cfg.shard.splits, cfg.shard.seed
    found = {}
    for line in range(10_000):
        r = make_record("What is 99 plus 1?", "99 plus 1 is 100.\n#### 100", task_type="math_qa", domain="math",
                        source_path="leak.jsonl", source_line=line)
        found.setdefault(assign_split(r["id"], splits, seed), r)
        if {"train", "test"} <= set(found):
            return [found["train"], found["test"]]
    raise AssertionError("no occurrence landed in both splits")


def test_rag_rows_land_in_eval_json_with_finite_metrics(tmp_path):
    cfg = chain_config(tmp_path, finetune={"max_steps": 4, "eval_every": 4}, quantize={"methods": []},
                       evaluate={"max_records": 200, "generate_records": 2, "max_new_tokens": 8, "latency_runs": 3,
                                 "batch_size": 2, "throughput_runs": 1, "threads": 1,
                                 "rag": {"enabled": True, "k": 2, "max_passage_tokens": 24, "models": ["base", "tuned"]}})
    done = run_chain(tmp_path, cfg, upto="evaluate", records=learnable_records(120) + _leaked_copy(cfg))
    report = json.loads((done["evaluate"].dir / "eval.json").read_text(encoding="utf-8"))
    rows = {r["variant"]: r for r in report["rows"]}
    assert {"base", "tuned", "rag_base", "rag_tuned"} <= set(rows)
    n_train = done["shard"].stats["shards"]["train"][0]["records"]
    for name in ("rag_base", "rag_tuned"):
        r = rows[name]
        for metric in ("perplexity", "token_accuracy", "exact_match", "latency_p50_ms", "retrieval_p50_ms"):
            assert r[metric] is not None and math.isfinite(r[metric]), (name, metric)
        assert r["retrieval_p50_ms"] <= r["latency_p95_ms"]  # the row's latency includes retrieval
        assert r["records"] == rows["base"]["records"] and r["rag_passages"] > 0
        assert r["rag_index_passages"] == n_train - 1  # the held-out record's train copy is not indexed
    assert any("1 train record(s) with a held-out record's content_hash left out" in n for n in report["notes"])
    # the same targets are scored: retrieval changes the context, not what is predicted
    assert rows["rag_base"]["top1_agreement"] is not None
    assert "rag_base" in (done["evaluate"].dir / "eval.md").read_text(encoding="utf-8")
