"""dedup: drop records whose text exactly repeats another record's, keeping one representative.

The key of a record is the sha256 of its input and target, normalised with
``schemas.records.normalize_for_hash`` (NFKC, casefolded, whitespace collapsed) when
``dedup.normalize`` is on. Among records with one key the representative is the one with the
smallest (source_path, source_line, id), so the kept record does not depend on the order in
which files were listed or read. Every other member is written to ``removed.parquet`` naming
the id it duplicates and where that kept record came from (``kept_source_path``/``_line``); ids
name occurrences (``schemas.records.occurrence_id``), so an exact copy never names itself.

Both methods run out of core, in phases that are units in the store (``tasks.text.dedup_index``):
every upstream part gets a sketch unit in ``<store>/_units/dedup/<key>/`` keyed by (settings, part
sha256) with its sorted exact digests and, for ``dedup.method: minhash``, its sorted LSH band keys
and the shingle hashes that verify candidates (``tasks.text.minhash``); the digest and band-key
spaces are cut into K hash partitions (K from ``dedup.memory_mb``), each partition finds and
verifies its pairs alone, and union-find over the partitions' edges makes the clusters. Memory is
bounded by one partition, not by the corpus. The sketch units and the partitions' edges are the
persisted index: a run that adds parts sketches only the new ones and checks them against the
stored buckets of the old ones. Each cluster keeps its smallest (source_path, source_line, id)
member and every other member is a ``removed`` row naming it, with kind ``exact`` (same
normalised text as the kept one) or ``near``.

Contamination (``dedup.eval_files``): word n-grams of evaluation sets are looked up in every kept
training record; hits are counted in stats and, with ``contamination_action: remove``,
quarantined with reason ``contaminated``.

Preference records (upstream role "pairs", PAIR_SCHEMA) get an index of their own, run the same way
on their prompt + chosen text (``pair_text_view``: the same answer preferred for the same prompt is one
pair, whatever it was compared with): exact and near duplicates among pairs are removed with rows in
``removed_pairs.parquet`` naming the kept pair, kept pairs go to ``pairs/part-NNNNN.parquet``. A pair is
never compared with a training record. Contamination looks at all three of a pair's texts.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.tasks.common.parquet import open_parquet
from corpus2model.schemas.records import (PAIR_SCHEMA, PAIR_TEXT_FIELDS, QUARANTINE_SCHEMA, RECORD_SCHEMA, REMOVED_SCHEMA,
                                           normalize_for_hash, quarantine_row, quarantine_table)
from corpus2model.tasks.common.jsonl import iter_json_objects
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, Store, cache_key, sha256_file

STAGE = "dedup"
VERSION = "6"  # 5: removed rows carry source_line and the kept record's source_path/line
# 6: the out-of-core index (exact too); a bucket's pairs are compared by content order, not part order
SECTIONS = ("dedup",)

BATCH_ROWS = 4096
PART_BYTES = 64 << 20


@dataclass(frozen=True)
class Kind:
    """One record kind dedup handles: where its parts come from (upstream role) and where its outputs go."""

    name: str
    role: str  # the upstream role it reads and the role of its kept parts
    schema: pa.Schema
    sub: str  # folder of the kept parts
    removed: str  # REMOVED_SCHEMA rows of this kind
    quarantine: str  # contaminated rows of this kind (contamination_action: remove)


RECORDS = Kind("records", "data", RECORD_SCHEMA, "parts", "removed.parquet", "quarantine.parquet")
PAIRS = Kind("pairs", "pairs", PAIR_SCHEMA, "pairs", "removed_pairs.parquet", "quarantine_pairs.parquet")
KINDS = {k.name: k for k in (RECORDS, PAIRS)}


def pair_text_view(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of preference records as the record columns the index reads: input = prompt, target =
    chosen (what two pairs must share to be one), id and metadata as they are."""
    return pa.RecordBatch.from_arrays([batch.column("id"), batch.column("prompt"), batch.column("chosen"),
                                       batch.column("metadata")], names=["id", "input", "target", "metadata"])


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

    def decide(self, record: dict) -> tuple[bool, tuple]:
        """Pass two: (keep, (id, source_path, source_line) of the kept member). Exactly one member
        per key is kept, even when two members are identical in every field."""
        slot = self.slots[_digest(record.get("input") or "", record.get("target") or "", self.normalize)]
        kept = (slot[1], *_where(slot[0]))
        if not slot[3] and representative_key(record) == slot[0]:
            slot[3] = True
            return True, kept
        return False, kept

    def cluster_sizes(self) -> list[int]:
        return [slot[2] for slot in self.slots.values() if slot[2] > 1]


