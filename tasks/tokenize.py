"""tokenize: shards -> a byte-level BPE tokenizer trained on train + packed token blocks per split.

Training records only: the shard output's preference records (``pairs/``) are skipped (counted in
``stats.pairs_skipped``). DPO tokenizes its pairs in finetune with this tokenizer and its own prompt /
response limits, and SFT packing must never see a rejected answer as text to learn.

A corpus of preference pairs only (no train records; DPO or a reward model) still gets a tokenizer: it
is trained on the train pairs' text, each pair's prompt, chosen and rejected answer as three texts
(as DPO encodes them, without the prompt template), up to ``tokenizer_sample_bytes``; no block is
packed (every split's stats are zeros, ``stats.tokenizer_source`` says "trained on preference pairs"),
and SFT on such an output stops in finetune with a clear error. Whenever there are train records the
tokenizer is trained on them alone, as before.

Reads the shard stage's Parquet files with pyarrow (``iter_records`` says why not through
``datasets``), trains a byte-level BPE tokenizer with ``tokenizers`` on the train split
only (held-out text must not shape the vocabulary), and turns every record into
``prompt tokens + target tokens + <|eos|>`` with the loss on the target and the eos.

Packing (``pack``): documents are laid into blocks of exactly ``seq_len`` tokens, a window of
``PACK_WINDOW_TOKENS`` at a time (memory stays bounded), by best-fit decreasing: longest first,
each into the fullest block that still holds it whole. An SFT example (a masked prompt) is never
split: its target would lose the prompt it answers. A plain document (no prompt) may be: it goes
whole into a gap if one holds it, else it is cut to fill the largest gaps and its remainder runs
into new blocks. A document longer than ``seq_len`` is first cut into ``seq_len`` chunks (a full
chunk is a block of its own; the tail packs like a short document). ``position_ids`` restart at 0 at
every segment (document, chunk or cut piece). Greedy first-fit in input order, the baseline this
replaces, left 25% of every demo block as padding at seq_len 256; this leaves well under 1% on
lognormal SFT lengths (tests/test_tokenize.py measures it). Blocks no longer follow input order:
training shuffles blocks anyway, and each segment's tokens stay in order.

The trade-off: documents share a block, so with plain causal attention a token can attend to
the earlier documents of its block; restarted ``position_ids`` keep each document's positions
right, and attention backends that read them (flash-attention varlen) keep documents apart.
Masking cross-document attention everywhere is the fine-tuning issue's job. What packing does
guarantee here: no loss term crosses a document boundary. A causal LM predicts ``labels[t+1]``
from token ``t``, so the first label of every document (and chunk) is set to -100: otherwise the
previous segment's last token would be trained to predict it. Nothing is lost by that: the first
token of a sequence is never predicted unpacked either.

Per shard, cached: every shard is read (a record batch at a time) only after its sha256
matches the shard manifest, tokenized and packed on its own (documents never cross a shard, so
each shard costs at most one padded block), and its Arrow blocks are cached as a unit keyed by the
shard's sha256 + the tokenizer's sha256 + this section. An append that reuses shards re-tokenizes
only the new or changed ones; ``packed/<split>.parquet`` (one file per split, what finetune reads)
is then rebuilt by copying the cached blocks, without tokenizing again.

The tokenizer is trained on the first train shards only, up to ``tokenizer_sample_bytes`` of their
files (a demo-sized corpus whole). Those shards are full, reused shards after an append, so the
tokenizer (itself a cached unit keyed by their sha256s) and with it every token id stays the same.

Baseline part (replaced by a later issue): one tokenizer per run (no reuse of a pretrained
model's tokenizer when ``model.pretrained`` is set).
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import shutil
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.tasks.common.parquet import open_parquet
from corpus2model.tasks.stage import (FileEntry, Manifest, StageContext, StageError, Store, Unit, canonical_json,
                                      compute_units, sha256_file)

STAGE = "tokenize"
VERSION = "3"  # 3: best-fit decreasing packing
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


PACK_WINDOW_TOKENS = 1 << 19  # documents packed together: bounds memory (a few bytes a token as arrays)


def _plan_window(lengths: list[int], splittable: list[bool], seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Best-fit decreasing on piece lengths alone: per block, its segments as (piece, offset, length).

    First the pieces that must stay whole, then the cuttable ones: whole where they fit, else cut to
    fill the largest gaps, the rest laid end to end into new blocks. Only lengths decide, so the plan
    is made on ints and the tokens are moved once, by ``_materialise``."""
    bins: list[list[tuple[int, int, int]]] = []  # segments per block
    fill: list[int] = []  # tokens per block
    free: list[tuple[int, int]] = []  # sorted (room left, block index) of blocks with room

    def place(k: int, piece: int, offset: int, n: int) -> None:
        bins[k].append((piece, offset, n))
        fill[k] += n
        if fill[k] < seq_len:
            bisect.insort(free, (seq_len - fill[k], k))

    def best_fit(n: int) -> int | None:
        i = bisect.bisect_left(free, (n, -1))
        if i == len(free):
            return None
        return free.pop(i)[1]

    def new_bin() -> int:
        bins.append([])
        fill.append(0)
        return len(bins) - 1

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # stable: deterministic
    rest = []
    for i in order:
        if splittable[i]:
            rest.append(i)
            continue
        k = best_fit(lengths[i])
        place(new_bin() if k is None else k, i, 0, lengths[i])
    leftover = []
    for i in rest:  # cuttable pieces, longest first: whole into the tightest gap that holds them
        k = best_fit(lengths[i])
        if k is None:
            leftover.append(i)
        else:
            place(k, i, 0, lengths[i])
    # What fits nowhere whole: cut, in input order, into the gaps (largest first), then new blocks.
    leftover.sort()
    for i in leftover:
        offset, left = 0, lengths[i]
        while left:
            if free:
                room, k = free.pop()  # the largest gap
            else:
                room, k = seq_len, new_bin()
            take = min(room, left)
            place(k, i, offset, take)
            offset, left = offset + take, left - take
    return bins


