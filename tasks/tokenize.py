"""tokenize: shards -> a byte-level BPE tokenizer trained on train + packed token blocks per split.

Reads the shard stage's Parquet files through Hugging Face ``datasets`` (as training does,
DESIGN.md "Model side"), trains a byte-level BPE tokenizer with ``tokenizers`` on the train split
only (held-out text must not shape the vocabulary), and turns every record into
``prompt tokens + target tokens + <|eos|>`` with the loss on the target and the eos.

Packing (``pack``): consecutive documents are laid greedily into blocks of exactly ``seq_len``
tokens. A document that fits in a block is never split; when it does not fit in what is left of
the current block, that block is padded and the document starts the next one. A document longer
than ``seq_len`` starts a fresh block and is cut into ``seq_len`` chunks; its last, shorter chunk
packs like any short document. ``position_ids`` restart at 0 at every document (and chunk) start.

The trade-off: documents share a block, so with plain causal attention a token can attend to
the earlier documents of its block; restarted ``position_ids`` keep each document's positions
right, and attention backends that read them (flash-attention varlen) keep documents apart.
Masking cross-document attention everywhere is the fine-tuning issue's job. What packing does
guarantee here: no loss term crosses a document boundary. A causal LM predicts ``labels[t+1]``
from token ``t``, so the first label of every document (and chunk) is set to -100: otherwise the
previous document's last token would be trained to predict it. Nothing is lost by that: the first
token of a sequence is never predicted unpacked either.

Baseline parts (replaced by later issues): one tokenizer per run (no reuse of a pretrained
model's tokenizer when ``model.pretrained`` is set), greedy first-fit packing in input order.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "tokenize"
VERSION = "1"
SECTIONS = ("tokenize",)

PAD, EOS, UNK = "<|pad|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2: the trainer adds them first, in this order
IGNORE_INDEX = -100  # what torch's cross-entropy (and HF models) skip
PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "attention_mask")
PACKED_SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in PACKED_COLUMNS])

ENCODE_BATCH = 1000  # records tokenized per call (the fast tokenizer batches in Rust)
WRITE_BATCH = 1024  # packed blocks per Parquet row group


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def render(record: dict, template: str) -> tuple[str, str]:
    """(prompt, target) as the model sees them: the input through the template, the target as is.

    A plain document (empty input) has no prompt: all its text is target.
    """
    inp = record.get("input") or ""
    prompt = template.format(input=inp) if inp else ""
    return prompt, record.get("target") or ""


def encode_example(prompt_ids: list[int], target_ids: list[int], eos_id: int) -> dict:
    """One document's tokens and labels: the loss skips the prompt and covers target + eos."""
    ids = list(prompt_ids) + list(target_ids) + [eos_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(target_ids) + [eos_id]
    return {"input_ids": ids, "labels": labels}


def iter_pack(examples: Iterable[dict], seq_len: int, pad_id: int) -> Iterator[dict]:
    """Stream blocks of exactly ``seq_len`` tokens from ``{"input_ids", "labels"}`` documents.

    Each block has input_ids, labels, position_ids and attention_mask (1 = real token,
    0 = padding). Padding is ``pad_id`` with label -100 and positions 0, 1, ... of its own.
    See the module docstring for the packing rule and why each document's first label is -100.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def block() -> dict:
        n_pad = seq_len - len(ids)
        out = {
            "input_ids": ids + [pad_id] * n_pad,
            "labels": labels + [IGNORE_INDEX] * n_pad,
            "position_ids": pos + list(range(n_pad)),
            "attention_mask": [1] * len(ids) + [0] * n_pad,
        }
        ids.clear()
        labels.clear()
        pos.clear()
        return out

    for n, ex in enumerate(examples):
        doc_ids, doc_labels = list(ex["input_ids"]), list(ex["labels"])
        if len(doc_ids) != len(doc_labels):
            raise ValueError(f"document {n}: {len(doc_ids)} input_ids but {len(doc_labels)} labels")
        if not doc_ids:
            continue
        if len(doc_ids) > seq_len:
            if ids:
                yield block()
            chunks = [(doc_ids[i:i + seq_len], doc_labels[i:i + seq_len]) for i in range(0, len(doc_ids), seq_len)]
        else:
            chunks = [(doc_ids, doc_labels)]
        for c_ids, c_labels in chunks:
            if len(ids) + len(c_ids) > seq_len:
                yield block()
            ids.extend(c_ids)
            labels.append(IGNORE_INDEX)
            labels.extend(c_labels[1:])
            pos.extend(range(len(c_ids)))
            if len(ids) == seq_len:
                yield block()
    if ids:
        yield block()


def pack(examples: Iterable[dict], seq_len: int, pad_id: int) -> list[dict]:
    """All blocks of ``iter_pack`` as a list (for tests and small data)."""
    return list(iter_pack(examples, seq_len, pad_id))


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int,
                    length: int | None = None):
    """A byte-level BPE tokenizer (every byte is in the alphabet, so ``<|unk|>`` is never needed for
    real text), wrapped as a ``PreTrainedTokenizerFast``. The same texts give the same tokenizer.

    Literal special-token strings inside the data are encoded as ordinary text
    (``split_special_tokens``): a document containing "<|eos|>" must not end itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # No normalizer and no prefix space: decode(encode(x)) gives x back byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, split_special_tokens=True,
    )