def select_representatives(records: list[dict], normalize: bool) -> tuple[list[dict], list[dict]]:
    """In-memory exact dedup of a list: (kept records in input order, REMOVED_SCHEMA rows); the
    stage makes the same decisions out of core (``tasks.text.dedup_index``)."""
    index = ExactIndex(normalize)
    for rec in records:
        index.add(rec)
    kept, removed = [], []
    for rec in records:
        keep, kept_ref = index.decide(rec)
        if keep:
            kept.append(rec)
        else:
            md = rec.get("metadata") or {}
            removed.append(removed_row(rec.get("id"), md.get("source_path"), md.get("source_line"), kept_ref, "exact"))
    return kept, removed


def _where(rep_key) -> tuple:
    """(source_path, source_line) from a representative key (an absent line sorts as -1)."""
    path, line = rep_key[0], rep_key[1]
    return (path or None, None if line == -1 else line)


def removed_row(rid, source_path, source_line, kept: tuple, kind: str) -> dict:
    """One REMOVED_SCHEMA row: the removed record and the kept one (id, source_path, source_line)."""
    return {"id": rid, "duplicate_of": kept[0], "kind": kind, "source_path": source_path, "source_line": source_line,
            "kept_source_path": kept[1], "kept_source_line": kept[2]}


# ---------------------------------------------------------------------------------------------
# Parquet I/O shared by the record stages that rewrite their whole input (dedup, augment)
# ---------------------------------------------------------------------------------------------
class PartWriter:
    """Writes record batches into ``parts/part-00000.parquet``, ``part-00001`` ... rolling over
    once a part holds about ``max_bytes`` (measured by the file position, so compression counts)."""

    def __init__(self, out_dir: Path, schema: pa.Schema = RECORD_SCHEMA, max_bytes: int = PART_BYTES, sub: str = "parts",
                 role: str = "data"):
        self.out_dir, self.schema, self.max_bytes, self.sub, self.role = Path(out_dir), schema, max_bytes, sub, role
        self.entries: list[FileEntry] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._rows = 0

    def _open(self) -> None:
        rel = f"{self.sub}/part-{len(self.entries):05d}.parquet"
        (self.out_dir / self.sub).mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.out_dir / rel), "wb")
        self._writer = pq.ParquetWriter(self._sink, self.schema, use_dictionary=dictionary_columns(self.schema))
        self.entries.append(FileEntry(rel, role=self.role, records=0))
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


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth a Parquet dictionary: every leaf but ids and free text, which never
    repeat (their dictionary pages were half of the write and read time); short metadata
    strings keep theirs."""
    return [c for c in _leaf_columns(schema) if c.split(".")[0] not in ("id", "input", "target", "record", *PAIR_TEXT_FIELDS)]


def _leaf_columns(schema: pa.Schema) -> list[str]:
    """Dotted paths of the leaf columns (``metadata.source_path``), as ParquetWriter names them."""
    out = []

    def walk(prefix: str, t) -> None:
        if pa.types.is_struct(t):
            for f in t:
                walk(f"{prefix}.{f.name}", f.type)
        else:
            out.append(prefix)

    for f in schema:
        walk(f.name, f.type)
    return out


def iter_record_batches(paths: list[Path], stage: str, batch_rows: int = BATCH_ROWS,
                        schema: pa.Schema = RECORD_SCHEMA) -> Iterator[pa.RecordBatch]:
    """Stream record batches from upstream parts, refusing a file that is not ``schema`` (RECORD_SCHEMA,
    or PAIR_SCHEMA for preference records)."""
    what, name = ("preference records", "PAIR_SCHEMA") if schema.equals(PAIR_SCHEMA) else ("training records", "RECORD_SCHEMA")
    for path in paths:
        pf = open_parquet(path)
        if not pf.schema_arrow.equals(schema, check_metadata=False):
            raise StageError(
                f"{stage}: {path} does not hold {what} (schema {pf.schema_arrow}); "
                f"expected schemas.records.{name}: rerun the upstream stage that wrote it"
            )
        yield from pf.iter_batches(batch_size=batch_rows)


# ---------------------------------------------------------------------------------------------
# phase 1: one sketch unit per upstream part (the persisted index, tasks.text.dedup_index)
# ---------------------------------------------------------------------------------------------
SKETCH_VERSION = "4"  # 4: the out-of-core index files (sorted digests and band keys, meta.arrow); exact too


def record_text(record: dict) -> str:
    """The text a record is shingled on: input and target (a document has an empty input)."""
    inp, tgt = record.get("input") or "", record.get("target") or ""
    return f"{inp}\n{tgt}" if inp else tgt


def sketch_params(cfg):
    from corpus2model.tasks.text.minhash import Params

    return Params(ngram=cfg.ngram, bands=cfg.bands, rows=cfg.rows, seed=cfg.seed)


def sketch_key(cfg, part_sha256: str) -> str:
    """What a part's sketch unit depends on: its bytes and the sketch settings (not the threshold:
    a new threshold reuses every sketch). Exact dedup keeps digests only: its own key."""
    settings = {"method": cfg.method, "normalize": cfg.normalize}
    if cfg.method == "minhash":
        settings.update(ngram=cfg.ngram, bands=cfg.bands, rows=cfg.rows, seed=cfg.seed)
    return cache_key(STAGE, SKETCH_VERSION, settings, [part_sha256])


def _sketch_unit(args) -> dict:
    """Phase 1 for one upstream part: exact digests, (minhash) band keys and verification shingles,
    and who each row is, streamed batch by batch, written by ``dedup_index.write_index``."""
    store_root, key, src, cfg, *kind = args
    kind = KINDS[kind[0] if kind else "records"]

    def write(tmp: Path) -> dict:
        import numpy as np

        from corpus2model.tasks.text.dedup_index import digest_array, meta_table, normalized_digests, write_index
        from corpus2model.tasks.text.minhash import sketch

        digests, keys, sets, lens = [], [], [], []
        cols = {"path": [], "line": [], "id": [], "tie": []}
        for batch in iter_record_batches([Path(src)], STAGE, schema=kind.schema):
            if kind is PAIRS:
                batch = pair_text_view(batch)
            recs = batch.to_pylist()
            inputs = [r.get("input") or "" for r in recs]
            targets = [r.get("target") or "" for r in recs]
            digests.append(digest_array(normalized_digests(inputs, targets, cfg.normalize)))
            for r in recs:
                path, line, rid, tie = representative_key(r)
                cols["path"].append(path or None)
                cols["line"].append(None if line == -1 else line)
                cols["id"].append(rid or None)
                cols["tie"].append(tie.hex())
            if cfg.method == "minhash":
                sk = sketch([f"{i}\n{t}" if i else t for i, t in zip(inputs, targets)], sketch_params(cfg))
                keys.append(sk["keys"])
                sets.append(sk["sets"])
                lens.append(np.diff(sk["set_offsets"]))
        dg = np.concatenate(digests) if digests else np.zeros((0, 2), np.uint64)
        n = len(dg)
        k = s = offs = None
        if cfg.method == "minhash":
            k = np.concatenate(keys) if keys else np.zeros((0, cfg.bands), np.uint64)
            s = np.concatenate(sets) if sets else np.zeros(0, np.uint32)
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.concatenate(lens) if lens else np.zeros(0, np.int64), out=offs[1:])
        files = write_index(tmp, dg, k, s, offs, meta_table(cols["path"], cols["line"], cols["id"], cols["tie"]))
        return {"files": files, "records": n, "counters": {"in": n, "out": n, "rejected": {}}}

    return Store(store_root).unit_write(STAGE, key, write)


# ---------------------------------------------------------------------------------------------
# contamination: evaluation n-grams found in training records
# ---------------------------------------------------------------------------------------------
def load_eval_ngrams(paths: list[Path], ngram: int):
    """Sorted unique uint64 hashes of the word n-grams of every evaluation record."""
    import numpy as np

    from corpus2model.tasks.text.minhash import doc_words, shingle_hashes

    texts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise StageError(f"dedup: evaluation file {p} (dedup.eval_files) does not exist: fix the path or remove it")
        for _, obj in iter_json_objects(p, "dedup.eval_files must be JSONL with input/target or text"):
            texts.append(record_text(obj) if "target" in obj else str(obj.get("text", "")))
    # texts shorter than n words would give a whole-text shingle: too weak a signal, left out
    texts = [t for t in texts if len(doc_words(t)) >= ngram]
    if not texts:
        return np.zeros(0, np.uint64)
    flat, _ = shingle_hashes(texts, ngram)
    return np.unique(flat)


def contaminated_mask(records: list[dict], eval_hashes, ngram: int) -> list[int]:
    """Per record the number of its word n-grams that occur in the evaluation sets."""
    import numpy as np

    from corpus2model.tasks.text.minhash import doc_words, shingle_hashes

    if not records or len(eval_hashes) == 0:
        return [0] * len(records)
    texts = [record_text(r) for r in records]
    flat, off = shingle_hashes(texts, ngram)
    hit = np.isin(flat, eval_hashes)
    counts = np.add.reduceat(hit.astype(np.int64), off[:-1]) if len(flat) else np.zeros(len(texts), np.int64)
    # a record shorter than n words has only a whole-text shingle: not an n-gram match
    short = [len(doc_words(t)) < ngram for t in texts]
    return [0 if s else int(c) for s, c in zip(short, counts.tolist())]


def key_extra(cfg) -> dict:
    """The evaluation sets' content is part of the key: editing one reruns dedup."""
    return {"eval_files": [sha256_file(Path(p)) if Path(p).is_file() else "missing" for p in cfg.dedup.eval_files]}


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """Both methods run the phased, out-of-core index (``tasks.text.dedup_index``): sketch units
    per upstream part, K hash partitions of digests (and band keys), union-find over their edges.
    ``exact`` writes the kept records through one rolling writer; ``minhash`` one kept part per
    upstream part, stored per (part, kept rows), so a rerun that adds parts rewrites only those
    whose decisions changed. Preference records, when the upstream has any, go through the same
    steps as a kind of their own (``PAIRS``)."""
    (upstream,) = inputs
    c = cfg.dedup
    r = _dedup_kind(upstream, RECORDS, c, out_dir, ctx)
    pr = _dedup_kind(upstream, PAIRS, c, out_dir, ctx) if upstream.entries("pairs") else None
    rejected = dict(r["rejected"])
    for reason, n in (pr["rejected"] if pr else {}).items():
        rejected[reason] = rejected.get(reason, 0) + n
    counters = {"in": r["in"] + (pr["in"] if pr else 0), "out": r["out"] + (pr["out"] if pr else 0),
                "rejected": rejected, "duplicates": r["removed"] + (pr["removed"] if pr else 0)}
    ds, gstats = r["dec"].stats, r["gstats"]
    stats = {
        "method": c.method, "normalize": c.normalize, "duplicates": r["removed"], **ds,
        "sketch_units": r["units"], "sketch_units_computed": gstats["units_computed"],
        "sketch_units_reused": gstats["units_reused"], **r["seconds"],
        "parts": len([f for f in r["files"] if f.role == "data"]), "parts_written": r["written"], **r["cont"],
    }
    if c.method == "minhash":
        stats.update(threshold=c.threshold, ngram=c.ngram, bands=c.bands, rows=c.rows)
    else:
        stats["keys"] = r["in"] - r["removed"]
    files = r["files"]
    if pr is not None:
        # The pairs' own figures; the counters above hold both kinds.
        pds = pr["dec"].stats
        stats["pairs"] = {"in": pr["in"], "out": pr["out"], "duplicates": pr["removed"],
                          "exact_duplicates": pds["exact_duplicates"], "near_duplicates": pds["near_duplicates"],
                          "sketch_units": pr["units"], "sketch_units_computed": pr["gstats"]["units_computed"],
                          "parts_written": pr["written"], **pr["cont"]}
        files = files + pr["files"]
        ctx.info("dedup: %d pairs in, %d kept, %d exact + %d near duplicates", pr["in"], pr["out"],
                 pds["exact_duplicates"], pds["near_duplicates"])
    ctx.info("dedup: %d records in, %d kept, %d exact + %d near duplicates; %d of %d sketches computed, %d partitions",
             r["in"], r["out"], ds["exact_duplicates"], ds["near_duplicates"], gstats["units_computed"], r["units"],
             ds["partitions"])
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)