def _materialise(bins: list[list[tuple[int, int, int]]], starts: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The planned blocks as ``(blocks, seq_len)`` arrays, every token moved by one gather.

    Each segment's first label is -100 (never predicted from the previous segment); padding is
    ``pad_id`` with label -100, attention 0 and positions 0, 1, ... of its own."""
    seg_block = np.fromiter((b for b, segs in enumerate(bins) for _ in segs), dtype=np.int64)
    seg_src = np.fromiter((starts[p] + off for segs in bins for p, off, _ in segs), dtype=np.int64,
                          count=len(seg_block))
    seg_len = np.fromiter((n for segs in bins for _, _, n in segs), dtype=np.int64, count=len(seg_block))
    n_blocks = len(bins)
    before = np.cumsum(seg_len) - seg_len  # tokens before each segment, over all blocks
    first = np.searchsorted(seg_block, np.arange(n_blocks))  # each block's first segment
    dest_start = seg_block * seq_len + before - before[first][seg_block]
    n_real = np.bincount(seg_block, weights=seg_len, minlength=n_blocks).astype(np.int64)
    seg_of = np.repeat(np.arange(len(seg_len)), seg_len)
    within = np.arange(int(seg_len.sum())) - before[seg_of]  # position of each token in its segment
    dest, src = dest_start[seg_of] + within, seg_src[seg_of] + within

    cols = np.arange(seq_len)
    out_ids = np.full((n_blocks, seq_len), pad_id, dtype=ids.dtype)
    out_labels = np.full((n_blocks, seq_len), IGNORE_INDEX, dtype=ids.dtype)
    positions = (cols[None, :] - n_real[:, None]).astype(ids.dtype)  # padding counts 0, 1, ... after the tokens
    out_ids.reshape(-1)[dest] = ids[src]
    out_labels.reshape(-1)[dest] = labels[src]
    out_labels.reshape(-1)[dest_start] = IGNORE_INDEX
    positions.reshape(-1)[dest] = within
    mask = (cols[None, :] < n_real[:, None]).astype(ids.dtype)
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": positions, "attention_mask": mask}


class Packer:
    """Streaming packer over flat token arrays: documents in, ``(blocks, seq_len)`` arrays out.

    ``add(ids, labels, lengths)`` takes documents laid end to end (``lengths`` tokens each); every
    ``PACK_WINDOW_TOKENS`` of pieces it yields one window's blocks, ``finish()`` the last window's.
    A document longer than ``seq_len`` is cut into ``seq_len`` chunks first; a document whose labels
    hold no -100 (no prompt) may be cut at block edges, any other never. The rule is the module
    docstring's; ``iter_pack`` runs this packer and yields its blocks as Python lists."""

    def __init__(self, seq_len: int, pad_id: int, window_tokens: int = PACK_WINDOW_TOKENS):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.pad_id, self.window_tokens = seq_len, pad_id, window_tokens
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []  # piece lengths
        self._split: list[np.ndarray] = []  # piece may be cut
        self._tokens = 0

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(ids) or len(ids) != len(labels):
            raise ValueError(f"{len(ids)} input_ids and {len(labels)} labels for documents of {int(lengths.sum())} tokens")
        lengths = lengths[lengths > 0]  # an empty document has no piece
        if not len(lengths):
            return
        starts = np.cumsum(lengths) - lengths
        masked = np.add.reduceat((labels == IGNORE_INDEX).astype(np.int64), starts)
        split = masked == 0
        chunks = -(-lengths // self.seq_len)
        doc = np.repeat(np.arange(len(lengths)), chunks)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(chunks) - chunks, chunks)  # chunk index in its document
        piece_len = np.minimum(self.seq_len, lengths[doc] - k * self.seq_len)
        piece_split = split[doc]
        # Windows close after the piece that brings them to window_tokens, as iter_pack always did.
        flat_at = 0
        while len(piece_len):
            cum = self._tokens + np.cumsum(piece_len)
            j = int(np.searchsorted(cum, self.window_tokens, side="left"))
            if j == len(piece_len):
                self._keep(ids[flat_at:], labels[flat_at:], piece_len, piece_split)
                self._tokens = int(cum[-1])
                return
            n_flat = int(piece_len[:j + 1].sum())
            self._keep(ids[flat_at:flat_at + n_flat], labels[flat_at:flat_at + n_flat], piece_len[:j + 1],
                       piece_split[:j + 1])
            flat_at += n_flat
            piece_len, piece_split = piece_len[j + 1:], piece_split[j + 1:]
            yield self._pack()

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        if self._lengths:
            yield self._pack()

    def _keep(self, ids, labels, piece_len, piece_split) -> None:
        self._ids.append(ids)
        self._labels.append(labels)
        self._lengths.append(piece_len)
        self._split.append(piece_split)

    def _pack(self) -> dict[str, np.ndarray]:
        ids, labels = np.concatenate(self._ids), np.concatenate(self._labels)
        lengths, split = np.concatenate(self._lengths), np.concatenate(self._split)
        self._ids, self._labels, self._lengths, self._split, self._tokens = [], [], [], [], 0
        bins = _plan_window(lengths.tolist(), split.tolist(), self.seq_len)
        return _materialise(bins, np.cumsum(lengths) - lengths, ids, labels, self.seq_len, self.pad_id)


def iter_pack(examples: Iterable[dict], seq_len: int, pad_id: int,
              window_tokens: int = PACK_WINDOW_TOKENS) -> Iterator[dict]:
    """Stream blocks of exactly ``seq_len`` tokens from ``{"input_ids", "labels"}`` documents.

    Each block has input_ids, labels, position_ids and attention_mask (1 = real token,
    0 = padding). Padding is ``pad_id`` with label -100 and positions 0, 1, ... of its own.
    See the module docstring for the packing rule and why each segment's first label is -100.
    """
    packer = Packer(seq_len, pad_id, window_tokens)

    def rows(blocks: dict[str, np.ndarray]) -> Iterator[dict]:
        lists = {c: blocks[c].tolist() for c in PACKED_COLUMNS}
        for i in range(len(lists["input_ids"])):
            yield {c: lists[c][i] for c in PACKED_COLUMNS}

    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    for n, ex in enumerate(examples):
        doc_ids, doc_labels = ex["input_ids"], ex["labels"]
        if len(doc_ids) != len(doc_labels):
            raise ValueError(f"document {n}: {len(doc_ids)} input_ids but {len(doc_labels)} labels")
        ids.extend(doc_ids)
        labels.extend(doc_labels)
        lengths.append(len(doc_ids))
        if len(ids) >= 65_536:  # hand the documents over in batches: the packer works on arrays
            for blocks in packer.add(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), lengths):
                yield from rows(blocks)
            ids, labels, lengths = [], [], []
    if lengths:
        for blocks in packer.add(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), lengths):
            yield from rows(blocks)
    for blocks in packer.finish():
        yield from rows(blocks)


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


