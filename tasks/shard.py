"""shard: validated records -> train/validation/test Parquet shards of a target size.

Two decisions live here:

* **Which split a record belongs to** is a pure function of its id (``assign_split``): a
  sha256 bucket in [0, 1) against the cumulative split fractions. A record never moves when
  data is appended or reordered, so a held-out record stays held out across runs. Augmented
  records (``metadata.parent_id`` set) are bucketed by their parent's id: a paraphrase of a
  test record in train would leak the answer.
* **How big a shard is**: ``RollingParquetWriter`` writes row groups of ``row_group_rows`` rows
  and starts a new file once the file's byte position reaches ``target_bytes`` (pyarrow has no
  bytes-per-file option; the sink's ``tell()`` is exact for what was written so far).

Shards keep the input order within a split, so the same input gives the same bytes.
Training reads them through Hugging Face ``datasets`` (tasks/tokenize.py).
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.records import RECORD_SCHEMA
from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "shard"
VERSION = "1"
SECTIONS = ("shard",)

READ_BATCH_ROWS = 8192
# Min/max statistics only where a reader can filter on them (task type, domain, source, ...):
# on free text and hash ids they are useless and each costs up to 8 kB of footer per row group.
STATISTICS_COLUMNS = [f"metadata.{f.name}" for f in RECORD_SCHEMA.field("metadata").type]
_BUCKETS = 16**15  # 15 hex digits: 60 bits, far finer than any split fraction


# ---------------------------------------------------------------------------------------------
# pure functions
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


class RollingParquetWriter:
    """Write record batches into ``folder/<prefix>-00000.parquet``, ``-00001``, ... of about
    ``target_bytes`` each.

    Rows are buffered and written as row groups of exactly ``row_group_rows`` rows (the last
    group of a file may be shorter only at ``close``). After each row group the file's position
    is checked; once it reaches ``target_bytes`` the file is finished (footer written) and the
    next row starts a new file.

    Guarantee, for every file but the last: the position before its last row group was below
    ``target_bytes`` and the file's size is at least ``target_bytes``. So a file overshoots the
    target by less than one row group plus the footer. The footer costs about 100 bytes per
    column chunk (14 leaf columns per row group for records) plus the schema, which is noise for
    GB shards but a large share of tiny test shards; choose ``row_group_rows`` so a row group is
    small next to ``target_bytes``. The last file holds what is left and may be any size.
    """

    def __init__(self, folder: Path, prefix: str, target_bytes: int, schema: pa.Schema = RECORD_SCHEMA,
                 compression: str | None = "zstd", row_group_rows: int = 10_000,
                 write_statistics: bool | list[str] = True):
        if target_bytes <= 0 or row_group_rows <= 0:
            raise ValueError("target_bytes and row_group_rows must be positive")
        self.folder = Path(folder)
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.schema = schema
        self.compression = None if compression in (None, "none") else compression
        self.row_group_rows = row_group_rows
        self.write_statistics = write_statistics
        self.files: list[dict] = []  # {"path": Path, "records": n, "bytes": n}, finished files
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._sink = None
        self._writer = None
        self._rows_in_file = 0

    # -- writing --------------------------------------------------------------------------
    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if data.schema != self.schema:
            data = data.cast(self.schema)
        batches = data.to_batches() if isinstance(data, pa.Table) else [data]
        for b in batches:
            if b.num_rows:
                self._pending.append(b)
                self._pending_rows += b.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._write_group(self.row_group_rows)

    def _write_group(self, n: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        group, rest = table.slice(0, n), table.slice(n)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        if self._writer is None:
            self._open()
        self._writer.write_table(group, row_group_size=n)
        self._rows_in_file += group.num_rows
        if self._sink.tell() >= self.target_bytes:
            self._finish_file()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}-{len(self.files):05d}.parquet"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, compression=self.compression,
                                        write_statistics=self.write_statistics)
        self._path = path
        self._rows_in_file = 0

    def _finish_file(self) -> None:
        self._writer.close()  # writes the footer; does not close a sink it did not open
        self._sink.close()
        self.files.append({"path": self._path, "records": self._rows_in_file, "bytes": self._path.stat().st_size})
        self._writer = self._sink = None

    def close(self) -> list[dict]:
        """Flush the remaining rows and finish the open file; returns the files written (none if no
        rows). Calling it again returns the same list."""
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._finish_file()
        return self.files

    def __enter__(self) -> "RollingParquetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            # A failed run leaves its temp folder to the runner; just release the handle.
            self._writer.close()
            self._sink.close()


def batch_splits(batch: pa.RecordBatch | pa.Table, splits: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Row indices of a batch per split, in row order."""
    ids = batch.column("id").to_pylist()
    parents = pc.struct_field(batch.column("metadata"), "parent_id").to_pylist()
    out: dict[str, list[int]] = {name: [] for name in splits}
    for i, (rid, parent) in enumerate(zip(ids, parents)):
        if rid is None:
            raise StageError(f"a record without an id reached shard (row {i} of a batch): ids are set by ingest/augment")
        out[assign_split(parent or rid, splits, seed)].append(i)
    return out


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _check_schema(path: Path, schema: pa.Schema) -> None:
    if not schema.equals(RECORD_SCHEMA):
        missing = sorted(set(RECORD_SCHEMA.names) - set(schema.names))
        raise StageError(
            f"{path}: not a record file (schema differs from schemas.records.RECORD_SCHEMA"
            f"{'; missing columns ' + str(missing) if missing else ''}); shard reads the data parts of the validate stage"
        )


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 1:
        raise StageError(f"shard takes one upstream manifest (validate), got {len(inputs)}")
    (upstream,) = inputs
    c = cfg.shard
    splits = dict(c.splits)
    parts = upstream.files_with("data")
    n_in = 0
    with contextlib.ExitStack() as stack:  # on an error every open shard is released
        writers = {
            name: stack.enter_context(RollingParquetWriter(
                out_dir / name, "part", c.target_bytes, RECORD_SCHEMA, c.compression, c.row_group_rows,
                write_statistics=STATISTICS_COLUMNS))
            for name in splits
        }
        for path in parts:
            pf = pq.ParquetFile(path)
            _check_schema(path, pf.schema_arrow)
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS):
                n_in += batch.num_rows
                for name, idx in batch_splits(batch, splits, c.seed).items():
                    if idx:
                        writers[name].write(batch.take(pa.array(idx, type=pa.int64())))
        written = {name: w.close() for name, w in writers.items()}

    files: list[FileEntry] = []
    shard_stats: dict[str, list[dict]] = {}
    split_stats: dict[str, dict] = {}
    for name in splits:
        shard_stats[name] = []
        for f in written[name]:
            rel = f["path"].relative_to(out_dir).as_posix()
            files.append(FileEntry(rel, role="data", records=f["records"]))
            shard_stats[name].append({"path": rel, "records": f["records"], "bytes": f["bytes"]})
        split_stats[name] = {
            "records": sum(s["records"] for s in shard_stats[name]),
            "bytes": sum(s["bytes"] for s in shard_stats[name]),
            "shards": len(shard_stats[name]),
        }
    n_out = sum(s["records"] for s in split_stats.values())
    ctx.info("shard: %d records -> %s", n_out, {k: v["records"] for k, v in split_stats.items()})
    stats = {
        "shards": shard_stats,
        "splits": split_stats,
        "target_bytes": c.target_bytes,
        "compression": c.compression,
    }
    _publish(split_stats)
    return Manifest(stage=STAGE, files=files, counters={"in": n_in, "out": n_out, "rejected": {}, "duplicates": 0},
                    stats=stats)


def _publish(split_stats: dict[str, dict]) -> None:
    from tasks.artifacts import publish_table

    publish_table("shard-splits", [{"split": k, **v} for k, v in split_stats.items()], "records, bytes and shards per split")