def _dedup_kind(upstream: Manifest, kind: Kind, c, out_dir: Path, ctx: StageContext) -> dict:
    """Sketch, index and write one kind of record (its upstream parts of role ``kind.role``)."""
    from corpus2model.tasks.text.dedup_index import SketchUnit, fan_out, run_index

    t0 = time.perf_counter()
    parts = []
    for e in upstream.entries(kind.role):
        p = upstream.dir / e.path
        if not p.is_file():
            raise StageError(f"dedup: upstream {upstream.stage} output {upstream.path} lists {e.path} but it is missing; rerun {upstream.stage}")
        pf = open_parquet(p)
        if not pf.schema_arrow.equals(kind.schema, check_metadata=False):
            raise StageError(f"dedup: {p} does not hold {kind.name} (schema {pf.schema_arrow}); expected schemas.records."
                             f"{'PAIR_SCHEMA' if kind is PAIRS else 'RECORD_SCHEMA'}: rerun the upstream stage that wrote it")
        parts.append((p, e.sha256 or sha256_file(p)))
    keys = [sketch_key(c, sha) for _, sha in parts]
    extra = (kind.name,) if kind is PAIRS else ()
    infos, gstats = fan_out(STAGE, [(k, str(p), (str(ctx.store.root), k, str(p), c, *extra), p.stat().st_size)
                                    for k, (p, _) in zip(keys, parts)], _sketch_unit, ctx, c.workers)
    units = [SketchUnit(k, Path(infos[k]["dir"]), infos[k]["records"], p.stat().st_size) for k, (p, _) in zip(keys, parts)]
    t1 = time.perf_counter()
    dec = run_index(units, c, ctx)
    t2 = time.perf_counter()
    n_in = sum(u.records for u in units)
    if c.eval_files or c.method == "exact":  # contamination looks at every kept record: one streaming pass
        files, n_out, n_removed, rejected, cont = _write_output([p for p, _ in parts], _decider(dec, units), c, out_dir, kind)
        written = len(parts)
    else:
        files, n_out, n_removed, written = _write_kept_parts(parts, units, dec, c, ctx, out_dir, kind)
        rejected, cont = {}, {}
    t3 = time.perf_counter()
    return {"files": files, "in": n_in, "out": n_out, "removed": n_removed, "rejected": rejected, "cont": cont,
            "dec": dec, "gstats": gstats, "units": len(units), "written": written,
            "seconds": {"seconds_sketch": round(t1 - t0, 3), "seconds_decide": round(t2 - t1, 3),
                        "seconds_write": round(t3 - t2, 3)}}


