"""dedup: drop records whose text exactly repeats another record's, keeping one representative.

The key of a record is the sha256 of its input and target, normalised with
``schemas.records.normalize_for_hash`` (NFKC, casefolded, whitespace collapsed) when
``dedup.normalize`` is on. Among records with one key the representative is the one with the
smallest (source_path, source_line, id), so the kept record does not depend on the order in
which files were listed or read. Every other member is written to ``removed.parquet`` naming
the id it duplicates.

Memory is bounded by the number of distinct keys, not by the corpus: pass one streams the
input and keeps, per key, a 32-byte digest and the representative's sort key; pass two streams
it again and writes the kept records in input order.

Baseline, replaced by the MinHash issue: exact duplicates only (no near-duplicate detection), and
no index persisted across runs (each run compares its whole input).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import RECORD_SCHEMA, REMOVED_SCHEMA, normalize_for_hash
from tasks.stage import FileEntry, Manifest, StageContext, StageError

STAGE = "dedup"
VERSION = "1"
SECTIONS = ("dedup",)

BATCH_ROWS = 4096
PART_BYTES = 64 << 20


def _digest(input_text: str, target_text: str, normalize: bool) -> bytes:
    if normalize:
        input_text, target_text = normalize_for_hash(input_text), normalize_for_hash(target_text)
    h = hashlib.sha256()
    h.update(input_text.encode("utf-8"))
    h.update(b"\x1f")
    h.update(target_text.encode("utf-8"))
    return h.digest()


def exact_key(record: dict, normalize: bool) -> str:
    """sha256 (hex) of input + US + target, each normalised for hashing when ``normalize``."""
    return _digest(record.get("input") or "", record.get("target") or "", normalize).hex()


def _content_digest(record: dict) -> bytes:
    # Last tie-break between members with equal (source_path, source_line, id): the full record,
    # so even two differently-cased copies in one unnamed part resolve the same way every time.
    h = hashlib.sha256()
    for part in (record.get("input") or "", record.get("target") or "", repr(sorted((record.get("metadata") or {}).items()))):
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.digest()


def representative_key(record: dict) -> tuple:
    """The order that picks a cluster's kept record: smallest (source_path, source_line, id)."""
    md = record.get("metadata") or {}
    line = md.get("source_line")
    return (md.get("source_path") or "", -1 if line is None else line, record.get("id") or "", _content_digest(record))


class ExactIndex:
    """Per key: the representative's sort key and id, the member count, and whether the
    representative was emitted yet. Holds digests and sort keys only, never record text."""

    def __init__(self, normalize: bool):
        self.normalize = normalize
        self.slots: dict[bytes, list] = {}

    def add(self, record: dict) -> None:
        """Pass one: register a record."""
        d = _digest(record.get("input") or "", record.get("target") or "", self.normalize)
        rk = representative_key(record)
        slot = self.slots.get(d)
        if slot is None:
            self.slots[d] = [rk, record.get("id"), 1, False]
        else:
            slot[2] += 1
            if rk < slot[0]:
                slot[0], slot[1] = rk, record.get("id")

    def decide(self, record: dict) -> tuple[bool, str | None]:
        """Pass two: (keep, id of the kept member). Exactly one member per key is kept, even
        when two members are identical in every field."""
        slot = self.slots[_digest(record.get("input") or "", record.get("target") or "", self.normalize)]
        if not slot[3] and representative_key(record) == slot[0]:
            slot[3] = True
            return True, slot[1]
        return False, slot[1]

    def cluster_sizes(self) -> list[int]:
        return [slot[2] for slot in self.slots.values() if slot[2] > 1]


def select_representatives(records: list[dict], normalize: bool) -> tuple[list[dict], list[dict]]:
    """In-memory dedup of a list: (kept records in input order, REMOVED_SCHEMA rows).

    The stage runs the same two passes over streamed Parquet batches.
    """
    index = ExactIndex(normalize)
    for rec in records:
        index.add(rec)
    kept, removed = [], []
    for rec in records:
        keep, kept_id = index.decide(rec)
        if keep:
            kept.append(rec)
        else:
            removed.append(_removed_row(rec, kept_id))
    return kept, removed


