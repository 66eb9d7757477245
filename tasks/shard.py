"""shard: validated records -> train/validation/test Parquet shards of a target size (+ WebDataset tars).

Three decisions live here:

* **Which split a record belongs to** is a pure function of its id (``assign_split``): a
  sha256 bucket in [0, 1) against the cumulative split fractions. A record never moves when
  data is appended or reordered, so a held-out record stays held out across runs. Augmented
  records (``metadata.parent_id`` set) are bucketed by their parent's id: a paraphrase of a
  test record in train would leak the answer.
* **How big a shard is**: ``RollingParquetWriter`` sizes row groups in bytes (about
  ``target / row_groups_per_shard`` compressed, estimated from the compression seen so far in the
  same file), sizes the last group of a file to land on the target, and closes the file once its
  position plus the footer it will write reaches ``target_bytes``. pyarrow has no bytes-per-file
  option; the sink's ``tell()`` is exact for what was written. Every file but the last of a split
  ends within a few % of the target (+-10 % is what is promised and tested) as long as single records
  are small against it: files are cut between records, so with a 400 kB target and books of ~150 kB
  compressed each, a file can end a whole book past it (+32 % seen on ../shared's Gutenberg texts).
* **Which shards an append rewrites.** A split is a stream: the records of that split in upstream
  order (the validate parts in manifest order, rows in file order). Shards cut that stream into
  consecutive pieces, and a shard is a pure function of where it starts and the rows that follow
  (the writer starts fresh per file). Each shard is cached as a unit keyed by its start (upstream
  part sha256 + row within the part's split rows + the hashed config) and records its span (which
  parts and rows it holds). A rerun walks the stream from the start and reuses every shard whose
  span is still exactly what the stream holds at that place (same files, same sha256), then writes
  only from where the stream differs. New records usually arrive as new upstream parts at the end,
  so the stream only grows.

  The last shard of a split is *open* (smaller than the target). Rewriting it on every append
  would cost up to one target (1 GB) per append, so an append is a log: open shards are kept and
  the new records go into a new shard after them, until the open shards plus the new records
  would fill a whole shard; then the open shards are rewritten together with the new records into
  full shards (compaction: each byte is rewritten about once more, amortised). So after appends a
  split may end with a few undersized shards; a cold run writes every shard but the last at the
  target. Record content, order and splits never depend on history; only where the files are cut
  does (a fresh store writes the canonical cold layout).

  What is not incremental: a part inserted *before* existing parts (or a changed part) moves every
  later cut, so shards from that place on are rewritten. Reused shards are checked by size (as any
  cache hit); their sha256 is verified by the reader (tokenize) before use.

The per-part index (split of every row, a cached unit per upstream part sha256) is computed from
the ``id`` and ``metadata.parent_id`` columns only, so an append reads the text of new parts only (plus
the records of shards it compacts). A cold pass (no cached shard where any split's stream starts) does
not wait for it: its reader thread indexes each part as it reaches it (``_PartIndex.resolve``).

Threads of the write pass (two cores' worth; the stage is one process, docs/scale.md): the stage's own
thread compresses and writes the largest split (most of the bytes: zstd is most of the pass); a reader
thread decodes the parts, indexes them (cold pass), splits each batch and writes the small splits
itself; a store thread hashes each shard as it grows (``GrowingHash``) and moves finished shards into
their units.

Readers: Hugging Face ``datasets`` (``load_dataset("parquet", data_files=...)``, also with
``streaming=True``; tasks/tokenize.py) and ``webdataset`` for the tars (``read_webdataset``).

Preference records (upstream role "pairs", PAIR_SCHEMA) are sharded the same way, as a stream of their
own, into ``pairs/<split>-NNNNN.parquet`` (role "pairs"; ``pair_files``/``read_pairs`` read them; no
tars): the same per-part index, reusable shard chain and sizes. Their split is the same function
(``split_codes``) on ``pair_split_key``, the pair's content hash (normalised prompt, chosen, rejected),
not its occurrence id: a pairs file that DPO reads directly (finetune.dpo.pairs_path) has no raw-folder
path to make an occurrence id from, and keyed by content both routes put a pair in the same split.
``stats.split_rule`` records the fractions and seed so that route can apply them. The shard index
(``stats.shards``, what tokenize packs) lists training records only; ``stats.pairs`` lists the pairs.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpus2model.tasks.common.parquet import open_parquet
from corpus2model.schemas.records import PAIR_SCHEMA, PAIR_TEXT_FIELDS, RECORD_SCHEMA, pair_content_hash
from corpus2model.tasks.stage import (FileEntry, Manifest, StageContext, StageError, Store, Unit, canonical_json,
                                      compute_units, link_or_copy)

STAGE = "shard"
VERSION = "3"  # 3: dictionary encoding only on columns whose values repeat (DICTIONARY_COLUMNS)
SECTIONS = ("shard",)

READ_BATCH_ROWS = 8192
# Min/max statistics only where a reader can filter on them (task type, domain, source, ...):
# on free text and hash ids they are useless and each costs up to 8 kB of footer per row group.
STATISTICS_COLUMNS = [f"metadata.{f.name}" for f in RECORD_SCHEMA.field("metadata").type]
# Dictionary encoding only where values repeat (labels, the source file, its sha256, ...). On free
# text and per-record ids every dictionary page overflows and is thrown away after it was built: that
# was a fifth of the write time and slows every reader too.
UNIQUE_PER_RECORD = {"id", "input", "target", "metadata.source_id", "metadata.source_line", "metadata.parent_id",
                     "metadata.content_hash"}
DICTIONARY_COLUMNS = [c for c in ["id", "input", "target", *STATISTICS_COLUMNS] if c not in UNIQUE_PER_RECORD]
_BUCKETS = 16**15  # 15 hex digits: 60 bits, far finer than any split fraction
COMPACT_AT = 1.0  # open shards + new records fill a whole shard: rewrite them as full shards


# ---------------------------------------------------------------------------------------------
# pure functions: splits
# ---------------------------------------------------------------------------------------------
def split_bucket(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the record's place on the split line."""
    return int(hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()[:15], 16) / _BUCKETS