def _decider(dec, units):
    """``decide(batch, start)`` for ``_write_output``: per row of the batch (global input row
    numbers from ``start``) None (kept) or ((id, source_path, source_line) of the kept record, kind)."""
    import numpy as np

    starts = np.zeros(len(units) + 1, dtype=np.int64)
    np.cumsum([u.records for u in units], out=starts[1:])
    rm = dec.removed
    rows = starts[rm.column("unit").to_numpy()] + rm.column("row").to_numpy()
    refs = dict(zip(rows.tolist(), zip(zip(rm.column("kept_id").to_pylist(), rm.column("kept_path").to_pylist(),
                                           rm.column("kept_line").to_pylist()), rm.column("kind").to_pylist())))

    def decide(batch, start):
        return [refs.get(start + i) for i in range(batch.num_rows)]

    return decide


OUT_UNIT = "dedup-out"


def _kept_key(part_sha256: str, keep, kind: Kind = RECORDS) -> str:
    """A part's kept records depend on its bytes and on which of its rows are kept (and, for pairs, on
    being written as pairs)."""
    import numpy as np

    return cache_key(OUT_UNIT, VERSION, {}, [part_sha256, hashlib.sha256(np.packbits(keep).tobytes()).hexdigest(), str(len(keep)),
                                             *([kind.name] if kind is not RECORDS else [])])