def _encoder(tokenizer):
    """``texts -> token id lists`` as ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives
    them, straight from the Rust tokenizer: the wrapper builds a BatchEncoding with offsets and
    attention masks per call that the packer never reads. Literal special-token strings stay text
    (the wrapper's ``split_special_tokens``, set on the backend the way the wrapper sets it per call)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # not a tokenizer this stage saved: let the wrapper decide
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def encode_batch(inputs: list, targets: list, tokenizer, template: str,
                 encode=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encode_records`` for a column batch as flat arrays, the documents laid end to end:
    (input_ids, labels, tokens per document), int32. The same tokens and labels (tests pin it),
    without a Python list per document: prompts are encoded only where there is an input, and the
    prompt mask is set with one numpy comparison."""
    encode = encode or _encoder(tokenizer)
    n = len(targets)
    with_input = [i for i, x in enumerate(inputs) if x]
    p_ids: list[list[int]] = [[]] * n
    for i, ids in zip(with_input, encode([template.format(input=inputs[i]) for i in with_input])):
        p_ids[i] = ids
    t_ids = encode([t or "" for t in targets])
    n_prompt = np.fromiter(map(len, p_ids), dtype=np.int64, count=n)
    lengths = n_prompt + np.fromiter(map(len, t_ids), dtype=np.int64, count=n) + 1  # + eos
    total = int(lengths.sum())
    eos = [tokenizer.eos_token_id]
    ids = np.fromiter(chain.from_iterable(chain.from_iterable(zip(p_ids, t_ids, repeat(eos)))), dtype=np.int32,
                      count=total)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels = ids.copy()
    labels[np.arange(total) - starts < np.repeat(n_prompt, lengths)] = IGNORE_INDEX  # the prompt is not trained on
    return ids, labels, lengths


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