def assign_split(key: str, splits: dict[str, float], seed: int) -> str:
    """The split whose cumulative fraction (in the dict's order) first exceeds the key's bucket.

    ``key`` is the record id, or the parent id for augmented records (``split_key``).
    """
    bucket = split_bucket(key, seed)
    cumulative = 0.0
    last = None
    for name, fraction in splits.items():
        if fraction <= 0:
            continue
        cumulative += fraction
        last = name
        if bucket < cumulative:
            return name
    if last is None:
        raise StageError(f"shard.splits {splits} has no split with a positive fraction")
    # Fractions summing to 0.9999999 by float rounding: the top sliver belongs to the last split.
    return last


def split_key(record: dict) -> str:
    """What a record is bucketed by: its parent's id if it was derived from one, else its own."""
    md = record.get("metadata") or {}
    return md.get("parent_id") or record["id"]


def split_codes(batch: pa.RecordBatch | pa.Table, splits: dict[str, float], seed: int) -> np.ndarray:
    """Index into ``list(splits)`` of every row's split (int8), in row order: ``assign_split`` for a
    whole batch. Only the sha256 stays per row; the bucket arithmetic and the cumulative-fraction
    search run on numpy (per-row Python calls were a tenth of a cold shard run)."""
    names = list(splits)
    ids = batch.column("id")
    if ids.null_count:
        i = pc.index(pc.is_null(ids), True).as_py()
        raise StageError(f"a record without an id reached shard (row {i} of a batch): ids are set by ingest/augment")
    parents = pc.struct_field(batch.column("metadata"), "parent_id")
    # split_key: the parent's id when there is one (an empty one counts as none), else the record's own.
    keys = pc.if_else(pc.fill_null(pc.not_equal(parents, ""), False), parents, ids)
    # f"{seed}:{key}" as UTF-8 bytes, joined by Arrow; only the digest stays a per-row Python call.
    salted = pc.binary_join_element_wise(pa.scalar(f"{seed}:"), keys, "").cast(pa.binary()).to_pylist()
    sha = hashlib.sha256
    digests = np.frombuffer(b"".join([sha(k).digest() for k in salted]), dtype=">u8").reshape(-1, 4)
    # The first 15 hex digits of the digest are its first 60 bits: the top 8 bytes shifted right by 4.
    top = digests[:, 0].astype(np.uint64) >> np.uint64(4)
    # A 60-bit integer over 2**60, as split_bucket's int / 16**15: float64 rounds the integer to 53 bits
    # and the division by a power of two is exact, the same correctly rounded quotient.
    buckets = top.astype(np.float64) / float(_BUCKETS)
    live, cums, cumulative = [], [], 0.0
    for c, (name, fraction) in enumerate(splits.items()):
        if fraction <= 0:
            continue
        cumulative += fraction  # summed in dict order, exactly as assign_split does
        live.append(c)
        cums.append(cumulative)
    if not live:
        raise StageError(f"shard.splits {splits} has no split with a positive fraction")
    # The first split whose cumulative fraction exceeds the bucket; the sliver at the top goes to the last.
    pick = np.minimum(np.searchsorted(np.asarray(cums), buckets, side="right"), len(live) - 1)
    return np.asarray(live, dtype=np.int8)[pick]


def batch_splits(batch: pa.RecordBatch | pa.Table, splits: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Row indices of a batch per split, in row order."""
    codes = split_codes(batch, splits, seed)
    return {name: np.flatnonzero(codes == c).tolist() for c, name in enumerate(splits)}


def pair_split_key(pair: dict) -> str:
    """What a preference record is bucketed by: its content hash (``metadata.content_hash``, set by
    ingest from the raw texts; computed the same way when absent), so a pairs file read directly
    (finetune.dpo.pairs_path) splits exactly as its sharded copy does."""
    md = pair.get("metadata") or {}
    return md.get("content_hash") or pair_content_hash(pair.get("prompt") or "", pair.get("chosen") or "",
                                                       pair.get("rejected") or "")


def pair_split_batch(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """A batch of preference records as the columns ``split_codes`` reads: ``id`` = ``pair_split_key``."""
    keys = [pair_split_key(r) for r in batch.select(["prompt", "chosen", "rejected", "metadata"]).to_pylist()]
    return pa.table({"id": pa.array(keys, pa.string()), "metadata": batch.column("metadata")})


RECORD_TEXT = ("id", "input", "target")
PAIR_TEXT = ("id", *PAIR_TEXT_FIELDS)


def text_bytes(batch: pa.RecordBatch | pa.Table, columns: tuple[str, ...] = RECORD_TEXT) -> np.ndarray:
    """UTF-8 bytes of id + input + target per row (``columns``; id + prompt + chosen + rejected for
    pairs): what row groups are sized by before compression."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for name in columns:
        total += pc.fill_null(pc.binary_length(batch.column(name)), 0).to_numpy(zero_copy_only=False)
    return total


# ---------------------------------------------------------------------------------------------
# the rolling writer
# ---------------------------------------------------------------------------------------------
def _footer_model(schema: pa.Schema, row: pa.Table, compression, write_statistics,
                  use_dictionary: bool | list[str] = True) -> tuple[int, int]:
    """(footer bytes with one row group, footer bytes added per further row group), measured by
    writing ``row`` (this file's first row) as one and as two row groups into memory."""
    sizes = []
    for groups in (1, 2):
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, schema, compression=compression, write_statistics=write_statistics,
                              use_dictionary=use_dictionary) as w:
            for _ in range(groups):
                w.write_table(row)
        md = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
        data = sum(md.row_group(g).column(c).total_compressed_size
                   for g in range(md.num_row_groups) for c in range(md.num_columns))
        sizes.append(len(buf.getvalue()) - 4 - data)  # minus the leading "PAR1" and the data pages
    return sizes[0], max(0, sizes[1] - sizes[0])