def load_tokenizer(folder: str | Path):
    """The tokenizer a tokenize stage saved (``<stage dir>/tokenizer``), for finetune/evaluate/serve."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise StageError(f"{folder} holds no tokenizer.json: pass the tokenize stage's tokenizer/ folder")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def encode_records(records: dict[str, list], tokenizer, template: str) -> list[dict]:
    """A column batch of records (``{"input": [...], "target": [...]}``) -> encoded documents."""
    rows = [{"input": i, "target": t} for i, t in zip(records["input"], records["target"])]
    prompts, targets = zip(*(render(r, template) for r in rows)) if rows else ((), ())
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    return [encode_example(p, t, tokenizer.eos_token_id) for p, t in zip(p_ids, t_ids)]


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def shard_files(upstream: Manifest) -> dict[str, list[Path]]:
    """Split name -> its shard files (absolute), in the order shard wrote them."""
    shards = upstream.stats.get("shards")
    if not isinstance(shards, dict):
        raise StageError(f"{upstream.path}: tokenize reads the shard stage's output, but stage "
                         f"{upstream.stage!r} has no stats.shards listing")
    return {split: [upstream.dir / s["path"] for s in entries] for split, entries in shards.items()}


def _load_splits(files: dict[str, list[Path]], cache_dir: Path):
    """The non-empty splits as ``datasets`` Datasets (memory-mapped Arrow, cached in cache_dir)."""
    import datasets

    data_files = {split: [str(p) for p in paths] for split, paths in files.items() if paths}
    if not data_files:
        return {}
    return datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(cache_dir))


def _train_texts(train, template: str) -> Iterator[list[str]]:
    for batch in train.iter(batch_size=ENCODE_BATCH):
        yield ["".join(render({"input": i, "target": t}, template)) for i, t in zip(batch["input"], batch["target"])]


def _pack_split(ds, tokenizer, template: str, seq_len: int, path: Path) -> dict:
    """Tokenize and pack one split into ``path``; returns its stats."""
    counts = {"records": 0, "tokens": 0, "long_documents": 0}

    def documents() -> Iterator[dict]:
        for batch in ds.iter(batch_size=ENCODE_BATCH):
            for ex in encode_records(batch, tokenizer, template):
                counts["records"] += 1
                counts["tokens"] += len(ex["input_ids"])
                counts["long_documents"] += len(ex["input_ids"]) > seq_len
                yield ex

    blocks = real = target = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(path), PACKED_SCHEMA, compression="zstd") as writer:
        buf: list[dict] = []
        for b in iter_pack(documents(), seq_len, tokenizer.pad_token_id):
            blocks += 1
            real += sum(b["attention_mask"])
            target += sum(1 for x in b["labels"] if x != IGNORE_INDEX)
            buf.append(b)
            if len(buf) == WRITE_BATCH:
                writer.write_table(pa.Table.from_pylist(buf, schema=PACKED_SCHEMA))
                buf.clear()
        if buf or not blocks:
            writer.write_table(pa.Table.from_pylist(buf, schema=PACKED_SCHEMA))
    if real != counts["tokens"]:
        raise StageError(f"packing {path.name} kept {real} of {counts['tokens']} tokens: a bug in iter_pack")
    total = blocks * seq_len
    return {**counts, "target_tokens": target, "blocks": blocks,
            "padding": round((total - real) / total, 6) if total else 0.0}


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 1:
        raise StageError(f"tokenize takes one upstream manifest (shard), got {len(inputs)}")
    (upstream,) = inputs
    c = cfg.tokenize
    files = shard_files(upstream)
    if not files.get("train"):
        raise StageError(f"{upstream.path}: the train split has no shards, so there is no text to train a "
                         f"tokenizer on; add data or raise shard.splits['train']")

    # datasets' Arrow cache lives next to out_dir (same store, nothing in ~/.cache) and goes away after.
    with tempfile.TemporaryDirectory(prefix="hf-datasets-", dir=out_dir.parent) as cache_dir:
        splits = _load_splits(files, Path(cache_dir))
        train = splits["train"]
        tokenizer = train_tokenizer(_train_texts(train, c.prompt_template), c.vocab_size, c.min_frequency,
                                    length=train.num_rows)
        tok_dir = out_dir / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        # Encode with the tokenizer as saved, so training here and loading downstream cannot differ.
        tokenizer = load_tokenizer(tok_dir)

        out_files = [FileEntry(p.relative_to(out_dir).as_posix(), role="tokenizer")
                     for p in sorted(tok_dir.rglob("*")) if p.is_file()]
        split_stats: dict[str, dict] = {}
        for split in files:
            if split not in splits:
                split_stats[split] = {"records": 0, "tokens": 0, "long_documents": 0, "target_tokens": 0,
                                      "blocks": 0, "padding": 0.0}
                continue
            rel = f"packed/{split}.parquet"
            split_stats[split] = _pack_split(splits[split], tokenizer, c.prompt_template, c.seq_len, out_dir / rel)
            out_files.append(FileEntry(rel, role="packed", records=split_stats[split]["blocks"]))
            ctx.info("tokenize %s: %s", split, split_stats[split])

    n_records = sum(s["records"] for s in split_stats.values())
    expected = sum(s.get("records", 0) for s in upstream.stats.get("splits", {}).values())
    if upstream.stats.get("splits") and n_records != expected:
        raise StageError(f"read {n_records} records from {upstream.path} but its manifest lists {expected}: "
                         f"a shard file changed after it was written; rerun shard")
    stats = {
        "splits": split_stats,
        "vocab_size": len(tokenizer),
        "seq_len": c.seq_len,
        "prompt_template": c.prompt_template,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "unk_id": tokenizer.unk_token_id,
    }
    _publish(split_stats)
    # Units are records in and records out (as packed documents); blocks are in stats.
    return Manifest(stage=STAGE, files=out_files,
                    counters={"in": n_records, "out": n_records, "rejected": {}, "duplicates": 0}, stats=stats)


def _publish(split_stats: dict[str, dict]) -> None:
    from tasks.artifacts import publish_table

    publish_table("tokenize-splits", [{"split": k, **v} for k, v in split_stats.items()],
                  "records, tokens, packed blocks and padding per split")
