"""Helpers shared by several test files. Tests import them from here (``from helpers import ...``),
never from another test file, so each test file can be read, run and changed on its own."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

from corpus2model.flows.stages import STAGES
from corpus2model.schemas.config import parse_config
from corpus2model.schemas.records import make_record, records_table
from corpus2model.tasks import registry
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, run_stage, sha256_file

ROOT = Path(__file__).resolve().parents[1]
# The project's read-only shared material: ../shared beside the repo, or $C2M_SHARED (as bench/ uses).
SHARED = Path(os.environ.get("C2M_SHARED") or ROOT.parent / "shared") / "datasets"


def load_bench(name: str):
    """Import bench/<name>.py by path. Benches import ``results_io`` from their own folder (a script's
    folder is on sys.path when it runs); a test puts it there for the import only."""
    bench_dir = str(ROOT / "bench")
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, bench_dir)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(bench_dir)
    return mod


# ---------------------------------------------------------------------------------------------
# the model-side chain on a small learnable dataset (test_finetune, test_quantize, test_evaluate,
# test_dpo, test_peft_methods, test_tune): records -> shard -> tokenize -> finetune -> ...
# ---------------------------------------------------------------------------------------------
# The model half of the stage table (flows/stages.py), shard's input being a validated-records stand-in.
UPSTREAM = {name: list(STAGES[name].inputs) for name in ("shard", "tokenize", "finetune", "quantize", "evaluate")}


def learnable_records(n: int = 200, seed: int = 0) -> list[dict]:
    """GSM8K-shaped addition questions plus a few plain sentences: a format a tiny model learns fast."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        if len(out) % 5 == 4:
            out.append(make_record("", f"The sum of {a} and {b} is {a + b}, and {a} is less than {a + b}.",
                                   task_type="text", domain="general"))
        else:
            out.append(make_record(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.\n#### {a + b}",
                                   task_type="math_qa", domain="math"))
    return out


def chain_config(root: Path, **overrides):
    """A tiny model and a short run; every section the model-side stages read."""
    data = {
        "paths": {"store": str(root / "store"), "raw": str(root / "raw"), "registry": str(root / "registry")},
        "shard": {"splits": {"train": 0.8, "validation": 0.1, "test": 0.1}},
        "tokenize": {"vocab_size": 320, "seq_len": 64, "min_frequency": 2},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
        "finetune": {"max_steps": 60, "batch_size": 8, "eval_every": 20, "warmup_steps": 5,
                     "learning_rate": 1e-2, "threads": 1, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "evaluate": {"max_records": 40, "generate_records": 4, "max_new_tokens": 12, "latency_runs": 5},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


def validated_manifest(root: Path, records: list[dict]) -> Manifest:
    """What the validate stage hands to shard: one records Parquet file with role "data"."""
    folder = root / "validated"
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    p = folder / "parts" / "000000.parquet"
    pq.write_table(records_table(records), p)
    return Manifest(stage="validate", stage_version="1", key="validated-" + sha256_file(p)[:12],
                    files=[FileEntry("parts/000000.parquet", p.stat().st_size, sha256_file(p), "data", len(records))],
                    counters={"in": len(records), "out": len(records), "rejected": {}, "duplicates": 0},
                    path=str(folder))


def run_chain(root: Path, cfg, upto: str, records: list[dict] | None = None) -> dict[str, Manifest]:
    """Run shard .. ``upto`` through run_stage; returns the manifests by stage."""
    ctx = StageContext(store=Store(cfg.paths.store))
    done = {"validate": validated_manifest(root, records if records is not None else learnable_records())}
    for stage in UPSTREAM:
        inputs = [done[s] for s in UPSTREAM[stage]] or [done["validate"]]
        done[stage] = run_stage(STAGES[stage], inputs, cfg, ctx)
        if stage == upto:
            break
    return done


# ---------------------------------------------------------------------------------------------
# fake store outputs of a trained model (test_registry, test_serve, test_classify): a 1-layer
# Llama, its LoRA adapter, a real dynamic INT8 folder and eval.json, plus fake upstream manifests
# ---------------------------------------------------------------------------------------------
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