def iter_records(path: Path, batch_size: int = ENCODE_BATCH) -> Iterator[dict[str, list]]:
    """Column batches (``{"input": [...], "target": [...]}``) of one shard, read by pyarrow's Parquet
    reader, the one ``datasets`` streams Parquet with. Going through ``datasets`` here cost its import
    (it loads torch: seconds and ~150 MB per worker process) and a lock-file cache folder, for the
    same two columns."""
    try:
        for b in open_parquet(path).iter_batches(batch_size=batch_size, columns=["input", "target"]):
            yield {"input": b.column(0).to_pylist(), "target": b.column(1).to_pylist()}
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


def _train_texts(paths: list[Path], template: str, max_bytes: int) -> Iterator[list[str]]:
    seen = 0
    for path in paths:
        for batch in iter_records(path):
            texts = ["".join(render({"input": i, "target": t}, template)) for i, t in zip(batch["input"], batch["target"])]
            yield texts
            seen += sum(len(t.encode("utf-8")) for t in texts)
            if seen >= max_bytes:
                return


def pair_train_files(upstream: Manifest) -> list[Path]:
    """The shard output's train preference-pair files (``pairs/train-NNNNN.parquet``), in order."""
    from corpus2model.tasks.shard import pair_files

    return pair_files(upstream).get("train", [])