def _removed_row(record: dict, kept_id: str | None) -> dict:
    md = record.get("metadata") or {}
    return {"id": record.get("id"), "duplicate_of": kept_id, "kind": "exact", "source_path": md.get("source_path")}


# ---------------------------------------------------------------------------------------------
# Parquet I/O shared by the record stages that rewrite their whole input (dedup, augment)
# ---------------------------------------------------------------------------------------------
class PartWriter:
    """Writes record batches into ``parts/part-00000.parquet``, ``part-00001`` ... rolling over
    once a part holds about ``max_bytes`` (measured by the file position, so compression counts)."""

    def __init__(self, out_dir: Path, schema: pa.Schema = RECORD_SCHEMA, max_bytes: int = PART_BYTES, sub: str = "parts"):
        self.out_dir, self.schema, self.max_bytes, self.sub = Path(out_dir), schema, max_bytes, sub
        self.entries: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._rows = 0

    def _open(self) -> None:
        rel = f"{self.sub}/part-{len(self.entries):05d}.parquet"
        (self.out_dir / self.sub).mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.out_dir / rel), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema)
        self.entries.append(FileEntry(rel, role="data", records=0))
        self._rows = 0

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self.entries[-1].records = self._rows
            self._writer = self._sink = None

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if table.num_rows == 0:
            return
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if self._writer is None:
            self._open()
        self._writer.write_table(table.cast(self.schema))
        self._rows += table.num_rows
        if self._sink.tell() >= self.max_bytes:
            self._close_part()

    def close(self) -> list[FileEntry]:
        """Finish the last part; with no rows at all one empty part is written, so downstream
        stages always find a file with the schema."""
        if self._writer is None and not self.entries:
            self._open()
        self._close_part()
        return self.entries


def iter_record_batches(paths: list[Path], stage: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Stream record batches from upstream parts, refusing a file that is not RECORD_SCHEMA."""
    for path in paths:
        pf = pq.ParquetFile(path)
        if not pf.schema_arrow.equals(RECORD_SCHEMA, check_metadata=False):
            raise StageError(
                f"{stage}: {path} does not hold training records (schema {pf.schema_arrow}); "
                f"expected schemas.records.RECORD_SCHEMA: rerun the upstream stage that wrote it"
            )
        yield from pf.iter_batches(batch_size=batch_rows)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (upstream,) = inputs
    paths = upstream.files_with("data")
    index = ExactIndex(cfg.dedup.normalize)
    n_in = 0
    for batch in iter_record_batches(paths, STAGE):
        for rec in batch.to_pylist():
            n_in += 1
            index.add(rec)

    writer = PartWriter(out_dir)
    removed_path = out_dir / "removed.parquet"
    removed_writer = None
    n_out = n_removed = 0
    for batch in iter_record_batches(paths, STAGE):
        mask, removed = [], []
        for rec in batch.to_pylist():
            keep, kept_id = index.decide(rec)
            if not keep:
                removed.append(_removed_row(rec, kept_id))
            mask.append(keep)
        # The kept rows go out as Arrow, untouched by the dict round trip.
        writer.write(batch.filter(pa.array(mask, pa.bool_())))
        n_out += sum(mask)
        if removed:
            if removed_writer is None:
                removed_writer = pq.ParquetWriter(removed_path, REMOVED_SCHEMA)
            removed_writer.write_table(pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA))
            n_removed += len(removed)
    files = writer.close()
    if removed_writer is not None:
        removed_writer.close()
        files.append(FileEntry("removed.parquet", role="removed", records=n_removed))

    sizes = index.cluster_sizes()
    counters = {"in": n_in, "out": n_out, "rejected": {}, "duplicates": n_removed}
    stats = {
        "keys": len(index.slots),
        "clusters": len(sizes),
        "duplicates": n_removed,
        "largest_cluster": max(sizes, default=1 if index.slots else 0),
        "normalize": cfg.dedup.normalize,
        "parts": len([f for f in files if f.role == "data"]),
    }
    ctx.info("dedup: %d records in, %d kept, %d exact duplicates in %d clusters", n_in, n_out, n_removed, len(sizes))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
