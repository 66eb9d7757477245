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

Per shard, cached: every shard is read (through ``datasets`` streaming) only after its sha256
matches the shard manifest, tokenized and packed on its own (documents never cross a shard, so
each shard costs at most one padded block), and its Arrow blocks are cached as a unit keyed by the
shard's sha256 + the tokenizer's sha256 + this section. An append that reuses shards re-tokenizes
only the new or changed ones; ``packed/<split>.parquet`` (one file per split, what finetune reads)
is then rebuilt by copying the cached blocks, without tokenizing again.

The tokenizer is trained on the first train shards only, up to ``tokenizer_sample_bytes`` of their
files (a demo-sized corpus whole). Those shards are full, reused shards after an append, so the
tokenizer (itself a cached unit keyed by their sha256s) and with it every token id stays the same.

Baseline parts (replaced by later issues): one tokenizer per run (no reuse of a pretrained
model's tokenizer when ``model.pretrained`` is set), greedy first-fit packing in input order.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, canonical_json, sha256_file

STAGE = "tokenize"
VERSION = "2"
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


def verified_shard(upstream: Manifest, path: Path) -> Path:
    """``path`` if its bytes are the ones the shard manifest lists and it opens as Parquet; else a
    StageError naming the shard and the fix. A damaged shard is never read as valid."""
    rel = path.relative_to(upstream.dir).as_posix()
    entry = next((f for f in upstream.files if f.path == rel), None)
    fix = "rerun `c2m run`: it recomputes a stage output whose files were damaged"
    if entry is None:
        raise StageError(f"shard {path} is not listed in {upstream.dir}/manifest.json; {fix}")
    if not path.is_file():
        raise StageError(f"shard {path} is missing; {fix}")
    size = path.stat().st_size
    if size != entry.bytes or sha256_file(path) != entry.sha256:
        raise StageError(f"shard {path} does not match its manifest ({size} bytes, manifest says {entry.bytes}; "
                         f"sha256 differs): it was changed or truncated after it was written; {fix}")
    try:
        pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"shard {path} is not readable Parquet ({e}); {fix}") from None
    return path