def pairs_tokenizer_sample(upstream: Manifest, sample_bytes: int) -> list[Path]:
    """The first train pair files, until their files reach ``sample_bytes`` (at least one)."""
    out, total = [], 0
    for p in pair_train_files(upstream):
        if out and total >= sample_bytes:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def _pair_texts(paths: list[Path], max_bytes: int) -> Iterator[list[str]]:
    """Each pair's prompt, chosen and rejected answer, as DPO encodes them (no template, three texts)."""
    seen = 0
    for path in paths:
        try:
            batches = open_parquet(path).iter_batches(batch_size=ENCODE_BATCH, columns=["prompt", "chosen", "rejected"])
            for b in batches:
                texts = [t or "" for col in b.columns for t in col.to_pylist()]
                yield texts
                seen += sum(len(t.encode("utf-8")) for t in texts)
                if seen >= max_bytes:
                    return
        except (pa.ArrowInvalid, OSError) as e:
            raise StageError(f"pairs shard {path} could not be read ({e}); rerun `c2m run`") from None


def _tokenizer_unit(upstream: Manifest, c, ctx: StageContext) -> Path:
    """The tokenizer folder, trained once per (sample shards, settings) and cached as a unit: on the
    train records, or on the train pairs when there are no train records (a pairs-only corpus)."""
    sample = tokenizer_sample(upstream, c.tokenizer_sample_bytes)
    on_pairs = not sample
    if on_pairs:
        sample = pairs_tokenizer_sample(upstream, c.tokenizer_sample_bytes)
    shas = [_sha_listed(upstream, p) for p in sample]
    if on_pairs:  # no template: pairs are encoded as they are
        key = _unit_key("tokenizer-pairs", VERSION, shas, c.vocab_size, c.min_frequency, c.tokenizer_sample_bytes)
    else:
        key = _unit_key("tokenizer", VERSION, shas, c.vocab_size, c.min_frequency, c.prompt_template,
                        c.tokenizer_sample_bytes)
    hit = ctx.store.unit_lookup(STAGE + "-tokenizer", key)
    if hit is None:
        def write(tmp: Path) -> dict:
            for p in sample:
                verified_shard(upstream, p)
            texts = (_pair_texts(sample, c.tokenizer_sample_bytes) if on_pairs
                     else _train_texts(sample, c.prompt_template, c.tokenizer_sample_bytes))
            tok = train_tokenizer(texts, c.vocab_size, c.min_frequency)
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