def _kept_part_unit(args) -> dict:
    """One upstream part filtered to its kept rows, streamed in batches, stored as a unit."""
    store_root, key, src, keep, *kind = args
    kind = KINDS[kind[0] if kind else "records"]

    def write(tmp: Path) -> dict:
        w = PartWriter(tmp, kind.schema, max_bytes=1 << 62, sub=kind.sub, role=kind.role)
        start = 0
        for batch in iter_record_batches([Path(src)], STAGE, schema=kind.schema):
            w.write(batch.filter(pa.array(keep[start:start + batch.num_rows])))
            start += batch.num_rows
        (entry,) = w.close()
        return {"files": [entry], "records": entry.records, "path": entry.path,
                "counters": {"in": len(keep), "out": entry.records, "rejected": {}}}

    return Store(store_root).unit_write(OUT_UNIT, key, write)


def _write_kept_parts(parts: list[tuple[Path, str]], units, dec, c, ctx: StageContext, out_dir: Path, kind: Kind = RECORDS):
    """Pass two without contamination checks: one kept part per upstream part, stored per (part,
    kept mask), so a rerun that adds parts rewrites only the parts whose decisions changed
    (usually just the new ones); removed rows come from the index, no record is read for them."""
    from corpus2model.tasks.stage import link_or_copy
    from corpus2model.tasks.text.dedup_index import fan_out

    masks = [dec.keep_mask(u) for u in range(len(units))]
    keys = [_kept_key(sha, m, kind) for (_, sha), m in zip(parts, masks)]
    extra = (kind.name,) if kind is not RECORDS else ()
    infos, gstats = fan_out(OUT_UNIT, [(k, str(p), (str(ctx.store.root), k, str(p), m, *extra), p.stat().st_size)
                                       for k, (p, _), m in zip(keys, parts, masks)], _kept_part_unit, ctx, c.workers)
    files = []
    for u, k in enumerate(keys):
        info = infos[k]
        rel = f"{kind.sub}/part-{u:05d}.parquet"
        link_or_copy(Path(info["dir"]) / info["path"], out_dir / rel)
        files.append(FileEntry(rel, role=kind.role, records=info["records"]))
    n_removed = write_removed_parquet(dec.removed, out_dir / kind.removed)
    if n_removed:
        files.append(FileEntry(kind.removed, role="removed", records=n_removed))
    return files, sum(f.records for f in files if f.role == kind.role), n_removed, gstats["units_computed"]