def iter_records(path: Path, batch_size: int = ENCODE_BATCH, cache_dir: Path | None = None) -> Iterator[dict[str, list]]:
    """Column batches of one shard through Hugging Face ``datasets`` (streaming: no Arrow copy;
    ``cache_dir`` takes the lock files datasets still writes, so nothing lands in ~/.cache)."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={"shard": [str(path)]}, split="shard", streaming=True,
                               cache_dir=str(cache_dir) if cache_dir else None)
    try:
        yield from ds.select_columns(["input", "target"]).iter(batch_size=batch_size)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"shard {path} could not be read ({e}); rerun `c2m run`") from None


def _unit_key(*parts) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()[:24]


def tokenizer_sample(upstream: Manifest, sample_bytes: int) -> list[Path]:
    """The first train shards, until their files reach ``sample_bytes`` (at least one)."""
    out, total = [], 0
    for p in shard_files(upstream).get("train", []):
        if out and total >= sample_bytes:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def _train_texts(paths: list[Path], template: str, max_bytes: int, cache_dir: Path) -> Iterator[list[str]]:
    seen = 0
    for path in paths:
        for batch in iter_records(path, cache_dir=cache_dir):
            texts = ["".join(render({"input": i, "target": t}, template)) for i, t in zip(batch["input"], batch["target"])]
            yield texts
            seen += sum(len(t.encode("utf-8")) for t in texts)
            if seen >= max_bytes:
                return


def _tokenizer_unit(upstream: Manifest, c, ctx: StageContext, cache_dir: Path) -> Path:
    """The tokenizer folder, trained once per (sample shards, settings) and cached as a unit."""
    sample = tokenizer_sample(upstream, c.tokenizer_sample_bytes)
    shas = [_sha_listed(upstream, p) for p in sample]
    key = _unit_key("tokenizer", VERSION, shas, c.vocab_size, c.min_frequency, c.prompt_template,
                    c.tokenizer_sample_bytes)
    hit = ctx.store.unit_lookup(STAGE + "-tokenizer", key)
    if hit is None:
        def write(tmp: Path) -> dict:
            for p in sample:
                verified_shard(upstream, p)
            tok = train_tokenizer(_train_texts(sample, c.prompt_template, c.tokenizer_sample_bytes, cache_dir),
                                  c.vocab_size, c.min_frequency)
            tok.save_pretrained(str(tmp / "tokenizer"))
            return {"files": [FileEntry(q.relative_to(tmp).as_posix(), role="tokenizer")
                              for q in sorted((tmp / "tokenizer").rglob("*")) if q.is_file()],
                    "sample_shards": [p.relative_to(upstream.dir).as_posix() for p in sample]}

        hit = ctx.store.unit_write(STAGE + "-tokenizer", key, write)
    return Path(hit["dir"]) / "tokenizer"


def _sha_listed(upstream: Manifest, path: Path) -> str:
    rel = path.relative_to(upstream.dir).as_posix()
    for f in upstream.files:
        if f.path == rel:
            return f.sha256
    raise StageError(f"shard {path} is not listed in {upstream.dir}/manifest.json; rerun `c2m run`")


def pack_shard(path: Path, tokenizer, template: str, seq_len: int, out_path: Path,
               cache_dir: Path | None = None) -> dict:
    """Tokenize and pack one shard into an Arrow IPC file (zstd); returns its counts."""
    counts = {"records": 0, "tokens": 0, "long_documents": 0}

    def documents() -> Iterator[dict]:
        for batch in iter_records(path, cache_dir=cache_dir):
            for ex in encode_records(batch, tokenizer, template):
                counts["records"] += 1
                counts["tokens"] += len(ex["input_ids"])
                counts["long_documents"] += len(ex["input_ids"]) > seq_len
                yield ex

    blocks = real = target = 0
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    # Blocks are Python int lists until written (~100 bytes a token): flush every ~256k tokens.
    flush_every = max(1, min(WRITE_BATCH, 262_144 // seq_len))
    with pa.OSFile(str(out_path), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA, options=options) as writer:
        buf: list[dict] = []
        for b in iter_pack(documents(), seq_len, tokenizer.pad_token_id):
            blocks += 1
            real += sum(b["attention_mask"])
            target += sum(1 for x in b["labels"] if x != IGNORE_INDEX)
            buf.append(b)
            if len(buf) == flush_every:
                writer.write_table(pa.Table.from_pylist(buf, schema=PACKED_SCHEMA))
                buf.clear()
        if buf:
            writer.write_table(pa.Table.from_pylist(buf, schema=PACKED_SCHEMA))
    if real != counts["tokens"]:
        raise StageError(f"packing {path.name} kept {real} of {counts['tokens']} tokens: a bug in iter_pack")
    return {**counts, "target_tokens": target, "blocks": blocks}


def _concat_packed(units: list[dict], path: Path) -> None:
    """One Parquet file per split from the shards' cached Arrow blocks, in shard order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(path), PACKED_SCHEMA, compression="zstd") as writer:
        wrote = False
        for u in units:
            with pa.memory_map(str(Path(u["dir"]) / "packed.arrow")) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    writer.write_table(pa.Table.from_batches([reader.get_batch(i)]), row_group_size=WRITE_BATCH)
                    wrote = True
        if not wrote:
            writer.write_table(PACKED_SCHEMA.empty_table())


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 1:
        raise StageError(f"tokenize takes one upstream manifest (shard), got {len(inputs)}")
    (upstream,) = inputs
    c = cfg.tokenize
    files = shard_files(upstream)
    if not files.get("train"):
        raise StageError(f"{upstream.path}: the train split has no shards, so there is no text to train a "
                         f"tokenizer on; add data or raise shard.splits['train']")

    # datasets' lock files live next to out_dir (same store, nothing in ~/.cache) and go away after.
    hf_cache = Path(tempfile.mkdtemp(prefix="hf-datasets-", dir=out_dir.parent))
    try:
        return _run(upstream, files, c, out_dir, ctx, hf_cache)
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)


