"""tokenize: render/encode/pack as pure functions, the BPE tokenizer, and shard -> tokenize via run_stage."""
from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.records import make_record
from corpus2model.tasks import shard, tokenize
from corpus2model.tasks.stage import StageContext, Store, run_stage
from corpus2model.tasks.tokenize import IGNORE_INDEX, encode_example, load_tokenizer, pack, render, train_tokenizer

TEMPLATE = "### Input:\n{input}\n### Response:\n"
PAD = 0


# ---------------------------------------------------------------------------------------------
# render / encode
# ---------------------------------------------------------------------------------------------
def test_render_sft_and_plain_document():
    assert render({"input": "2+2?", "target": "4"}, TEMPLATE) == ("### Input:\n2+2?\n### Response:\n", "4")
    assert render({"input": "", "target": "A plain document."}, TEMPLATE) == ("", "A plain document.")
    assert render({"input": None, "target": "x"}, "Q: {input} A:") == ("", "x")
    # Braces inside the input are data, not template fields.
    assert render({"input": "{x} {0}", "target": "y"}, "Q: {input} A:") == ("Q: {x} {0} A:", "y")


def test_encode_example_masks_the_prompt_and_keeps_eos():
    ex = encode_example([10, 11, 12], [20, 21], eos_id=1)
    assert ex["input_ids"] == [10, 11, 12, 20, 21, 1]
    assert ex["labels"] == [IGNORE_INDEX] * 3 + [20, 21, 1]
    plain = encode_example([], [30, 31], eos_id=1)
    assert plain == {"input_ids": [30, 31, 1], "labels": [30, 31, 1]}


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------
def _doc(n: int, start: int, prompt: int = 0) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def test_pack_blocks_positions_padding():
    docs = [_doc(5, 100, prompt=2), _doc(4, 200), _doc(6, 300)]
    blocks = pack(docs, seq_len=10, pad_id=PAD)
    assert len(blocks) == 2
    b0, b1 = blocks
    # doc 1 and doc 2 share block 0; doc 3 does not fit in the last slot and starts block 1.
    assert b0["input_ids"] == [100, 101, 102, 103, 104, 200, 201, 202, 203, PAD]
    assert b0["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert b0["attention_mask"] == [1] * 9 + [0]
    # Prompt masked; each document's first label masked (it would be predicted from the previous doc).
    assert b0["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103, 104, IGNORE_INDEX, 201, 202, 203, IGNORE_INDEX]
    assert b1["input_ids"] == [300, 301, 302, 303, 304, 305, PAD, PAD, PAD, PAD]
    assert b1["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert b1["labels"] == [IGNORE_INDEX, 301, 302, 303, 304, 305] + [IGNORE_INDEX] * 4
    assert b1["attention_mask"] == [1] * 6 + [0] * 4


def test_pack_chunks_long_documents_on_a_fresh_block():
    docs = [_doc(3, 10), _doc(23, 100, prompt=4), _doc(2, 500)]
    blocks = pack(docs, seq_len=8, pad_id=PAD)
    ids = [b["input_ids"] for b in blocks]
    assert ids[0] == [10, 11, 12] + [PAD] * 5  # padded: the long document starts fresh
    assert ids[1] == list(range(100, 108))
    assert ids[2] == list(range(108, 116))
    assert ids[3] == list(range(116, 123)) + [PAD]  # 7-token tail: doc 3 (2 tokens) does not fit
    assert ids[4] == [500, 501] + [PAD] * 6
    assert blocks[1]["position_ids"] == list(range(8)) and blocks[2]["position_ids"] == list(range(8))
    assert blocks[3]["position_ids"] == list(range(7)) + [0]
    # Prompt tokens 100..103 masked; chunk starts masked; the rest learn their own id.
    assert blocks[1]["labels"] == [IGNORE_INDEX] * 4 + [104, 105, 106, 107]
    assert blocks[2]["labels"] == [IGNORE_INDEX] + list(range(109, 116))


def test_pack_exact_fit_and_invariants_on_random_documents():
    assert pack([_doc(8, 1)], 8, PAD) == [{"input_ids": list(range(1, 9)), "labels": [IGNORE_INDEX] + list(range(2, 9)),
                                          "position_ids": list(range(8)), "attention_mask": [1] * 8}]
    assert pack([], 8, PAD) == []
    rng = random.Random(0)
    docs, start = [], 10
    for _ in range(300):
        n = rng.choice([1, 2, 5, 17, 31, 32, 33, 70])
        docs.append(_doc(n, start, prompt=rng.randint(0, n - 1)))
        start += n
    seq_len = 32
    blocks = pack(docs, seq_len, PAD)
    assert all(len(b[k]) == seq_len for b in blocks for k in b)
    real = [t for b in blocks for t, m in zip(b["input_ids"], b["attention_mask"]) if m]
    # No token lost, none duplicated, order kept (ids are unique and increasing by construction).
    assert real == [t for d in docs for t in d["input_ids"]]
    assert sum(sum(b["attention_mask"]) for b in blocks) == sum(len(d["input_ids"]) for d in docs)
    for b in blocks:
        n_real = sum(b["attention_mask"])
        assert b["attention_mask"] == [1] * n_real + [0] * (seq_len - n_real)
        assert all(t == PAD for t in b["input_ids"][n_real:])
        assert all(lab == IGNORE_INDEX for lab in b["labels"][n_real:])
        assert b["position_ids"][n_real:] == list(range(seq_len - n_real))
        # A label is either masked or the token itself (the model shifts internally).
        assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(b["labels"], b["input_ids"]))
    # Every label that survives was a target label in its document.
    targets = {t for d in docs for t, lab in zip(d["input_ids"], d["labels"]) if lab != IGNORE_INDEX}
    kept = [lab for b in blocks for lab in b["labels"] if lab != IGNORE_INDEX]
    assert set(kept) <= targets and len(kept) > 0.5 * len(targets)


def test_pack_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        pack([{"input_ids": [1, 2], "labels": [1]}], 8, PAD)


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München: die Straße ist schön, Öl und Übermut.",
    "我们的数据模型很好。今天天气不错。",
    "def f(x):\n    return x * 2  # two spaces\n\n\ttab",
]


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(1)
    return [" ".join(rng.choice(SAMPLE).split()[: rng.randint(2, 12)]) for _ in range(n)] + SAMPLE * 5


def test_tokenizer_is_deterministic_and_roundtrips(tmp_path):
    a = train_tokenizer(_corpus(), vocab_size=400, min_frequency=2)
    b = train_tokenizer(iter([_corpus()[:100], _corpus()[100:]]), vocab_size=400, min_frequency=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()

    tok = load_tokenizer(tmp_path / "a")
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    assert 300 < len(tok) <= 400  # 256 bytes + specials + merges learned from the corpus
    for text in SAMPLE + ["ASCII only, nothing fancy!", "Zürich — 北京 — naïve café", "  leading and trailing  \n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # Merges were learned: common text takes fewer tokens than bytes.
    assert len(tok(SAMPLE[0], add_special_tokens=False)["input_ids"]) < len(SAMPLE[0].encode()) / 2
    # A literal special-token string in the data stays text, so a document cannot end itself.
    ids = tok("stop <|eos|> here", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids and tok.decode(ids) == "stop <|eos|> here"


# ---------------------------------------------------------------------------------------------
# the stage: shard -> tokenize
# ---------------------------------------------------------------------------------------------
def synthetic_records(n: int = 300) -> list[dict]:
    rng = random.Random(7)
    words = "the model reads data and learns words from many small examples today".split()
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
        if i % 2:
            out.append(make_record(f"Question {i}: what does the {rng.choice(words)} do?", f"Answer: {body}.",
                                   task_type="instruction"))
        else:
            extra = " Grüße aus Köln. 数据很好。" if i % 10 == 0 else ""
            out.append(make_record("", f"Document {i}. {body}.{extra}", task_type="text"))
    return out


def _stage_cfg(make_cfg):
    return make_cfg({"shard": {"target_bytes": 4_000, "row_group_rows": 20},
                     "tokenize": {"vocab_size": 400, "seq_len": 64, "min_frequency": 2}})


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_stage_shard_then_tokenize(make_cfg, ctx, records_manifest, tmp_path):
    records = synthetic_records()
    cfg = _stage_cfg(make_cfg)
    sh = run_stage(shard, [records_manifest(records, stage="validate")], cfg, ctx)
    assert sh.stats["splits"]["train"]["shards"] >= 2  # tokenize reads several files per split
    m = run_stage(tokenize, [sh], cfg, ctx)
    assert m.stats["cache"] == "computed"
    assert m.counters == {"in": len(records), "out": len(records), "rejected": {}, "duplicates": 0}

    tok_files = m.entries("tokenizer")
    assert "tokenizer/tokenizer.json" in {f.path for f in tok_files}
    tok = load_tokenizer(m.dir / "tokenizer")
    assert m.stats["vocab_size"] == len(tok) <= 400
    assert (m.stats["eos_id"], m.stats["pad_id"], m.stats["seq_len"]) == (tok.eos_token_id, tok.pad_token_id, 64)
    assert m.stats["prompt_template"] == TEMPLATE

    packed = {f.path: f for f in m.entries("packed")}
    assert set(packed) == {f"packed/{s}.parquet" for s in ("train", "validation", "test")
                           if sh.stats["splits"][s]["records"]}
    for split, s in m.stats["splits"].items():
        assert s["records"] == sh.stats["splits"][split]["records"]
        if not s["records"]:
            continue
        path = m.dir / f"packed/{split}.parquet"
        table = pq.read_table(path)
        assert table.column_names == ["input_ids", "labels", "position_ids", "attention_mask"]
        assert all(str(t) == "list<element: int32>" for t in table.schema.types)
        rows = table.to_pylist()
        assert len(rows) == s["blocks"] == packed[f"packed/{split}.parquet"].records
        assert all(len(r[k]) == 64 for r in rows for k in r)
        real = [t for r in rows for t, a in zip(r["input_ids"], r["attention_mask"]) if a]
        assert len(real) == s["tokens"]
        assert s["target_tokens"] == sum(lab != IGNORE_INDEX for r in rows for lab in r["labels"])
        assert s["padding"] == pytest.approx(1 - s["tokens"] / (64 * s["blocks"]), abs=1e-6)

        # Independent of iter_pack: the real tokens decode to the split's records, rendered, in shard order.
        split_records = [r for p in sh.stats["shards"][split] for r in _rows(sh.dir / p["path"])]
        expected = "".join("".join(render(r, TEMPLATE)) + "<|eos|>" for r in split_records)
        assert tok.decode(real) == expected
        # Prompt text never carries a label.
        labelled = [t for r in rows for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE_INDEX]
        assert "### Input" not in tok.decode(labelled) and "Answer:" in tok.decode(labelled)

    # The tokenizer round-trips text it saw and text it did not.
    for text in ["Answer: the model reads data.", "Grüße aus Köln, München und Zürich.", "数据很好，模型也不错。"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    again = run_stage(tokenize, [sh], cfg, ctx)
    assert again.stats["cache"] == "hit" and again.key == m.key
    # datasets' cache was temporary and inside the store: nothing is left behind.
    assert not [p for p in (ctx.store.root / "_tmp").iterdir() if p.name.startswith("hf-datasets")]

    # Same data, fresh store: the same tokenizer bytes and the same packed blocks.
    other = StageContext(store=Store(tmp_path / "store2"))
    sh2 = run_stage(shard, [records_manifest(records, stage="validate")], cfg, other)
    m2 = run_stage(tokenize, [sh2], cfg, other)
    assert m2.stats["cache"] == "computed"
    assert {f.path: f.sha256 for f in m2.files} == {f.path: f.sha256 for f in m.files}


def test_stage_needs_a_train_split(make_cfg, ctx, records_manifest):
    from corpus2model.tasks.stage import StageError

    cfg = make_cfg({"shard": {"splits": {"train": 0.0, "test": 1.0}}})
    sh = run_stage(shard, [records_manifest(synthetic_records(20), stage="validate")], cfg, ctx)
    with pytest.raises(StageError, match="train split has no shards"):
        run_stage(tokenize, [sh], cfg, ctx)


def test_a_damaged_shard_is_never_read(make_cfg, ctx, records_manifest):
    from corpus2model.tasks.stage import StageError

    cfg = _stage_cfg(make_cfg)
    sh = run_stage(shard, [records_manifest(synthetic_records(), stage="validate")], cfg, ctx)
    victim = sh.dir / sh.stats["shards"]["train"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim.unlink()  # break the hard link so the cached unit stays intact
    victim.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"train/part-00000\.parquet does not match its manifest.*c2m run"):
        run_stage(tokenize, [sh], cfg, ctx)
    victim.write_bytes(bytes(data[:-50]))  # truncated
    with pytest.raises(StageError, match=r"part-00000\.parquet does not match its manifest \(\d+ bytes"):
        run_stage(tokenize, [sh], cfg, ctx)


def test_append_retokenizes_only_new_shards(make_cfg, ctx, records_manifest):
    old = synthetic_records(300)
    rng = random.Random(11)
    new = [make_record("", f"Appended document {i}: " + " ".join(rng.choice(["data", "model", "words"]) for _ in range(30)),
                       task_type="text") for i in range(100)]
    # A small tokenizer sample: the first train shard only, which an append does not touch.
    cfg = make_cfg({"shard": {"target_bytes": 6_000, "row_groups_per_shard": 4},
                    "tokenize": {"vocab_size": 400, "seq_len": 64, "tokenizer_sample_bytes": 1}})
    sh1 = run_stage(shard, [records_manifest(old, stage="validate", parts=3)], cfg, ctx)
    m1 = run_stage(tokenize, [sh1], cfg, ctx)
    assert m1.stats["units_computed"] == m1.stats["units"] == sum(len(v) for v in sh1.stats["shards"].values())

    up2 = records_manifest(old + new, stage="validate", parts=4)  # the same three parts + one new part
    sh2 = run_stage(shard, [up2], cfg, ctx)
    m2 = run_stage(tokenize, [sh2], cfg, ctx)
    assert m2.stats["tokenizer_sha256"] == m1.stats["tokenizer_sha256"]  # not retrained: token ids stable
    assert m2.stats["units_computed"] == sh2.stats["units_computed"] >= 1
    assert m2.stats["units_reused"] == sh2.stats["units_reused"] >= 2
    assert m2.stats["splits"]["train"]["records"] == sh2.stats["splits"]["train"]["records"]
    # The packed train file is the old blocks, then the new ones.
    b1 = pq.read_table(m1.dir / "packed/train.parquet").to_pylist()
    b2 = pq.read_table(m2.dir / "packed/train.parquet").to_pylist()
    reused = [e for e in sh2.stats["shards"]["train"] if e["reused"]]
    n_reused_blocks = sum(1 for _ in b1) if len(reused) == len(sh1.stats["shards"]["train"]) else None
    if n_reused_blocks is not None:
        assert b2[:n_reused_blocks] == b1
    assert len(b2) > len(b1) or m2.stats["splits"]["train"]["records"] == m1.stats["splits"]["train"]["records"]
