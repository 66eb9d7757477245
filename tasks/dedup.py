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

``dedup.method: minhash`` adds near-duplicates (``tasks.text.minhash``): every upstream part gets a
sketch (exact digests, LSH band keys, shingle hashes for verification) cached in
``<store>/_units/dedup/<key>/`` keyed by (sketch settings, part sha256). That cache is the
persisted index: a run that adds parts sketches only the new ones and compares them against the
stored sketches of the old ones. Exact and verified near pairs are joined by union-find; each
cluster keeps its smallest (source_path, source_line, id) member and every other member is a
``removed`` row naming it, with kind ``exact`` (same normalised text as the kept one) or ``near``.

Contamination (``dedup.eval_files``): word n-grams of evaluation sets are looked up in every kept
training record; hits are counted in stats and, with ``contamination_action: remove``,
quarantined with reason ``contaminated``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.schemas.records import (QUARANTINE_SCHEMA, RECORD_SCHEMA, REMOVED_SCHEMA, normalize_for_hash, quarantine_row,
                             quarantine_table)
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, Store, cache_key, sha256_file

STAGE = "dedup"
VERSION = "4"
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
        self._writer = pq.ParquetWriter(self._sink, self.schema, use_dictionary=dictionary_columns(self.schema))
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


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth a Parquet dictionary: every leaf but ids and free text, which never
    repeat (their dictionary pages were half of the write and read time); short metadata
    strings keep theirs."""
    return [c for c in _leaf_columns(schema) if c.split(".")[0] not in ("id", "input", "target", "record")]


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
# near-duplicates: per-part sketches (the persisted index) + one global decision
# ---------------------------------------------------------------------------------------------
SKETCH_VERSION = "3"
SKETCH_FILES = ("keys.npy", "sets.npy", "set_offsets.npy", "digests.npy", "meta.json")


def record_text(record: dict) -> str:
    """The text a record is shingled on: input and target (a document has an empty input)."""
    inp, tgt = record.get("input") or "", record.get("target") or ""
    return f"{inp}\n{tgt}" if inp else tgt


def sketch_params(cfg):
    from corpus2model.tasks.text.minhash import Params

    return Params(ngram=cfg.ngram, bands=cfg.bands, rows=cfg.rows, seed=cfg.seed)


def sketch_key(cfg, part_sha256: str) -> str:
    """What a part's sketch depends on: its bytes and the sketch settings (not the threshold: a
    new threshold reuses every sketch)."""
    settings = {"ngram": cfg.ngram, "bands": cfg.bands, "rows": cfg.rows, "seed": cfg.seed, "normalize": cfg.normalize}
    return cache_key(STAGE, SKETCH_VERSION, settings, [part_sha256])


def sketch_records(records: list[dict], cfg) -> dict:
    """Pure: the index entries of a list of records (arrays + per-record representative keys)."""
    import numpy as np

    from corpus2model.tasks.text.minhash import sketch

    sk = sketch([record_text(r) for r in records], sketch_params(cfg))
    digests = np.frombuffer(b"".join(_digest(r.get("input") or "", r.get("target") or "", cfg.normalize)[:16] for r in records),
                            dtype=np.uint64).reshape(-1, 2) if records else np.zeros((0, 2), dtype=np.uint64)
    meta = [[*representative_key(r)[:3], _content_digest(r).hex()] for r in records]
    return {**sk, "digests": digests, "meta": meta}


def _sketch_unit(args) -> dict:
    store_root, key, src, cfg = args

    def write(tmp: Path) -> dict:
        import numpy as np

        pf = pq.ParquetFile(src)
        parts = {"keys": [], "sets": [], "lens": [], "digests": [], "meta": []}
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            sk = sketch_records(batch.to_pylist(), cfg)
            parts["keys"].append(sk["keys"])
            parts["sets"].append(sk["sets"])
            parts["lens"].append(np.diff(sk["set_offsets"]))
            parts["digests"].append(sk["digests"])
            parts["meta"].extend(sk["meta"])
        bands = cfg.bands
        keys = np.concatenate(parts["keys"]) if parts["keys"] else np.zeros((0, bands), np.uint64)
        sets = np.concatenate(parts["sets"]) if parts["sets"] else np.zeros(0, np.uint32)
        lens = np.concatenate(parts["lens"]) if parts["lens"] else np.zeros(0, np.int64)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        digests = np.concatenate(parts["digests"]) if parts["digests"] else np.zeros((0, 2), np.uint64)
        np.save(tmp / "keys.npy", keys)
        np.save(tmp / "sets.npy", sets)
        np.save(tmp / "set_offsets.npy", offsets)
        np.save(tmp / "digests.npy", digests)
        (tmp / "meta.json").write_text(json.dumps(parts["meta"], ensure_ascii=False), encoding="utf-8")
        n = len(parts["meta"])
        return {"files": [FileEntry(f, role="index", records=n) for f in SKETCH_FILES], "records": n}

    return Store(store_root).unit_write(STAGE, key, write)


class SketchIndex:
    """The sketches of all parts, concatenated in part order (global row i = part u, row r).
    Verification hashes stay memory-mapped on disk: only candidate rows are ever read."""

    def __init__(self, unit_dirs: list[Path]):
        import numpy as np

        self.keys, self.digests, self.meta, self._sets, self._offs, self.starts = [], [], [], [], [], [0]
        for d in unit_dirs:
            self.keys.append(np.load(d / "keys.npy"))
            self.digests.append(np.load(d / "digests.npy"))
            self.meta.extend(json.loads((d / "meta.json").read_text(encoding="utf-8")))
            self._sets.append(np.load(d / "sets.npy", mmap_mode="r"))
            self._offs.append(np.load(d / "set_offsets.npy"))
            self.starts.append(self.starts[-1] + len(self.keys[-1]))
        self.keys = np.concatenate(self.keys) if self.keys else np.zeros((0, 1), np.uint64)
        self.digests = np.concatenate(self.digests) if self.digests else np.zeros((0, 2), np.uint64)
        self.n = self.starts[-1]

    def get_set(self, i: int):
        import bisect

        u = bisect.bisect_right(self.starts, i) - 1
        r = i - self.starts[u]
        off = self._offs[u]
        return self._sets[u][off[r]:off[r + 1]]

    def rep_key(self, i: int) -> tuple:
        path, line, rid, tie = self.meta[i]
        return (path, line, rid, tie)


def decide_clusters(index: SketchIndex, threshold: float) -> tuple[list, dict]:
    """Exact groups + verified near pairs -> union-find clusters -> per row (keep, kept row, kind).

    Returns (decisions, stats): decisions[i] is None for a kept row or (kept_row, kind)."""
    import numpy as np

    from corpus2model.tasks.text.minhash import UnionFind, near_duplicate_pairs

    t0 = time.perf_counter()
    uf = UnionFind(index.n)
    # exact groups: rows with one 128-bit digest, found by one sort
    d = index.digests
    order = np.lexsort((d[:, 1], d[:, 0])) if index.n else np.zeros(0, np.int64)
    ds = d[order]
    same = np.flatnonzero((ds[1:] == ds[:-1]).all(axis=1)) + 1 if index.n > 1 else np.zeros(0, np.int64)
    for p in same.tolist():
        uf.union(int(order[p - 1]), int(order[p]))
    t1 = time.perf_counter()

    def same_digest(i, j):
        return bool((d[i] == d[j]).all())

    pairs, n_cand = near_duplicate_pairs(index.keys, index.get_set, threshold, skip=same_digest)
    for i, j, _ in pairs:
        uf.union(i, j)
    t2 = time.perf_counter()
    roots = uf.roots()
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(np.bincount(roots, minlength=index.n)[roots] > 1).tolist():
        members.setdefault(int(roots[i]), []).append(i)
    decisions: list = [None] * index.n
    n_exact = n_near = 0
    for rows in members.values():
        rep = min(rows, key=index.rep_key)
        for i in rows:
            if i != rep:
                kind = "exact" if same_digest(i, rep) else "near"
                n_exact += kind == "exact"
                n_near += kind == "near"
                decisions[i] = (rep, kind)
    sizes = [len(r) for r in members.values()]
    stats = {"candidate_pairs": n_cand, "verified_near_pairs": len(pairs), "clusters": len(sizes),
             "largest_cluster": max(sizes, default=1 if index.n else 0), "exact_duplicates": n_exact,
             "near_duplicates": n_near, "seconds_exact": round(t1 - t0, 3), "seconds_lsh_verify": round(t2 - t1, 3)}
    return decisions, stats


def build_sketches(parts: list[tuple[Path, str]], cfg, store: Store) -> tuple[list[Path], int]:
    """Sketch every part not in the index yet (process pool when cfg.workers > 1); return the
    unit folders in part order and how many were computed."""
    from concurrent.futures import ProcessPoolExecutor

    keys = [sketch_key(cfg, sha) for _, sha in parts]
    found = {k: store.unit_lookup(STAGE, k) for k in keys}
    todo = list({k: (str(store.root), k, str(p), cfg) for (p, _), k in zip(parts, keys) if found[k] is None}.values())
    if cfg.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(cfg.workers, len(todo))) as pool:
            done = {info["key"]: info for info in pool.map(_sketch_unit, todo)}
    else:
        done = {info["key"]: info for info in map(_sketch_unit, todo)}
    return [Path((found[k] or done[k])["dir"]) for k in keys], len(todo)


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
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"dedup: {p}:{n} is not JSON ({e}); eval_files must be JSONL with input/target or text") from None
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
    (upstream,) = inputs
    paths = upstream.files_with("data")
    c = cfg.dedup
    if c.method == "minhash":
        return _run_minhash(upstream, c, out_dir, ctx)
    index = ExactIndex(c.normalize)
    n_in = 0
    for batch in iter_record_batches(paths, STAGE):
        for rec in batch.to_pylist():
            n_in += 1
            index.add(rec)

    def decide(batch, start):
        out = []
        for rec in batch.to_pylist():
            keep, kept_id = index.decide(rec)
            out.append(None if keep else (kept_id, "exact"))
        return out

    files, n_out, n_removed, rejected, cont = _write_output(paths, decide, c, out_dir)
    sizes = index.cluster_sizes()
    counters = {"in": n_in, "out": n_out, "rejected": rejected, "duplicates": n_removed}
    stats = {
        "method": "exact",
        "keys": len(index.slots),
        "clusters": len(sizes),
        "duplicates": n_removed,
        "largest_cluster": max(sizes, default=1 if index.slots else 0),
        "normalize": c.normalize,
        "parts": len([f for f in files if f.role == "data"]),
        **cont,
    }
    ctx.info("dedup: %d records in, %d kept, %d exact duplicates in %d clusters", n_in, n_out, n_removed, len(sizes))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)


def _run_minhash(upstream: Manifest, c, out_dir: Path, ctx: StageContext) -> Manifest:
    t0 = time.perf_counter()
    parts = []
    for e in upstream.entries("data"):
        p = upstream.dir / e.path
        if not p.is_file():
            raise StageError(f"dedup: upstream {upstream.stage} output {upstream.path} lists {e.path} but it is missing; rerun {upstream.stage}")
        pf = pq.ParquetFile(p)
        if not pf.schema_arrow.equals(RECORD_SCHEMA, check_metadata=False):
            raise StageError(f"dedup: {p} does not hold training records (schema {pf.schema_arrow}); "
                             f"expected schemas.records.RECORD_SCHEMA: rerun the upstream stage that wrote it")
        parts.append((p, e.sha256 or sha256_file(p)))
    unit_dirs, computed = build_sketches(parts, c, ctx.store)
    t1 = time.perf_counter()
    index = SketchIndex(unit_dirs)
    decisions, dstats = decide_clusters(index, c.threshold)
    t2 = time.perf_counter()

    def decide(batch, start):
        out = []
        for d in decisions[start:start + batch.num_rows]:
            out.append(None if d is None else (index.meta[d[0]][2], d[1]))
        return out

    if c.eval_files:  # contamination looks at every kept record: one streaming pass
        files, n_out, n_removed, rejected, cont = _write_output([p for p, _ in parts], decide, c, out_dir)
        written = len(parts)
    else:
        files, n_out, n_removed, written = _write_kept_parts(parts, index, decisions, c, ctx.store, out_dir)
        rejected, cont = {}, {}
    t3 = time.perf_counter()
    counters = {"in": index.n, "out": n_out, "rejected": rejected, "duplicates": n_removed}
    stats = {
        "method": "minhash", "normalize": c.normalize, "threshold": c.threshold, "ngram": c.ngram,
        "bands": c.bands, "rows": c.rows, "duplicates": n_removed, **dstats,
        "sketch_units": len(unit_dirs), "sketch_units_computed": computed,
        "sketch_units_reused": len(unit_dirs) - computed,
        "seconds_sketch": round(t1 - t0, 3), "seconds_decide": round(t2 - t1, 3), "seconds_write": round(t3 - t2, 3),
        "parts": len([f for f in files if f.role == "data"]), "parts_written": written, **cont,
    }
    ctx.info("dedup: %d records in, %d kept, %d exact + %d near duplicates; %d of %d sketches computed",
             index.n, n_out, dstats["exact_duplicates"], dstats["near_duplicates"], computed, len(unit_dirs))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)


OUT_UNIT = "dedup-out"


def _kept_key(part_sha256: str, keep) -> str:
    """A part's kept records depend on its bytes and on which of its rows are kept."""
    import numpy as np

    return cache_key(OUT_UNIT, VERSION, {}, [part_sha256, hashlib.sha256(np.packbits(keep).tobytes()).hexdigest(), str(len(keep))])