def _run(upstream: Manifest, files: dict, c, out_dir: Path, ctx: StageContext, hf_cache: Path) -> Manifest:
    cached_tok = _tokenizer_unit(upstream, c, ctx, hf_cache)
    tok_dir = out_dir / "tokenizer"
    shutil.copytree(cached_tok, tok_dir)
    # Encode with the tokenizer as saved, so training here and loading downstream cannot differ.
    tokenizer = load_tokenizer(tok_dir)
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    out_files = [FileEntry(p.relative_to(out_dir).as_posix(), role="tokenizer")
                 for p in sorted(tok_dir.rglob("*")) if p.is_file()]

    section = {"seq_len": c.seq_len, "prompt_template": c.prompt_template}
    n_units = n_computed = 0
    computed: list[str] = []
    split_stats: dict[str, dict] = {}
    for split, paths in files.items():
        units = []
        for path in paths:
            key = _unit_key("packed", VERSION, _sha_listed(upstream, path), tok_sha, section)
            unit = ctx.store.unit_lookup(STAGE, key)
            if unit is None:
                verified_shard(upstream, path)

                def write(tmp: Path, path=path) -> dict:
                    counts = pack_shard(path, tokenizer, c.prompt_template, c.seq_len, tmp / "packed.arrow",
                                        hf_cache)
                    return {"files": [FileEntry("packed.arrow", role="packed", records=counts["blocks"])], **counts}

                unit = ctx.store.unit_write(STAGE, key, write)
                n_computed += 1
                computed.append(path.relative_to(upstream.dir).as_posix())
            n_units += 1
            units.append(unit)
        keys = ("records", "tokens", "long_documents", "target_tokens", "blocks")
        st = {k: sum(u[k] for u in units) for k in keys}
        total = st["blocks"] * c.seq_len
        st["padding"] = round((total - st["tokens"]) / total, 6) if total else 0.0
        split_stats[split] = st
        if units:
            rel = f"packed/{split}.parquet"
            _concat_packed(units, out_dir / rel)
            out_files.append(FileEntry(rel, role="packed", records=st["blocks"]))
        ctx.info("tokenize %s: %s", split, st)

    n_records = sum(s["records"] for s in split_stats.values())
    expected = sum(s.get("records", 0) for s in upstream.stats.get("splits", {}).values())
    if upstream.stats.get("splits") and n_records != expected:
        raise StageError(f"read {n_records} records from {upstream.path} but its manifest lists {expected}: "
                         f"a shard file changed after it was written; rerun `c2m run`")
    stats = {
        "splits": split_stats,
        "vocab_size": len(tokenizer),
        "seq_len": c.seq_len,
        "prompt_template": c.prompt_template,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "unk_id": tokenizer.unk_token_id,
        "tokenizer_sha256": tok_sha,
        "units": n_units,
        "units_computed": n_computed,
        "units_reused": n_units - n_computed,
        "computed_files": computed[:50],
    }
    _publish(split_stats)
    # Units are records in and records out (as packed documents); blocks are in stats.
    return Manifest(stage=STAGE, files=out_files,
                    counters={"in": n_records, "out": n_records, "rejected": {}, "duplicates": 0}, stats=stats)


def _publish(split_stats: dict[str, dict]) -> None:
    from corpus2model.tasks.common.artifacts import publish_table

    publish_table("tokenize-splits", [{"split": k, **v} for k, v in split_stats.items()],
                  "records, tokens, packed blocks and padding per split")