class TarSampleWriter:
    """A reproducible WebDataset tar: samples ``NNNNNN.jsonl`` (records as JSON lines, batched up to
    ``sample_bytes``), written in key order, every header with mtime 0, uid/gid 0, mode 0644."""

    def __init__(self, path: Path, sample_bytes: int):
        self.path = Path(path)
        self.sample_bytes = sample_bytes
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self._lines: list[bytes] = []
        self._size = 0
        self.samples = 0

    def write_rows(self, rows: list[dict]) -> None:
        for r in rows:
            line = (json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            self._lines.append(line)
            self._size += len(line)
            if self._size >= self.sample_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self._lines:
            return
        data = b"".join(self._lines)
        info = tarfile.TarInfo(f"{self.samples:06d}.jsonl")
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self._lines, self._size = [], 0

    def close(self) -> None:
        self._flush()
        self._tar.close()


class GrowingHash:
    """sha256 of a file that is only ever appended to, read and hashed on ``executor`` while it grows.

    ``advance(end)`` hashes up to byte ``end`` (bytes the writer has handed to the OS); ``finish(size)``
    returns a future of the whole file's hex digest. When a shard closes, its digest is all but done,
    instead of a read of the whole file (~0.5 s per GB here) at the end of the pass. ``executor`` must
    run one job at a time, in order (a one-thread pool)."""

    def __init__(self, path: Path, executor):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self._sha = hashlib.sha256()
        self._executor = executor
        self._jobs: list[Future] = []

    def _read_to(self, end: int) -> None:
        while (left := end - self._file.tell()) > 0:
            block = self._file.read(min(left, 1 << 20))
            if not block:
                raise StageError(f"{self.path} is shorter than the {end} bytes written to it: the disk or "
                                 f"another process changed it; rerun `c2m run`")
            self._sha.update(block)

    def advance(self, end: int) -> None:
        self._jobs.append(self._executor.submit(self._read_to, end))

    def finish(self, size: int) -> Future:
        def digest() -> str:
            try:
                for job in self._jobs:  # done (one thread, in order): raises an earlier read's error
                    job.result()
                self._read_to(size)
                return self._sha.hexdigest()
            finally:
                self._file.close()

        return self._executor.submit(digest)

    def abort(self) -> None:
        self._executor.submit(self._file.close)


class RollingParquetWriter:
    """Write record batches into ``folder/<prefix>-NNNNN.parquet`` files of about ``target_bytes``.

    Row groups are cut by bytes, deterministically from the file's own rows: a group ends at the
    first row where the group's text bytes (``text_bytes``) reach ``target / row_groups_per_file``
    divided by the file's compression ratio so far (1.0 before its first group), capped by
    ``max_row_group_bytes`` / ``max_row_group_rows`` and by what the file still needs to reach the
    target (so the last group lands on it, never below ``target / (8 * row_groups_per_file)``).
    After each group the file closes once ``tell()`` + the footer still to come reaches the target;
    the footer is modelled from the file's first row written as one and two row groups in memory.
    The last file holds what is left. The same rows give the same files whatever batches they
    arrive in, which is what makes shards reusable units.

    ``on_close(info)`` is called for every finished file with ``{"path", "records", "bytes",
    "text_bytes", "closed_by": "size"|"end", "tar", "sha256"}``; ``tar_sample_bytes`` adds a WebDataset tar
    (``.tar`` beside each Parquet file, same rows). With ``hash_on`` (a one-thread executor) each Parquet
    file is hashed there as it grows (``GrowingHash``) and ``sha256`` is a future of its digest, else None.
    """

    def __init__(self, folder: Path, prefix: str, target_bytes: int, schema: pa.Schema = RECORD_SCHEMA,
                 compression: str | None = "zstd", row_groups_per_file: int = 32,
                 max_row_group_bytes: int = 64_000_000, max_row_group_rows: int = 100_000,
                 write_statistics: bool | list[str] = True, tar_sample_bytes: int | None = None,
                 start_index: int = 0, on_close: Callable[[dict], None] | None = None,
                 use_dictionary: bool | list[str] = True, text_columns: tuple[str, ...] = RECORD_TEXT,
                 hash_on=None):
        if target_bytes <= 0 or row_groups_per_file <= 0 or max_row_group_rows <= 0 or max_row_group_bytes <= 0:
            raise ValueError("target_bytes, row_groups_per_file and the row group caps must be positive")
        self.folder = Path(folder)
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.schema = schema
        self.compression = None if compression in (None, "none") else compression
        self.group_bytes = target_bytes / row_groups_per_file
        self.max_group_bytes = max_row_group_bytes
        self.max_group_rows = max_row_group_rows
        self.write_statistics = write_statistics
        self.use_dictionary = use_dictionary
        self.text_columns = text_columns
        self.tar_sample_bytes = tar_sample_bytes
        self.on_close = on_close
        self.hash_on = hash_on
        self.index = start_index
        self.files: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_sizes: list[np.ndarray] = []
        self._pending_rows = 0
        self._writer = self._hash = None

    # -- writing --------------------------------------------------------------------------
    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if data.schema != self.schema:
            data = data.cast(self.schema)
        for b in (data.to_batches() if isinstance(data, pa.Table) else [data]):
            if b.num_rows:
                self._pending.append(b)
                self._pending_sizes.append(text_bytes(b, self.text_columns))
                self._pending_rows += b.num_rows
        while self._pending_rows:
            n = self._next_group_rows()
            if n is None:
                return
            self._write_group(n)

    def _next_group_rows(self, final: bool = False) -> int | None:
        """Rows of the next row group, or None when the pending rows do not fill it yet."""
        sizes = np.cumsum(np.concatenate(self._pending_sizes))
        if self._writer is None:
            ratio, need = 1.0, self.target_bytes
        else:
            ratio = self._written_data / max(1, self._file_text)
            need = self.target_bytes - self._sink.tell() - self._footer_bytes()
        want = min(self.group_bytes, max(need, self.group_bytes / 8)) / max(ratio, 1e-3)
        want = min(want, self.max_group_bytes)
        n = int(np.searchsorted(sizes, want, side="left")) + 1  # first row where the group reaches want
        n = min(n, self.max_group_rows)
        if n > self._pending_rows:
            return self._pending_rows if final else None
        return n

    def _footer_bytes(self) -> int:
        return self._footer_one + (self._groups - 1) * self._footer_per_group if self._groups else 0

    def _write_group(self, n: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        sizes = np.concatenate(self._pending_sizes)
        group, rest = table.slice(0, n), table.slice(n)
        # Keep the rest as its own copy: a slice would pin the whole input batch in memory.
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_sizes = [sizes[n:]] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._writer is None:
            self._open(group.slice(0, 1))
        before = self._sink.tell()
        self._writer.write_table(group, row_group_size=n)
        self._groups += 1
        self._rows_in_file += n
        self._file_text += int(sizes[:n].sum())
        self._written_data += self._sink.tell() - before
        if self._tar is not None:
            self._tar.write_rows(group.to_pylist())
        if self._hash is not None:
            self._hash.advance(self._sink.tell())
        if self._sink.tell() + self._footer_bytes() >= self.target_bytes:
            self._finish_file("size")

    def _open(self, first_row: pa.Table) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._path = self.folder / f"{self.prefix}-{self.index:05d}.parquet"
        self._footer_one, self._footer_per_group = _footer_model(self.schema, first_row, self.compression,
                                                                 self.write_statistics, self.use_dictionary)
        self._sink = pa.OSFile(str(self._path), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=self.compression,
                                        write_statistics=self.write_statistics, use_dictionary=self.use_dictionary)
        self._tar = (TarSampleWriter(self._path.with_suffix(".tar"), self.tar_sample_bytes)
                     if self.tar_sample_bytes else None)
        self._hash = GrowingHash(self._path, self.hash_on) if self.hash_on is not None else None
        self._rows_in_file = self._groups = self._file_text = self._written_data = 0

    def _finish_file(self, closed_by: str) -> None:
        self._writer.close()  # writes the footer; does not close a sink it did not open
        self._sink.close()
        tar = None
        if self._tar is not None:
            self._tar.close()
            tar = self._tar.path
        size = self._path.stat().st_size
        info = {"path": self._path, "records": self._rows_in_file, "bytes": size, "text_bytes": self._file_text,
                "closed_by": closed_by, "tar": tar, "sha256": self._hash.finish(size) if self._hash else None}
        self.files.append(info)
        self._writer = self._sink = self._tar = self._hash = None
        self.index += 1
        if self.on_close is not None:
            self.on_close(info)

    def close(self) -> list[dict]:
        """Flush the remaining rows and finish the open file; returns the files written (none if no
        rows). Calling it again returns the same list."""
        while self._pending_rows:
            self._write_group(self._next_group_rows(final=True))
        if self._writer is not None:
            self._finish_file("end")
        return self.files

    def abort(self) -> None:
        """Release open handles after an error (the runner removes the temp folder)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            if self._tar is not None:
                self._tar.close()
            if self._hash is not None:
                self._hash.abort()
            self._writer = self._hash = None

    def __enter__(self) -> "RollingParquetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# readers (the ecosystem's, never our own format code)
# ---------------------------------------------------------------------------------------------
def read_webdataset(paths: list[Path]) -> list[dict]:
    """Every record of WebDataset tars written here, in order, read through the ``webdataset`` package."""
    import webdataset as wds

    out = []
    for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        out.extend(json.loads(line) for line in sample["jsonl"].decode("utf-8").splitlines())
    return out


PAIRS_ROLE = "pairs"


def pair_files(shard: Manifest) -> dict[str, list[Path]]:
    """split -> the preference-pair Parquet files (role "pairs", ``pairs/<split>-NNNNN.parquet``,
    schemas.records.PAIR_SCHEMA) of a shard output, in name order; {} when it holds no pairs."""
    out: dict[str, list[Path]] = {}
    for p in sorted(shard.files_with(PAIRS_ROLE)):
        out.setdefault(p.name.rsplit("-", 1)[0], []).append(p)
    return out


def read_pairs(paths: list[Path]) -> list[dict]:
    """Every preference record in ``paths`` (PAIR_SCHEMA Parquet), in file order, as dicts."""
    rows: list[dict] = []
    for p in paths:
        rows.extend(pq.read_table(p).to_pylist())
    return rows


# ---------------------------------------------------------------------------------------------
# the stage: per-part index, reusable shard chain, one pass writing what changed
# ---------------------------------------------------------------------------------------------
class Kind:
    """A record kind shard writes: training records (role "data", ``<split>/part-NNNNN``) or preference
    records (role "pairs", ``pairs/<split>-NNNNN``). ``key`` is what its unit keys add (none for records,
    so their keys are what they always were)."""

    def __init__(self, name: str, role: str, schema: pa.Schema, text: tuple[str, ...], key: tuple[str, ...]):
        self.name, self.role, self.schema, self.text, self.key = name, role, schema, text, key

    def rel(self, split: str, n: int) -> str:
        return f"pairs/{split}-{n:05d}" if self.role == PAIRS_ROLE else f"{split}/part-{n:05d}"


RECORDS = Kind("records", "data", RECORD_SCHEMA, RECORD_TEXT, ())
PAIRS = Kind("pairs", PAIRS_ROLE, PAIR_SCHEMA, PAIR_TEXT, ("pairs",))
KINDS = {k.name: k for k in (RECORDS, PAIRS)}


def _check_schema(path: Path, schema: pa.Schema, expected: pa.Schema = RECORD_SCHEMA) -> None:
    if not schema.equals(expected):
        name = "PAIR_SCHEMA" if expected.equals(PAIR_SCHEMA) else "RECORD_SCHEMA"
        missing = sorted(set(expected.names) - set(schema.names))
        raise StageError(
            f"{path}: not a {'preference-record' if name == 'PAIR_SCHEMA' else 'record'} file (schema differs from "
            f"schemas.records.{name}{'; missing columns ' + str(missing) if missing else ''}); shard reads the data "
            f"and pairs parts of the validate stage"
        )


def _open_part(path: Path, kind: Kind = RECORDS) -> pq.ParquetFile:
    try:
        pf = open_parquet(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"{path}: not a readable Parquet file ({e}); the upstream output is damaged: "
                         f"rerun `c2m run` to recompute it") from None
    _check_schema(path, pf.schema_arrow, kind.schema)
    return pf


def _key(*parts) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()[:24]


class _PartIndex:
    """Every upstream part's split index (``_index_unit``: each row's split code, a unit cached by the part's
    sha256) and, per split, the record counts of the parts resolved so far, in part order.

    ``complete()`` computes every missing part at once on the stage's executor (a Dask cluster: all its
    workers): what a rerun needs before it can match cached shards and decide on compaction.
    ``resolve(i)`` computes the parts up to ``i`` here, one by one: a cold write pass calls it from its
    reader thread as it reaches each part, so the index (a sha256 per record, ~0.6 s per GB) runs on the
    core the compressing thread leaves idle instead of before the pass. Counts only ever grow by whole
    parts, in order, so a thread reading them sees the parts below ``resolved`` complete."""

    def __init__(self, parts: list[tuple[Path, str]], splits: dict[str, float], seed: int, ctx: StageContext,
                 kind: Kind = RECORDS):
        self.ctx = ctx
        self.units = []
        for path, sha in parts:
            key = _key("index", VERSION, sha, splits, seed, *kind.key)
            size = path.stat().st_size if path.is_file() else 0  # a missing part fails in _open_part, with the fix
            self.units.append(Unit(key, path.stem, path.name,
                                   (str(ctx.store.root), key, str(path), splits, seed, kind.name), size))
        self.infos: list[dict | None] = [ctx.store.unit_lookup(STAGE + "-index", u.key) for u in self.units]
        self.counts: dict[str, list[int]] = {s: [] for s in splits}
        self.starts: dict[str, list[int]] = {s: [0] for s in splits}
        self.resolved = 0
        self._advance()

    def __getitem__(self, i: int) -> dict:
        return self.infos[i]

    def _advance(self) -> None:
        while self.resolved < len(self.infos) and self.infos[self.resolved] is not None:
            for s, n in self.infos[self.resolved]["counts"].items():
                self.counts[s].append(n)
                self.starts[s].append(self.starts[s][-1] + n)
            self.resolved += 1

    def resolve(self, i: int) -> None:
        """Index parts up to ``i`` (those not cached) in this thread."""
        while self.resolved <= i:
            j = self.resolved
            self.infos[j] = _index_unit(self.units[j].args)
            self._advance()

    def complete(self) -> None:
        """Index every part not indexed yet, on the stage's executor."""
        todo = [u for u, info in zip(self.units, self.infos) if info is None]
        if todo:
            done = compute_units(STAGE + "-index", todo, _index_unit, self.ctx)
            self.infos = [info or done[u.key] for u, info in zip(self.units, self.infos)]
            self._advance()