def _kept_part_unit(args) -> dict:
    """One upstream part filtered to its kept rows, streamed in batches, stored as a unit."""
    store_root, src, key, keep = args

    def write(tmp: Path) -> dict:
        w = PartWriter(tmp, max_bytes=1 << 62)
        start = 0
        for batch in iter_record_batches([Path(src)], STAGE):
            w.write(batch.filter(pa.array(keep[start:start + batch.num_rows])))
            start += batch.num_rows
        (entry,) = w.close()
        return {"files": [entry], "records": entry.records, "path": entry.path}

    return Store(store_root).unit_write(OUT_UNIT, key, write)


def _write_kept_parts(parts: list[tuple[Path, str]], index: SketchIndex, decisions: list, c, store: Store, out_dir: Path):
    """Pass two without contamination checks: one kept part per upstream part, stored per (part,
    kept mask), so a rerun that adds parts rewrites only the parts whose decisions changed
    (usually just the new ones); removed rows come from the index, no record is read for them."""
    import numpy as np

    from corpus2model.tasks.stage import link_or_copy

    keep_all = np.fromiter((d is None for d in decisions), dtype=bool, count=index.n)
    keys, found, todo = [], [], []
    for u, (p, sha) in enumerate(parts):
        keep = keep_all[index.starts[u]:index.starts[u + 1]]
        keys.append(_kept_key(sha, keep))
        found.append(store.unit_lookup(OUT_UNIT, keys[-1]))
        if found[-1] is None:
            todo.append((str(store.root), str(p), keys[-1], keep))
    if c.workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(c.workers, len(todo))) as pool:
            done = {info["key"]: info for info in pool.map(_kept_part_unit, todo)}
    else:
        done = {info["key"]: info for info in map(_kept_part_unit, todo)}
    files = []
    for u, (k, f) in enumerate(zip(keys, found)):
        info = f or done[k]
        rel = f"parts/part-{u:05d}.parquet"
        link_or_copy(Path(info["dir"]) / info["path"], out_dir / rel)
        files.append(FileEntry(rel, role="data", records=info["records"]))
    removed = [{"id": index.meta[i][2], "duplicate_of": index.meta[d[0]][2], "kind": d[1], "source_path": index.meta[i][0]}
               for i, d in enumerate(decisions) if d is not None]
    if removed:
        pq.write_table(pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA), out_dir / "removed.parquet")
        files.append(FileEntry("removed.parquet", role="removed", records=len(removed)))
    return files, sum(f.records for f in files if f.role == "data"), len(removed), len(todo)