def pack_shard(path: Path, tokenizer, template: str, seq_len: int, out_path: Path) -> dict:
    """Tokenize and pack one shard into an Arrow IPC file (zstd); returns its counts.

    Records go through as arrays end to end: ``encode_batch`` lays a batch's documents out flat,
    ``Packer`` plans blocks on lengths and moves the tokens with one gather, and the blocks become
    Arrow list columns without a Python int per token (lists cost ~100 bytes and ~1 us a token)."""
    counts = {"records": 0, "tokens": 0, "long_documents": 0}
    blocks = real = target = 0
    encode = _encoder(tokenizer)
    packer = Packer(seq_len, tokenizer.pad_token_id)
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    # Record batches of this many blocks (the last one shorter): what _concat_packed turns into row groups.
    flush_every = max(1, min(WRITE_BATCH, 262_144 // seq_len))
    pending: list[dict[str, np.ndarray]] = []
    n_pending = 0

    def write(writer, final: bool = False) -> None:
        nonlocal pending, n_pending
        if not pending:
            return
        cols = {c: np.concatenate([p[c] for p in pending]) for c in PACKED_COLUMNS}
        n_full = len(cols["input_ids"]) if final else len(cols["input_ids"]) // flush_every * flush_every
        for i in range(0, n_full, flush_every):
            writer.write_batch(_record_batch({c: v[i:i + flush_every] for c, v in cols.items()}))
        rest = {c: v[n_full:] for c, v in cols.items()}
        pending, n_pending = ([rest], len(rest["input_ids"])) if len(rest["input_ids"]) else ([], 0)

    def take(window: dict[str, np.ndarray], writer) -> None:
        nonlocal blocks, real, target, n_pending
        blocks += len(window["input_ids"])
        real += int(window["attention_mask"].sum())
        target += int(np.count_nonzero(window["labels"] != IGNORE_INDEX))
        pending.append(window)
        n_pending += len(window["input_ids"])
        if n_pending >= flush_every:
            write(writer)

    with pa.OSFile(str(out_path), "wb") as sink, pa.ipc.new_file(sink, PACKED_SCHEMA, options=options) as writer:
        for batch in iter_records(path):
            ids, labels, lengths = encode_batch(batch["input"], batch["target"], tokenizer, template, encode)
            counts["records"] += len(lengths)
            counts["tokens"] += len(ids)
            counts["long_documents"] += int(np.count_nonzero(lengths > seq_len))
            for window in packer.add(ids, labels, lengths):
                take(window, writer)
        for window in packer.finish():
            take(window, writer)
        write(writer, final=True)
    if real != counts["tokens"]:
        raise StageError(f"packing {path.name} kept {real} of {counts['tokens']} tokens: a bug in the packer")
    return {**counts, "target_tokens": target, "blocks": blocks}


def _record_batch(cols: dict[str, np.ndarray]) -> pa.RecordBatch:
    """``(blocks, seq_len)`` int32 arrays -> a record batch of list<int32> columns, without copying per row."""
    n, seq_len = cols["input_ids"].shape
    offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32))
    return pa.RecordBatch.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(cols[c].reshape(-1).astype(np.int32, copy=False)))
         for c in PACKED_COLUMNS], schema=PACKED_SCHEMA)


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(folder: str):
    return load_tokenizer(folder)  # once per worker process, not once per shard


def _pack_unit(args) -> dict:
    """One shard -> its packed Arrow blocks in the store (runs on any process that sees the store)."""
    store_root, key, path, tok_dir, template, seq_len = args
    tokenizer = _cached_tokenizer(tok_dir)

    def write(tmp: Path) -> dict:
        counts = pack_shard(Path(path), tokenizer, template, seq_len, tmp / "packed.arrow")
        return {"files": [FileEntry("packed.arrow", role="packed", records=counts["blocks"])], **counts}

    return Store(store_root).unit_write(STAGE, key, write)


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
    if not files.get("train") and not pair_train_files(upstream):
        raise StageError(f"{upstream.path}: the train split has no shards (no training records and no preference "
                         f"pairs), so there is no text to train a tokenizer on; add data or raise shard.splits['train']")
    return _run(upstream, files, c, out_dir, ctx)


# The files that make a saved Hugging Face tokenizer (a model folder holds weights beside them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def fixed_tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of ``tokenize.tokenizer_path``; a clear error when it holds none."""
    folder = Path(folder)
    found = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not (folder / "tokenizer.json").is_file():
        raise StageError(f"tokenize.tokenizer_path {folder} holds no tokenizer.json; point it at a saved tokenizer "
                         f"(e.g. a registry version's model/ folder) or remove it to train one on the corpus")
    return found