def _index_unit(args) -> dict:
    """One part's split codes into the store (runs on any process that sees the store)."""
    store_root, key, path, splits, seed, *kind = args
    kind = KINDS[kind[0] if kind else "records"]
    path = Path(path)

    def write(tmp: Path) -> dict:
        pf = _open_part(path, kind)
        if kind is PAIRS:  # bucketed by content (pair_split_key), which needs the texts when no hash was stored
            codes = [split_codes(pair_split_batch(b), splits, seed) for b in pf.iter_batches(batch_size=READ_BATCH_ROWS)]
        else:
            # only the columns split_codes reads (the metadata struct cut down to parent_id)
            codes = [split_codes(b, splits, seed) for b in pf.iter_batches(batch_size=READ_BATCH_ROWS * 8,
                                                                             columns=["id", "metadata.parent_id"])]
        codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int8)
        pq.write_table(pa.table({"split": codes}), tmp / "splits.parquet", compression="zstd")
        counts = {name: int((codes == c).sum()) for c, name in enumerate(splits)}
        return {"files": [FileEntry("splits.parquet", role="index", records=len(codes))], "counts": counts}

    return Store(store_root).unit_write(STAGE + "-index", key, write)


class _Stream:
    """One split's record stream over the upstream parts: global position <-> (part, row of split), over
    the parts its index has resolved (all of them, except during a cold write pass)."""

    def __init__(self, split: str, parts: list[tuple[Path, str]], index: _PartIndex, kind: "Kind" = None):
        self.split = split
        self.kind = kind or RECORDS
        self.parts = parts
        self.counts = index.counts[split]
        self.starts = index.starts[split]

    @property
    def total(self) -> int:
        return self.starts[-1]

    def locate(self, g: int) -> tuple[int, int]:
        """(part index, row among that part's split rows) of global position g < total."""
        i = bisect.bisect_right(self.starts, g) - 1
        while self.counts[i] == 0:
            i += 1
        return i, g - self.starts[i]

    def span(self, g: int, n: int) -> list[list] | None:
        """[[part sha256, first row, end row], ...] of rows [g, g+n); None if the stream is shorter."""
        if g + n > self.total:
            return None
        out = []
        i, k = self.locate(g)
        while n > 0:
            take = min(self.counts[i] - k, n)
            if take > 0:
                out.append([self.parts[i][1], k, k + take])
                n -= take
            i, k = i + 1, 0
        return out