def _write_output(paths: list[Path], decide, c, out_dir: Path):
    """Pass two: kept records in input order into parts/, removed rows into removed.parquet,
    contaminated records (action remove) into quarantine.parquet."""
    eval_hashes = load_eval_ngrams(c.eval_files, c.contamination_ngram) if c.eval_files else None
    writer = PartWriter(out_dir)
    removed_path, q_path = out_dir / "removed.parquet", out_dir / "quarantine.parquet"
    removed_writer = q_writer = None
    n_out = n_removed = n_q = 0
    cont = {"contaminated_records": 0, "contaminated_ngrams": 0} if eval_hashes is not None else {}
    start = 0
    for batch in iter_record_batches(paths, STAGE):
        dec = decide(batch, start)
        start += batch.num_rows
        mask = [d is None for d in dec]
        removed = []
        if not all(mask):  # only removed rows are turned into Python dicts
            ids = batch.column("id").to_pylist()
            spaths = batch.column("metadata").field("source_path").to_pylist()
            removed = [{"id": ids[i], "duplicate_of": d[0], "kind": d[1], "source_path": spaths[i]}
                       for i, d in enumerate(dec) if d is not None]
        q_rows = []
        if eval_hashes is not None:
            kept_idx = [i for i, m in enumerate(mask) if m]
            kept_tab = batch.take(pa.array(kept_idx, pa.int64()))
            recs = dict(zip(kept_idx, kept_tab.to_pylist()))
            hits = contaminated_mask([recs[i] for i in kept_idx], eval_hashes, c.contamination_ngram)
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
        files.append(FileEntry("removed.parquet", role="removed", records=n_removed))
    if q_writer is not None:
        q_writer.close()
        files.append(FileEntry("quarantine.parquet", role="quarantine", records=n_q))
    rejected = {"contaminated": n_q} if n_q else {}
    return files, n_out, n_removed, rejected, cont