def write_removed_parquet(removed: pa.Table, path: Path) -> int:
    """The index's removed rows as REMOVED_SCHEMA (input order); nothing is written for none."""
    if removed.num_rows == 0:
        return 0
    out = pa.table({"id": removed["id"], "duplicate_of": removed["kept_id"], "kind": removed["kind"],
                    "source_path": removed["path"], "source_line": removed["line"],
                    "kept_source_path": removed["kept_path"], "kept_source_line": removed["kept_line"]}, schema=REMOVED_SCHEMA)
    pq.write_table(out, path)
    return out.num_rows


def _contamination_view(record: dict, kind: Kind) -> dict:
    """What contamination looks at: a record's input and target, all three texts of a pair."""
    if kind is PAIRS:
        return {"input": record.get("prompt") or "", "target": f"{record.get('chosen') or ''}\n{record.get('rejected') or ''}"}
    return record


def _write_output(paths: list[Path], decide, c, out_dir: Path, kind: Kind = RECORDS):
    """Pass two: kept records in input order into parts/ (pairs/ for pairs), removed rows into
    removed.parquet (removed_pairs.parquet), contaminated records (action remove) into quarantine.parquet
    (quarantine_pairs.parquet)."""
    eval_hashes = load_eval_ngrams(c.eval_files, c.contamination_ngram) if c.eval_files else None
    writer = PartWriter(out_dir, kind.schema, sub=kind.sub, role=kind.role)
    removed_path, q_path = out_dir / kind.removed, out_dir / kind.quarantine
    removed_writer = q_writer = None
    n_out = n_removed = n_q = 0
    cont = {"contaminated_records": 0, "contaminated_ngrams": 0} if eval_hashes is not None else {}
    start = 0
    for batch in iter_record_batches(paths, STAGE, schema=kind.schema):
        dec = decide(batch, start)
        start += batch.num_rows
        mask = [d is None for d in dec]
        removed = []
        if not all(mask):  # only removed rows are turned into Python dicts
            ids = batch.column("id").to_pylist()
            spaths = batch.column("metadata").field("source_path").to_pylist()
            slines = batch.column("metadata").field("source_line").to_pylist()
            removed = [removed_row(ids[i], spaths[i], slines[i], d[0], d[1]) for i, d in enumerate(dec) if d is not None]
        q_rows = []
        if eval_hashes is not None:
            kept_idx = [i for i, m in enumerate(mask) if m]
            kept_tab = batch.take(pa.array(kept_idx, pa.int64()))
            recs = dict(zip(kept_idx, kept_tab.to_pylist()))
            hits = contaminated_mask([_contamination_view(recs[i], kind) for i in kept_idx], eval_hashes, c.contamination_ngram)
            for i, h in zip(kept_idx, hits):
                if h:
                    cont["contaminated_records"] += 1
                    cont["contaminated_ngrams"] += h
                    if c.contamination_action == "remove":
                        mask[i] = False
                        q_rows.append(quarantine_row(STAGE, "contaminated", detail=f"{h} word {c.contamination_ngram}-grams found in dedup.eval_files",
                                                     score=float(h), record=recs[i]))
        # The kept rows go out as Arrow, untouched by the dict round trip.
        writer.write(batch.filter(pa.array(mask, pa.bool_())))
        n_out += sum(mask)
        if removed:
            if removed_writer is None:
                removed_writer = pq.ParquetWriter(removed_path, REMOVED_SCHEMA)
            removed_writer.write_table(pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA))
            n_removed += len(removed)
        if q_rows:
            if q_writer is None:
                q_writer = pq.ParquetWriter(q_path, QUARANTINE_SCHEMA)
            q_writer.write_table(quarantine_table(q_rows))
            n_q += len(q_rows)
    files = writer.close()
    if removed_writer is not None:
        removed_writer.close()
        files.append(FileEntry(kind.removed, role="removed", records=n_removed))
    if q_writer is not None:
        q_writer.close()
        files.append(FileEntry(kind.quarantine, role="quarantine", records=n_q))
    rejected = {"contaminated": n_q} if n_q else {}
    return files, n_out, n_removed, rejected, cont
