"""tokenize: render/encode/pack as pure functions, the BPE tokenizer, and shard -> tokenize via run_stage."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.records import make_record
from corpus2model.tasks import shard, tokenize
from corpus2model.tasks.stage import StageContext, Store, run_stage
from corpus2model.tasks.tokenize import IGNORE_INDEX, encode_example, encode_records, load_tokenizer, pack, render, train_tokenizer

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


def _segments(block: dict) -> list[tuple[list[int], list[int]]]:
    """A block's real tokens cut where position_ids restart: (ids, labels) per segment."""
    n_real = sum(block["attention_mask"])
    segs = []
    for t, lab, p in zip(block["input_ids"][:n_real], block["labels"][:n_real], block["position_ids"][:n_real]):
        if p == 0:
            segs.append(([], []))
        segs[-1][0].append(t)
        segs[-1][1].append(lab)
    return segs


def test_pack_best_fit_fills_blocks_and_masks_segment_starts():
    # Two SFT examples (prompt 2) of 6 and 4 tokens and one of 5: 6+4 fill a block, 5 goes on its own.
    docs = [_doc(6, 100, prompt=2), _doc(5, 200, prompt=1), _doc(4, 300, prompt=1)]
    blocks = pack(docs, seq_len=10, pad_id=PAD)
    assert len(blocks) == 2
    b0, b1 = blocks
    assert b0["input_ids"] == [100, 101, 102, 103, 104, 105, 300, 301, 302, 303]
    assert b0["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert b0["attention_mask"] == [1] * 10
    # Prompt masked; each segment's first label masked (it would be predicted from the previous one).
    assert b0["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 102, 103, 104, 105, IGNORE_INDEX, 301, 302, 303]
    assert b1["input_ids"] == [200, 201, 202, 203, 204, PAD, PAD, PAD, PAD, PAD]
    assert b1["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert b1["labels"] == [IGNORE_INDEX, 201, 202, 203, 204] + [IGNORE_INDEX] * 5
    assert b1["attention_mask"] == [1] * 5 + [0] * 5


def test_pack_cuts_plain_documents_into_gaps_but_never_an_sft_example():
    # SFT 7 and 7 cannot share a block of 8; the plain 6-token document fills both gaps (cut 1 + 5... no:
    # largest gaps first, 1 each) and its remainder opens a block.
    docs = [_doc(7, 100, prompt=3), _doc(7, 200, prompt=3), _doc(6, 500)]
    blocks = pack(docs, seq_len=8, pad_id=PAD)
    sft = [(list(range(100, 107))), list(range(200, 207))]
    seen_sft = [s[0] for b in blocks for s in _segments(b) if s[0][0] in (100, 200)]
    assert sorted(seen_sft) == sft  # whole, never cut
    plain = [t for b in blocks for s in _segments(b) for t in s[0] if t >= 500]
    assert sorted(plain) == list(range(500, 506))  # every token of the plain document, each once
    assert len(blocks) == 3 and sum(sum(b["attention_mask"]) for b in blocks) == 20


def test_pack_chunks_long_documents():
    docs = [_doc(3, 10), _doc(23, 100, prompt=4), _doc(2, 500)]
    blocks = pack(docs, seq_len=8, pad_id=PAD)
    ids = [b["input_ids"] for b in blocks]
    # The two full chunks of the long example are blocks of their own; its 7-token tail and the short
    # documents share what is left.
    assert list(range(100, 108)) in ids and list(range(108, 116)) in ids
    full = blocks[ids.index(list(range(100, 108)))]
    assert full["labels"] == [IGNORE_INDEX] * 4 + [104, 105, 106, 107]
    assert blocks[ids.index(list(range(108, 116)))]["labels"] == [IGNORE_INDEX] + list(range(109, 116))
    assert sum(sum(b["attention_mask"]) for b in blocks) == 28 and len(blocks) == 4


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
    # No token lost, none duplicated (ids are unique by construction).
    assert sorted(real) == [t for d in docs for t in d["input_ids"]]
    for b in blocks:
        n_real = sum(b["attention_mask"])
        assert b["attention_mask"] == [1] * n_real + [0] * (seq_len - n_real)
        assert all(t == PAD for t in b["input_ids"][n_real:])
        assert all(lab == IGNORE_INDEX for lab in b["labels"][n_real:])
        assert b["position_ids"][n_real:] == list(range(seq_len - n_real))
        # A label is either masked or the token itself (the model shifts internally).
        assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(b["labels"], b["input_ids"]))
        # Each segment's tokens are consecutive ids: a document's order is kept inside a block.
        for ids, labels in _segments(b):
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            assert labels[0] == IGNORE_INDEX
    # An SFT example (prompt > 0) that fits a block is never split: it is one whole segment.
    segs = {s[0][0]: len(s[0]) for b in blocks for s in _segments(b)}
    for d in docs:
        if IGNORE_INDEX in d["labels"] and len(d["input_ids"]) <= seq_len:
            assert segs[d["input_ids"][0]] == len(d["input_ids"])
    # Every label that survives was a target label in its document.
    targets = {t for d in docs for t, lab in zip(d["input_ids"], d["labels"]) if lab != IGNORE_INDEX}
    kept = [lab for b in blocks for lab in b["labels"] if lab != IGNORE_INDEX]
    assert set(kept) <= targets and len(kept) > 0.5 * len(targets)


@pytest.mark.parametrize("plain_share", [0.0, 0.3])
def test_pack_padding_is_small_on_lognormal_lengths(plain_share):
    """The figure issue 16 asks for: <= 3% padding at seq_len 256 (greedy first-fit gave ~25%)."""
    rng = random.Random(7)
    docs = []
    for i in range(2000):
        n = max(2, int(rng.lognormvariate(4.3, 0.7)))
        docs.append(_doc(n, i * 10_000, prompt=0 if rng.random() < plain_share else max(1, n // 3)))
    blocks = pack(docs, 256, PAD)
    padding = 1 - sum(sum(b["attention_mask"]) for b in blocks) / (256 * len(blocks))
    assert padding <= 0.03


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
# the array path pack_shard takes: batched backend encode, packing on numpy arrays
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tok():
    return train_tokenizer(_corpus(), vocab_size=400, min_frequency=2)


def _mixed_batch() -> dict[str, list]:
    rng = random.Random(3)
    inputs, targets = [], []
    for i in range(240):
        text = " ".join(rng.choice(SAMPLE).split()[: rng.randint(0, 14)])
        inputs.append([None, "", f"Q{i}: {text} <|eos|> {{x}}", "数据?"][i % 4])
        targets.append([text, "", f"A: {text}", None][i % 4 if i % 8 else 0])
    return {"input": inputs, "target": targets}


def test_encode_batch_is_encode_records_as_flat_arrays(small_tok):
    """The backend encode (no BatchEncoding per call, prompts only where there is an input) gives the
    wrapper's tokens and labels, literal special-token strings included."""
    batch = _mixed_batch()
    docs = encode_records(batch, small_tok, TEMPLATE)
    ids, labels, lengths = tokenize.encode_batch(batch["input"], batch["target"], small_tok, TEMPLATE)
    assert ids.dtype == labels.dtype == np.int32
    assert lengths.tolist() == [len(d["input_ids"]) for d in docs]
    assert ids.tolist() == [t for d in docs for t in d["input_ids"]]
    assert labels.tolist() == [t for d in docs for t in d["labels"]]
    # "<|eos|>" in a quarter of the inputs stayed text: the only eos tokens are the documents' own.
    assert np.flatnonzero(ids == small_tok.eos_token_id).tolist() == (np.cumsum(lengths) - 1).tolist()
    empty = tokenize.encode_batch([], [], small_tok, TEMPLATE)
    assert [len(a) for a in empty] == [0, 0, 0]


def _docs_as_arrays(docs):
    ids = np.array([t for d in docs for t in d["input_ids"]], dtype=np.int64)
    labels = np.array([t for d in docs for t in d["labels"]], dtype=np.int64)
    return ids, labels, np.array([len(d["input_ids"]) for d in docs])


def test_packer_windows_do_not_depend_on_how_documents_arrive():
    """Windows close after the piece that fills them, whatever batches the documents came in: the
    same blocks from one call, from one call per document, and from uneven batches."""
    rng = random.Random(5)
    docs, start = [], 10
    for _ in range(120):
        n = rng.choice([0, 1, 3, 9, 16, 20, 41])
        docs.append(_doc(n, start, prompt=rng.choice([0, 0, min(n, 2)])))
        start += n

    def run(batches):
        packer = tokenize.Packer(16, PAD, window_tokens=50)
        out = []
        for part in batches:
            out += list(packer.add(*_docs_as_arrays(part)))
        out += list(packer.finish())
        return out

    one = run([docs])
    assert len(one) > 5  # several windows
    for batches in ([[d] for d in docs], [docs[:7], docs[7:8], docs[8:60], docs[60:]]):
        got = run(batches)
        assert len(got) == len(one)
        for a, b in zip(got, one):
            assert set(a) == set(tokenize.PACKED_COLUMNS)
            assert all(np.array_equal(a[c], b[c]) for c in a)
    # Each window holds exactly the pieces up to the one that brought it to 50 tokens (or the end).
    sizes = [int(w["attention_mask"].sum()) for w in one]
    assert all(s >= 50 for s in sizes[:-1]) and sum(sizes) == sum(len(d["input_ids"]) for d in docs)
    # And the window blocks are what iter_pack yields (its blocks are these, as lists).
    flat = [{c: w[c][i].tolist() for c in w} for w in run([docs]) for i in range(len(w["input_ids"]))]
    assert list(tokenize.iter_pack(docs, 16, PAD, window_tokens=50)) == flat
    with pytest.raises(ValueError, match="labels"):
        list(tokenize.Packer(8, PAD).add(np.arange(3), np.arange(2), np.array([3])))


def test_pack_shard_writes_the_blocks_pack_makes_without_the_wrapper_or_datasets(small_tok, tmp_path, monkeypatch):
    """pack_shard's Arrow blocks are pack()'s blocks of encode_records' documents, row for row; and the
    fast path stays fast: no tokenizer-wrapper call per batch, no ``datasets`` (whose import loads torch)."""
    import subprocess
    import sys

    import pyarrow as pa

    batch = _mixed_batch()
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"input": pa.array(batch["input"], pa.string()),
                             "target": pa.array(batch["target"], pa.string())}), path)
    want = pack(encode_records(batch, small_tok, TEMPLATE), 32, small_tok.pad_token_id)

    def no_wrapper(*a, **kw):
        raise AssertionError("pack_shard called the tokenizer wrapper")

    monkeypatch.setattr(type(small_tok), "__call__", no_wrapper)
    counts = tokenize.pack_shard(path, small_tok, TEMPLATE, 32, tmp_path / "packed.arrow")
    monkeypatch.undo()
    with pa.memory_map(str(tmp_path / "packed.arrow")) as src:
        got = pa.ipc.open_file(src).read_all()
    assert got.schema.equals(tokenize.PACKED_SCHEMA)
    assert got.to_pylist() == want
    assert counts["blocks"] == len(want) and counts["records"] == len(batch["target"])
    assert counts["tokens"] == sum(sum(b["attention_mask"]) for b in want)
    assert counts["target_tokens"] == sum(lab != IGNORE_INDEX for b in want for lab in b["labels"])

    small_tok.save_pretrained(tmp_path / "tok")
    code = ("import sys; from pathlib import Path; from corpus2model.tasks import tokenize as t; "
            f"tok = t.load_tokenizer({str(tmp_path / 'tok')!r}); "
            f"t.pack_shard(Path({str(path)!r}), tok, {TEMPLATE!r}, 32, Path({str(tmp_path / 'again.arrow')!r})); "
            "print(sorted(m for m in ('datasets', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "again.arrow").read_bytes() == (tmp_path / "packed.arrow").read_bytes()


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

        # Independent of iter_pack: every SFT record of the split, rendered, is one whole segment (never
        # cut); plain documents may be cut at block edges, but every token of the split is there once.
        split_records = [r for p in sh.stats["shards"][split] for r in _rows(sh.dir / p["path"])]
        segs = [seg[0] for r in rows for seg in _segments(r)]
        docs = encode_records({"input": [r["input"] for r in split_records],
                               "target": [r["target"] for r in split_records]}, tok, TEMPLATE)
        sft = [d["input_ids"] for d, r in zip(docs, split_records) if r["input"] and len(d["input_ids"]) <= 64]
        assert sft and all(d in segs for d in sft)
        assert Counter(real) == Counter(t for d in docs for t in d["input_ids"])
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


def test_a_cached_stage_reads_its_manifest_and_no_data_file(make_cfg, ctx, records_manifest, monkeypatch):
    """What makes an unchanged rerun cheap: a hit on clean, shard or tokenize reads one manifest and
    stats the files it lists; it opens no Parquet/Arrow file, hashes nothing and takes no lock."""
    import builtins
    import io
    import os

    import pyarrow as pa

    from corpus2model.tasks import clean, stage

    cfg = _stage_cfg(make_cfg)
    ingested = records_manifest(synthetic_records(), stage="ingest")
    validated = records_manifest(synthetic_records(), stage="validate")
    cl = run_stage(clean, [ingested], cfg, ctx)
    sh = run_stage(shard, [validated], cfg, ctx)
    tk = run_stage(tokenize, [sh], cfg, ctx)
    assert {cl.stats["cache"], sh.stats["cache"], tk.stats["cache"]} == {"computed"}

    opened: list[str] = []

    def spy(name, real):
        def wrapper(path, *a, **kw):
            opened.append(f"{name}:{path}")
            return real(path, *a, **kw)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy("open", builtins.open))
    monkeypatch.setattr(io, "open", spy("open", io.open))
    monkeypatch.setattr(os, "open", spy("os.open", os.open))
    for mod, name in ((pq, "ParquetFile"), (pq, "read_table"), (pa, "memory_map"), (pa, "OSFile"), (pa, "input_stream")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    monkeypatch.setattr(stage, "sha256_file", spy("sha256", stage.sha256_file))

    for mod, up, first in ((clean, ingested, cl), (shard, validated, sh), (tokenize, sh, tk)):
        opened.clear()
        hit = run_stage(mod, [up], cfg, ctx)
        assert hit.stats["cache"] == "hit" and hit.key == first.key
        assert opened == [f"open:{first.dir / 'manifest.json'}"], (mod.STAGE, opened)


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


def test_fixed_tokenizer_path_is_used_as_is_and_keys_by_content(make_cfg, ctx, records_manifest, tmp_path):
    """tokenize.tokenizer_path (continual runs): the packed ids come from that tokenizer, whatever the
    corpus; the key follows the tokenizer files' content, not the path; a folder without one is refused."""
    from corpus2model.tasks.stage import StageError, stage_key

    records = synthetic_records(120)
    cfg = _stage_cfg(make_cfg)
    sh = run_stage(shard, [records_manifest(records, stage="validate")], cfg, ctx)
    trained = run_stage(tokenize, [sh], cfg, ctx)
    fixed_dir = tmp_path / "parent-model"
    fixed_dir.mkdir()
    other = train_tokenizer(["zebra quantum " * 50, "other words entirely " * 40], 300, 1)
    other.save_pretrained(str(fixed_dir))
    (fixed_dir / "model.safetensors").write_bytes(b"weights are not copied")
    fcfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"tokenizer_path": fixed_dir})})
    m = run_stage(tokenize, [sh], fcfg, ctx)
    assert m.stats["tokenizer_source"] == str(fixed_dir) and m.key != trained.key
    assert {p.name for p in (m.dir / "tokenizer").iterdir()} <= {"tokenizer.json", "tokenizer_config.json",
                                                                 "special_tokens_map.json"}
    assert (m.dir / "tokenizer" / "tokenizer.json").read_bytes() == (fixed_dir / "tokenizer.json").read_bytes()
    assert m.stats["vocab_size"] == len(other) != trained.stats["vocab_size"]
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(fixed_dir, moved)
    mcfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"tokenizer_path": moved})})
    assert stage_key(tokenize, mcfg, [sh])[0] == m.key  # same files elsewhere: same key
    (fixed_dir / "tokenizer.json").unlink()
    with pytest.raises(StageError, match="holds no tokenizer.json"):
        stage_key(tokenize, fcfg, [sh])