def _shard_key(cfg_hash: dict, stream: _Stream, g: int) -> str:
    i, k = stream.locate(g)
    return _key("shard", VERSION, cfg_hash, stream.split, stream.parts[i][1], k, *stream.kind.key)


def _reusable_chain(stream: _Stream, cfg_hash: dict, target: int, ctx: StageContext) -> list[dict]:
    """The cached shards that still hold exactly the stream's rows from its start, in order,
    minus trailing open shards when the new records would fill them up (they get compacted)."""
    chain: list[dict] = []
    g = 0
    while g < stream.total:
        unit = ctx.store.unit_lookup(STAGE, _shard_key(cfg_hash, stream, g))
        if unit is None or stream.span(g, unit["records"]) != unit["span"]:
            break
        chain.append({**unit, "start": g})
        g += unit["records"]
    new_records = stream.total - g
    opens = []
    for u in reversed(chain):
        if u["closed_by"] != "end":
            break
        opens.append(u)
    if new_records and opens:
        per_record = sum(u["bytes"] for u in chain) / max(1, sum(u["records"] for u in chain))
        if sum(u["bytes"] for u in opens) + new_records * per_record >= COMPACT_AT * target:
            chain = chain[:len(chain) - len(opens)]
    return chain


def _starts_cold(index: _PartIndex, streams: dict[str, _Stream], splits: dict[str, float], cfg_hash: dict,
                 ctx: StageContext) -> bool:
    """True when no split has a cached shard where its stream starts, judged from the first part alone
    (indexed here if it is not): a cold pass rewrites every split from its start. A split missing from
    the first part (tiny parts) makes it False: the caller then indexes everything first, as a rerun does."""
    index.resolve(0)
    live = [s for s in streams if splits[s] > 0]
    return all(streams[s].counts[0] > 0 and ctx.store.unit_lookup(STAGE, _shard_key(cfg_hash, streams[s], 0)) is None
               for s in live)


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 1:
        raise StageError(f"shard takes one upstream manifest (validate), got {len(inputs)}")
    (upstream,) = inputs
    c = cfg.shard
    splits = dict(c.splits)
    r = _shard_kind(upstream, RECORDS, c, ctx, out_dir)
    pr = _shard_kind(upstream, PAIRS, c, ctx, out_dir) if upstream.entries(PAIRS_ROLE) else None
    files, hashed = r["files"] + (pr["files"] if pr else []), {**r["hashed"], **(pr["hashed"] if pr else {})}
    all_shards = [e for s in splits for e in r["shards"][s]] + [e for s in splits for e in (pr["shards"][s] if pr else [])]
    written = [e for e in all_shards if not e["reused"]]
    n_in, n_out = r["in"] + (pr["in"] if pr else 0), r["out"] + (pr["out"] if pr else 0)
    ctx.info("shard: %d records -> %s (%d shards written, %d reused)", r["out"],
             {k: v["records"] for k, v in r["splits"].items()}, len(written), len(all_shards) - len(written))
    stats = {
        "shards": r["shards"],
        "splits": r["splits"],
        "target_bytes": c.target_bytes,
        "compression": c.compression,
        "formats": list(c.formats),
        "units": len(all_shards),
        "units_computed": len(written),
        "units_reused": len(all_shards) - len(written),
        "computed_files": [e["path"] for e in written][:50],
        # How a record's split is decided (assign_split): the DPO route that reads a pairs file applies it too.
        "split_rule": {"splits": splits, "seed": c.seed},
        "_hashed": hashed,
    }
    if pr is not None:
        stats["pairs"] = {"shards": pr["shards"], "splits": pr["splits"]}
        ctx.info("shard: %d preference pairs -> %s", pr["out"], {k: v["records"] for k, v in pr["splits"].items()})
    _publish(r["splits"], pr["splits"] if pr else None)
    return Manifest(stage=STAGE, files=files, counters={"in": n_in, "out": n_out, "rejected": {}, "duplicates": 0},
                    stats=stats)