def key_extra(cfg) -> dict:
    """A fixed tokenizer (tokenize.tokenizer_path) keys by its files' content, not its path."""
    c = cfg.tokenize
    if c.tokenizer_path is None:
        return {}
    return {"tokenizer_sha256": {p.name: sha256_file(p) for p in fixed_tokenizer_files(c.tokenizer_path)}}


def _run(upstream: Manifest, files: dict, c, out_dir: Path, ctx: StageContext) -> Manifest:
    tok_dir = out_dir / "tokenizer"
    if c.tokenizer_path is not None:
        tok_dir.mkdir(parents=True)
        for p in fixed_tokenizer_files(c.tokenizer_path):
            shutil.copy2(p, tok_dir / p.name)
        cached_tok = Path(c.tokenizer_path)  # the units load it where it is, as they load a trained one from the store
    else:
        cached_tok = _tokenizer_unit(upstream, c, ctx)
        shutil.copytree(cached_tok, tok_dir)
    # Encode with the tokenizer as saved, so training here and loading downstream cannot differ.
    tokenizer = load_tokenizer(tok_dir)
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    out_files = [FileEntry(p.relative_to(out_dir).as_posix(), role="tokenizer")
                 for p in sorted(tok_dir.rglob("*")) if p.is_file()]

    section = {"seq_len": c.seq_len, "prompt_template": c.prompt_template}
    # One unit per shard, submitted to the stage's executor (a Dask cluster spreads them over all its
    # workers): each loads the cached tokenizer from the store, the same bytes as tok_dir.
    planned: dict[str, list[Unit]] = {}
    for split, paths in files.items():
        planned[split] = []
        for path in paths:
            key = _unit_key("packed", VERSION, _sha_listed(upstream, path), tok_sha, section)
            args = (str(ctx.store.root), key, str(path), str(cached_tok), c.prompt_template, c.seq_len)
            planned[split].append(Unit(key, path.stem, path.relative_to(upstream.dir).as_posix(), args,
                                       path.stat().st_size))
    hits = {u.key: ctx.store.unit_lookup(STAGE, u.key) for us in planned.values() for u in us}
    todo = [u for us in planned.values() for u in us if hits[u.key] is None]
    for u in todo:
        verified_shard(upstream, upstream.dir / u.label)
    done = compute_units(STAGE, todo, _pack_unit, ctx)
    n_units = sum(len(us) for us in planned.values())
    computed = list(dict.fromkeys(u.label for u in todo))
    n_computed = len(computed)
    split_stats: dict[str, dict] = {}
    for split, us in planned.items():
        units = [hits[u.key] or done[u.key] for u in us]
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
        "tokenizer_source": (str(c.tokenizer_path) if c.tokenizer_path is not None
                             else "trained" if files.get("train") else "trained on preference pairs"),
        "units": n_units,
        "units_computed": n_computed,
        "units_reused": n_units - n_computed,
        "computed_files": computed[:50],
        # Preference records are left to finetune (DPO encodes them itself, with finetune.dpo's prompt and
        # response limits); none of them is in a packed block, nor in the tokenizer's training text unless
        # there are no train records (tokenizer_source "trained on preference pairs").
        "pairs_skipped": sum(v.get("records", 0) for v in (upstream.stats.get("pairs") or {}).get("splits", {}).values()),
    }
    _publish(split_stats)
    # Units are records in and records out (as packed documents); blocks are in stats.
    return Manifest(stage=STAGE, files=out_files,
                    counters={"in": n_records, "out": n_records, "rejected": {}, "duplicates": 0}, stats=stats)


def _publish(split_stats: dict[str, dict]) -> None:
    from corpus2model.tasks.common.artifacts import publish_table

    publish_table("tokenize-splits", [{"split": k, **v} for k, v in split_stats.items()],
                  "records, tokens, packed blocks and padding per split")