def _shard_kind(upstream: Manifest, kind: Kind, c, ctx: StageContext, out_dir: Path) -> dict:
    """Shard one kind of record (the upstream's parts of role ``kind.role``) into ``out_dir``."""
    splits = dict(c.splits)
    names = list(splits)
    cfg_hash = c.hashed()
    tar_bytes = c.webdataset_sample_bytes if "webdataset" in c.formats and kind is RECORDS else None
    entries = upstream.entries(kind.role)
    parts = [(upstream.dir / e.path, e.sha256 or _sha_of(upstream.dir / e.path)) for e in entries]

    # 1. per-part index (cached per part): how many records of each split every part holds.
    index = _PartIndex(parts, splits, c.seed, ctx, kind)
    streams = {s: _Stream(s, parts, index, kind) for s in names}
    # A cold pass (no cached shard where any split's stream starts) needs no counts before writing: its
    # reader indexes each part as it reaches it. Anything else (a rerun, an append) matches cached shards
    # against the whole index first.
    cold = index.resolved < len(parts) and _starts_cold(index, streams, splits, cfg_hash, ctx)
    if not cold:
        index.complete()

    # 2. per split: the shards that can be reused as they are, and where writing starts.
    chains = {s: [] if cold else _reusable_chain(streams[s], cfg_hash, c.target_bytes, ctx) for s in names}
    write_from = {s: (chains[s][-1]["start"] + chains[s][-1]["records"]) if chains[s] else 0 for s in names}
    shards: dict[str, list] = {s: [{**u, "reused": True} for u in chains[s]] for s in names}

    # 3. one pass over the parts that hold rows still to be written, every split's writer fed at once.
    tmp_root = ctx.store.root / "_tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shard-work-", dir=tmp_root) as work, contextlib.ExitStack() as stack:
        work = Path(work)
        # Shards are hashed as they grow and moved into their units on a thread of its own (hashing releases
        # the GIL): the writer goes on meanwhile. Shut down (waiting) before the work dir goes.
        storing = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="c2m-shard-store"))
        writers = {}
        for s in names:
            # a split with nothing to write gets no writer (a cold pass knows no totals yet: every split with
            # a positive fraction has rows in the first part, _starts_cold checked it)
            if splits[s] <= 0 or (not cold and write_from[s] >= streams[s].total):
                continue
            state = {"g": write_from[s]}

            def on_close(info: dict, s=s, state=state) -> None:
                g, state["g"] = state["g"], state["g"] + info["records"]
                # the parts this shard holds are indexed: the reader resolves a part before yielding its rows
                span = streams[s].span(g, info["records"])
                shards[s].append(storing.submit(_store_shard, info, span, _shard_key(cfg_hash, streams[s], g), g, ctx))

            writers[s] = stack.enter_context(RollingParquetWriter(
                work / s, "part", c.target_bytes, kind.schema, c.compression, c.row_groups_per_shard,
                c.row_group_max_bytes, c.row_group_rows, write_statistics=STATISTICS_COLUMNS,
                tar_sample_bytes=tar_bytes, start_index=len(chains[s]), on_close=on_close,
                use_dictionary=DICTIONARY_COLUMNS, text_columns=kind.text, hash_on=storing))
        if writers:
            # Reading runs ahead in a thread (up to two row groups' bytes): pyarrow decompresses the next
            # rows (GIL released) while this thread compresses and writes the current ones. This thread takes
            # a whole group's rows at once when it finishes one, so with one group of room it then waited
            # for the reader; two cut the 12 GB bench from 47.0 to 44.8 s for +85 MiB (three: 44.3 s).
            big = max(writers, key=lambda s: splits[s])

            def feed():
                for s, rows in _rows_to_write(parts, index, streams, list(writers), write_from, names, kind):
                    if s == big:
                        yield s, rows
                    else:
                        writers[s].write(rows)

            for s, rows in prefetch(feed(), max_bytes=2 * c.row_group_max_bytes, size=lambda item: item[1].nbytes):
                writers[s].write(rows)
        for w in writers.values():
            w.close()
        shards = {s: [u.result() if isinstance(u, Future) else u for u in us] for s, us in shards.items()}
    index.complete()  # a cold pass resolved every part it read; parts holding no rows at all are counted here
    n_in = sum(streams[s].total for s in names)

    # 4. link every shard into the output, build the shard index.
    files: list[FileEntry] = []
    hashed: dict[str, str] = {}
    shard_stats: dict[str, list[dict]] = {}
    split_stats: dict[str, dict] = {}
    for s in names:
        shard_stats[s] = []
        for n, u in enumerate(shards[s]):
            rel = kind.rel(s, n)
            entry = {"path": f"{rel}.parquet", "records": u["records"], "bytes": 0, "sha256": "",
                     "open": u["closed_by"] == "end", "reused": u["reused"]}
            for f in u["files"]:
                dst = f"{rel}.{f['path'].split('.', 1)[1]}"
                link_or_copy(Path(u["dir"]) / f["path"], out_dir / dst)
                role = kind.role if f["role"] == "data" else f["role"]
                files.append(FileEntry(dst, bytes=f["bytes"], sha256=f["sha256"], role=role, records=f["records"]))
                hashed[dst] = f["sha256"]
                if f["role"] == "data":
                    entry.update(bytes=f["bytes"], sha256=f["sha256"])
                else:
                    entry["webdataset"] = {"path": dst, "bytes": f["bytes"], "sha256": f["sha256"]}
            shard_stats[s].append(entry)
        split_stats[s] = {
            "records": sum(e["records"] for e in shard_stats[s]),
            "bytes": sum(e["bytes"] for e in shard_stats[s]),
            "shards": len(shard_stats[s]),
        }
    n_out = sum(v["records"] for v in split_stats.values())
    if n_out != n_in:
        raise StageError(f"shard wrote {n_out} {kind.name} but the parts hold {n_in}: a shard file or the index "
                         f"cache changed while running; rerun `c2m run`")
    return {"files": files, "hashed": hashed, "shards": shard_stats, "splits": split_stats, "in": n_in, "out": n_out}


def _sha_of(path: Path) -> str:
    from corpus2model.tasks.stage import sha256_file

    return sha256_file(path)


def _rows_to_write(parts: list, index: _PartIndex, streams: dict, splits: list[str], write_from: dict,
                   names: list, kind: Kind = RECORDS) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(split, rows) in stream order: every part's rows of the splits still being written, from where
    each split's writing starts (parts holding none of them are not opened)."""
    first = min(streams[s].locate(write_from[s])[0] if write_from[s] else 0 for s in splits)
    for i in range(first, len(parts)):
        index.resolve(i)  # a no-op unless a cold pass indexes as it reads
        if not any(streams[s].starts[i + 1] > write_from[s] and streams[s].counts[i] for s in splits):
            continue
        path, index_i = parts[i][0], index[i]
        codes = pq.read_table(Path(index_i["dir"]) / "splits.parquet").column("split").to_numpy()
        pf = _open_part(path, kind)
        pos = {s: int(streams[s].starts[i]) for s in splits}
        offset = 0
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS):
            bc = codes[offset:offset + batch.num_rows]
            offset += batch.num_rows
            for s in splits:
                mask = bc == names.index(s)
                n_rows = int(np.count_nonzero(mask))
                skip = max(0, write_from[s] - pos[s])
                pos[s] += n_rows
                if skip < n_rows:
                    if skip:  # rows of this split already in reused shards
                        mask[np.flatnonzero(mask)[:skip]] = False
                    # a boolean filter, not take(indices): same rows in the same order at a fifth of the cost
                    yield s, batch if skip == 0 and n_rows == batch.num_rows else batch.filter(pa.array(mask))
        if offset != len(codes):
            raise StageError(f"{path}: {offset} rows but its cached split index has {len(codes)}; rerun `c2m run`")


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterator, depth: int = 2, max_bytes: int = 0, size: Callable[[Any], int] | None = None) -> Iterator:
    """``items``, produced by a background thread at most ``depth`` items ahead of the consumer, or,
    with ``max_bytes``, as many as fit in that many bytes (``size(item)``; one item always may wait).

    For a producer that spends its time in code that releases the GIL (pyarrow reading and
    decompressing Parquet), this overlaps it with the consumer's own such work (compressing and
    writing): a second core at the cost of the items held. The consumer of the shard stage blocks
    in one row group's compression at a time, so the producer needs about a row group's worth of
    room to keep going meanwhile: two items (the old bound) left it idle most of each group. An
    exception in the producer is raised in the consumer; a consumer that stops early stops the producer."""
    cond = threading.Condition()
    q: collections.deque = collections.deque()
    held = [0]  # bytes of the items waiting
    stop = threading.Event()
    done = object()
    measure = size or (lambda _item: 0)

    def fits(n: int) -> bool:
        if not q:
            return True
        return (held[0] + n <= max_bytes) if max_bytes else len(q) < depth

    def put(item, n: int = 0) -> bool:
        with cond:
            while not stop.is_set() and not fits(n):
                cond.wait(0.1)
            if stop.is_set():
                return False
            q.append((item, n))
            held[0] += n
            cond.notify_all()
            return True

    def get():
        with cond:
            while not q:
                cond.wait()
            item, n = q.popleft()
            held[0] -= n
            cond.notify_all()
            return item

    def produce() -> None:
        try:
            for item in items:
                if not put(item, measure(item) if max_bytes else 0):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="c2m-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # a generator's own finally blocks (open files) run now, not at garbage collection


def _store_shard(info: dict, span: list[list], key: str, g: int, ctx: StageContext) -> dict:
    """Move a finished shard (and its tar) into its unit, keyed by where it starts in the stream (``key``)."""

    def write(tmp: Path) -> dict:
        sha = info["sha256"].result() if isinstance(info.get("sha256"), Future) else ""  # "": hashed on store
        files = [FileEntry("shard.parquet", role="data", records=info["records"], sha256=sha)]
        os.replace(info["path"], tmp / "shard.parquet")
        if info["tar"] is not None:
            os.replace(info["tar"], tmp / "shard.tar")
            files.append(FileEntry("shard.tar", role="webdataset", records=info["records"]))
        return {"files": files, "records": info["records"], "bytes": info["bytes"], "span": span,
                "text_bytes": info["text_bytes"], "closed_by": info["closed_by"]}

    unit = ctx.store.unit_write(STAGE, key, write)
    return {**unit, "start": g, "reused": False}


def _publish(split_stats: dict[str, dict], pair_stats: dict[str, dict] | None = None) -> None:
    from corpus2model.tasks.common.artifacts import publish_table

    publish_table("shard-splits", [{"split": k, **v} for k, v in split_stats.items()], "records, bytes and shards per split")
    if pair_stats is not None:
        publish_table("shard-pair-splits", [{"split": k, **v} for k, v in pair_stats.items()],
                      "preference pairs, bytes and shards per split")
