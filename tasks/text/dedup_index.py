"""The out-of-core duplicate index: exact and near-duplicate decisions over many sketch units, in
phases that are each units in the store, with memory bounded by one partition (DESIGN.md, "Scale").

The phases are the ones datatrove's MinHash dedup and NeMo Curator use:

1. **signatures** (the callers: ``tasks.dedup`` per Parquet part, ``tasks.text.dedup_jsonl`` per JSONL
   file): every input gets a *sketch unit* written by ``write_index``: its exact digests sorted, its
   LSH band keys sorted (``bkeys``/``brows``), the shingle hashes that verify candidates, and who
   each row is (``meta.arrow``: source_path, source_line, id, tie-break, input name).
2. **partitions** (``_partition_unit``): the 64-bit space of band keys and of exact digests is cut
   into K equal ranges. Partition p reads from every unit only the slice of its sorted arrays that
   falls in range p (a binary search on a memory-mapped file), groups equal keys and stores its
   exact edges and its candidate pairs. **Verification** (``_verify_unit``): the candidate pairs of
   all partitions are routed by a hash of the pair into K' partitions, so a pair that shares several
   bands is compared once; each compares its pairs by exact shingle Jaccard and stores the near
   edges. K and K' come from ``dedup.memory_mb`` (``choose_partitions``), never by hand.
3. **merge** (``decide``): union-find over the edge files of all partitions; every cluster keeps
   its smallest (source_path, source_line, id, tie) member, as the in-memory dedup always did.

Which pairs are edges does not depend on K, on the order of the input files or on the history of
the store: two rows with one exact digest; two rows that share a band key and whose exact shingle
Jaccard is >= threshold. Rows with one digest are compared through one of them (the first by unit
key and row), and in a bucket with more than ``CLIQUE`` distinct digests only pairs with one of its
first ``CLIQUE`` digests are compared (a pathological bucket, e.g. boilerplate shared by thousands
of pages, would otherwise cost a quadratic number of comparisons). A pair is not verified when its
verification partition already joined its rows (union-find), which leaves the clusters unchanged.

Incremental: a *generation* (a unit in ``_units/dedup-gen``, keyed by the set of sketch units) lists
the edge units that make its graph. A run whose units include a stored generation's units reuses
all its edges and computes only the pairs that involve the new rows, against the stored buckets of
the old units (which are read, never recomputed). The clusters are then those of a cold run; the one
exception is a bucket that grows past ``CLIQUE`` digests, where a pair an earlier run compared (a
true near-duplicate) stays an edge although a cold run would not compare it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from corpus2model.tasks.common.progress import describe
from corpus2model.tasks.stage import FileEntry, StageContext, StageError, Store, Unit, cache_key
from corpus2model.tasks.text.minhash import UnionFind

INDEX_VERSION = "2"  # 2: candidates verified once each, in partitions by pair hash
GEN_STAGE = "dedup-gen"
PART_STAGE = "dedup-part"
VERIFY_STAGE = "dedup-verify"
INDEX_FILES = ("digests.npy", "dsorted.npy", "drows.npy", "bkeys.npy", "brows.npy", "sets.npy", "set_offsets.npy",
               "meta.arrow")
META_SCHEMA = pa.schema([("path", pa.string()), ("line", pa.int64()), ("id", pa.string()), ("tie", pa.string()),
                         ("name", pa.string())])
# Distinct digests of one bucket that are compared with every other member (see the module doc).
CLIQUE = 32
# Peak bytes one index entry (a band key or a digest with its unit and row) costs in a partition:
# the key, unit and row columns, their sort order and the sorted copies, plus numpy temporaries.
# Measured: one partition of the 200 MB anchor corpus (1.4 M entries) grew its process by ~110 MB.
BYTES_PER_ENTRY = 96
MAX_PARTITIONS = 4096
# Below this many index entries one partition takes well under a second: not worth splitting for
# parallelism alone (every partition opens every unit's files).
PARALLEL_ENTRIES = 500_000
# Bytes one candidate pair costs in a verification partition (its pair, two rows' unique shingles)
# and the candidate count below which one verification partition is enough.
VERIFY_BYTES = 8192
PARALLEL_CANDIDATES = 5_000
_SPAN = 1 << 64

# What the progress line calls each kind of dedup unit (tasks/common/progress.py): the phase, in run
# order; their MB are input bytes (a partition or verification unit counts its share of the input).
# Exact dedup has no verification phase.
for _stage, _label in (("dedup", "dedup 1/4 sketch"), ("dedup-jsonl", "dedup 1/4 parse+sketch"),
                       (PART_STAGE, "dedup 2/4 partitions"), (VERIFY_STAGE, "dedup 3/4 verify"),
                       ("dedup-out", "dedup 4/4 write kept"), ("dedup-jsonl-out", "dedup 4/4 write kept")):
    describe(_stage, _label)


# ---------------------------------------------------------------------------------------------
# phase 1: what a sketch unit holds
# ---------------------------------------------------------------------------------------------
def write_index(tmp: Path, digests: np.ndarray, keys: np.ndarray | None, sets: np.ndarray | None,
                set_offsets: np.ndarray | None, meta: pa.Table) -> list[FileEntry]:
    """Write one sketch unit's index files into ``tmp`` and return their entries.

    ``digests`` (n, 2) uint64: the first 16 bytes of each row's exact sha256. ``keys`` (n, bands)
    uint64 band keys, ``sets``/``set_offsets`` the verification shingles (None: exact dedup only).
    The digests and band keys are also stored sorted, so a partition reads its key range with a
    binary search instead of the whole unit."""
    n = len(digests)
    digests = np.ascontiguousarray(digests, dtype=np.uint64).reshape(n, 2)
    order = np.lexsort((digests[:, 1], digests[:, 0])) if n else np.zeros(0, np.int64)
    np.save(tmp / "digests.npy", digests)
    np.save(tmp / "dsorted.npy", digests[order])
    np.save(tmp / "drows.npy", order.astype(np.uint32))
    if keys is None or keys.size == 0:
        bkeys, brows = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        sets, set_offsets = np.zeros(0, np.uint32), np.zeros(n + 1, np.int64)
    else:
        flat = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        border = np.argsort(flat, kind="stable")
        bkeys = flat[border]
        brows = (border // keys.shape[1]).astype(np.uint32)
    np.save(tmp / "bkeys.npy", bkeys)
    np.save(tmp / "brows.npy", brows)
    np.save(tmp / "sets.npy", np.asarray(sets, dtype=np.uint32))
    np.save(tmp / "set_offsets.npy", np.asarray(set_offsets, dtype=np.int64))
    with pa.OSFile(str(tmp / "meta.arrow"), "wb") as sink, pa.ipc.new_file(sink, META_SCHEMA) as w:
        w.write_table(meta.cast(META_SCHEMA))
    return [FileEntry(f, role="index", records=n) for f in INDEX_FILES]


def meta_table(paths, lines, ids, ties=None, names=None) -> pa.Table:
    """META_SCHEMA table; ``paths`` may be one string for every row."""
    n = len(ids)
    if isinstance(paths, str) or paths is None:
        paths = [paths] * n
    cols = [pa.array(paths, pa.string()), pa.array(lines, pa.int64()), pa.array(ids, pa.string()),
            pa.array(ties if ties is not None else [""] * n, pa.string()),
            pa.array(names if names is not None else [None] * n, pa.string())]
    return pa.Table.from_arrays(cols, schema=META_SCHEMA)


def read_meta(unit_dir: Path) -> pa.Table:
    with pa.memory_map(str(Path(unit_dir) / "meta.arrow")) as src:
        return pa.ipc.open_file(src).read_all()


# ---------------------------------------------------------------------------------------------
# exact digests of normalised text, a whole batch at a time
# ---------------------------------------------------------------------------------------------
# str.split() whitespace among ASCII (\t \n \v \f \r, \x1c-\x1f, space) -> space; A-Z -> a-z (casefold of
# ASCII). ASCII text is already NFKC, so translate + collapsing runs of spaces is normalize_for_hash.
_NORM = bytes(c + 32 if 65 <= c <= 90 else (32 if c in (9, 10, 11, 12, 13, 28, 29, 30, 31) else c) for c in range(256))
# str.isspace() code points beyond ASCII (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028/9, U+202F, U+205F,
# U+3000): replaced by a space in casefolded NFKC text before it is encoded, so that text then takes
# the ASCII byte path (UTF-8 continuation and lead bytes are >= 0x80: _NORM leaves them alone).
# A literal (scanning the 1.1 M code points at import cost every process 0.4 s); tests/test_minhash.py
# checks it against str.isspace.
_WIDE_SPACES = tuple("\u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                     "\u2028\u2029\u202f\u205f\u3000")
_LEADING_SPACES = re.compile(rb" *")
_SHA_US = hashlib.sha256(b"\x1f")


def _joined_digests(joined: bytes, n: int) -> list[bytes]:
    """sha256(b"\x1f" + normalize_for_hash(t)) for the ``n`` texts of ``joined`` (their UTF-8 bytes,
    already NFKC + casefolded, wide spaces replaced, each behind a NUL, which none of them holds,
    and a NUL at the end).

    One ``translate`` maps whitespace to spaces; then every space is dropped that is followed by
    another (runs keep their last space) or that ends a text (it precedes a NUL); of a text's
    leading run the last space is dropped too (found by one regex match per text that starts
    with a space, which is rare). One boolean compress gives the collapsed texts one after the
    other, each behind its separator, and each digest is one hash call on a slice. Non-ASCII text
    takes this byte path too (no code-point arrays): about 2x the earlier numpy layout."""
    t = joined.translate(_NORM)
    a = np.frombuffer(t, dtype=np.uint8)
    space = a == 32
    drop = np.zeros(len(a), dtype=bool)
    np.logical_and(space[:-1], space[1:], out=drop[:-1])
    seps = np.flatnonzero(a == 0)
    drop[seps[1:] - 1] |= space[seps[1:] - 1]  # a text's trailing space (one left per run)
    for s in seps[:-1][space[seps[:-1] + 1]].tolist():  # a text's leading run: its last space
        drop[_LEADING_SPACES.match(t, s + 1).end() - 1] = True
    out = a[~drop]
    at = np.flatnonzero(out == 0).tolist()
    mv = memoryview(out)
    copy = _SHA_US.copy
    digests = []
    for i in range(n):
        h = copy()
        h.update(mv[at[i] + 1:at[i + 1]])
        digests.append(h.digest())
    return digests


def _batch_normalized_digests(texts: list[str]) -> list[bytes] | None:
    """sha256(b"\x1f" + normalize_for_hash(t)) for every text, ASCII ones and the others (NFKC and
    casefold per text, in C) each joined into one buffer; None when a text holds a NUL (the
    separator), which the caller then hashes text by text."""
    import unicodedata

    asc = [i for i, t in enumerate(texts) if t.isascii()]
    out: list[bytes | None] = [None] * len(texts)
    if len(asc) == len(texts):
        groups = [(range(len(texts)), texts)]
    else:
        uni = [i for i, t in enumerate(texts) if not t.isascii()]
        groups = [(asc, [texts[i] for i in asc]),
                  (uni, [unicodedata.normalize("NFKC", texts[i]).casefold() for i in uni])]
    for idx, group in groups:
        if not group:
            continue
        joined = "\x00".join(["", *group, ""])
        if joined.count("\x00") != len(group) + 1:
            return None
        if not joined.isascii():
            for ch in _WIDE_SPACES:
                if ch in joined:
                    joined = joined.replace(ch, " ")
        for i, d in zip(idx, _joined_digests(joined.encode("utf-8", "surrogatepass"), len(group))):
            out[i] = d
    return out


def normalized_digests(inputs: list[str] | None, targets: list[str], normalize: bool = True) -> list[bytes]:
    """Per record sha256(norm(input) + US + norm(target)) (``tasks.dedup._digest``), norm =
    ``normalize_for_hash`` when ``normalize``. Records without input go through the batch paths
    (ASCII texts and the others apart); instruction pairs and un-normalised text one by one."""
    from corpus2model.schemas.records import normalize_for_hash

    n = len(targets)
    out: list[bytes | None] = [None] * n
    if normalize:
        docs = [i for i in range(n) if not (inputs and inputs[i])] if inputs else range(n)
        got = _batch_normalized_digests([targets[i] or "" for i in docs])
        for i, d in zip(docs, got or ()):
            out[i] = d
    norm = normalize_for_hash if normalize else (lambda s: s)
    for i in range(n):
        if out[i] is None:
            inp = (inputs[i] if inputs else "") or ""
            h = hashlib.sha256(norm(inp).encode("utf-8") if inp else b"")
            h.update(b"\x1f")
            h.update(norm(targets[i] or "").encode("utf-8"))
            out[i] = h.digest()
    return out


def digest_array(digests: list[bytes]) -> np.ndarray:
    """(n, 2) uint64 from the first 16 bytes of each digest."""
    if not digests:
        return np.zeros((0, 2), np.uint64)
    return np.frombuffer(b"".join(d[:16] for d in digests), dtype=np.uint64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# phase 2: partitions
# ---------------------------------------------------------------------------------------------
def choose_partitions(entries: int, memory_mb: float, workers: int, bytes_per_entry: int = BYTES_PER_ENTRY) -> int:
    """K such that one partition's working set (``bytes_per_entry`` per index entry in its key
    range, or per candidate pair) times the workers running partitions at once fits in ``memory_mb``."""
    budget = memory_mb * (1 << 20) / max(1, workers)
    return int(min(MAX_PARTITIONS, max(1, math.ceil(entries * bytes_per_entry / budget))))


def _bounds(p: int, k: int) -> tuple[int, int | None]:
    lo = p * _SPAN // k
    return lo, (None if p == k - 1 else (p + 1) * _SPAN // k)


def _slice(sorted_col: np.ndarray, lo: int, hi: int | None) -> tuple[int, int]:
    a = int(np.searchsorted(sorted_col, np.uint64(lo), side="left"))
    b = len(sorted_col) if hi is None else int(np.searchsorted(sorted_col, np.uint64(hi), side="left"))
    return a, b


class _NpyRows:
    """Slices of a 1-d .npy file read with ``os.pread``: a verification touches a few rows of many
    units, and a memory map would keep every page it faulted in (and the readahead around it) in
    the process's RSS, up to the whole index on a large corpus."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, self.dtype = read_header(f)
            self.offset = f.tell()
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, (stop - start) * size, self.offset + start * size), dtype=self.dtype)

    def close(self) -> None:
        os.close(self.fd)


class _Sets:
    """Verification shingles of the rows of one partition, read from the units' files, made
    unique once per row."""

    def __init__(self, dirs: list[str]):
        self.dirs, self._sets, self._offs, self._cache = dirs, {}, {}, {}

    def get(self, u: int, r: int) -> np.ndarray:
        key = (u, r)
        s = self._cache.get(key)
        if s is None:
            if u not in self._sets:
                self._sets[u] = _NpyRows(Path(self.dirs[u]) / "sets.npy")
                self._offs[u] = np.load(Path(self.dirs[u]) / "set_offsets.npy")
            off = self._offs[u]
            s = self._cache[key] = _unique(self._sets[u].read(int(off[r]), int(off[r + 1])))
        return s

    def close(self) -> None:
        for f in self._sets.values():
            f.close()
        self._sets.clear()


def _unique(x: np.ndarray) -> np.ndarray:
    """np.unique of a few hundred values by one sort and a mask (np.unique's setup costs more than that)."""
    s = np.sort(x)
    if len(s) > 1:
        keep = np.empty(len(s), dtype=bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        s = s[keep]
    return s


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted unique arrays: the shorter one looked up in the longer by binary search
    (no sort of their concatenation, as np.intersect1d does)."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) > len(b):
        a, b = b, a
    if len(a) == 0:
        return 0.0
    at = np.searchsorted(b, a)
    np.minimum(at, len(b) - 1, out=at)
    inter = int(np.count_nonzero(b[at] == a))
    return inter / (len(a) + len(b) - inter)


def _dup_subset(key: np.ndarray) -> np.ndarray:
    """Indices of the entries whose ``key`` occurs more than once (one sort of the key column;
    only these few go on to the full sort by content order)."""
    order = np.argsort(key)
    ks = key[order]
    dup = np.zeros(len(ks), bool)
    dup[1:] = ks[1:] == ks[:-1]
    multi = dup.copy()
    multi[:-1] |= dup[1:]
    return np.sort(order[multi])


def _gather_digests(dirs: list[str], us: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each entry's (d0, d1) digest words, read per unit from its memory-mapped digests.npy."""
    d0, d1 = np.empty(len(us), np.uint64), np.empty(len(us), np.uint64)
    by_unit = np.argsort(us, kind="stable")
    bounds = np.searchsorted(us[by_unit], np.arange(len(dirs) + 1))
    for u in np.flatnonzero(np.diff(bounds)).tolist():
        sel = by_unit[bounds[u]:bounds[u + 1]]
        got = np.load(Path(dirs[u]) / "digests.npy", mmap_mode="r")[rs[sel]]
        d0[sel], d1[sel] = got[:, 0], got[:, 1]
    return d0, d1


def _read_range(dirs: list[str], keys_file: str, rows_file: str, lo: int, hi: int | None, column0: bool = False):
    """(keys, units, rows) of every unit's sorted entries in [lo, hi), in unit order."""
    ks, us, rs = [], [], []
    for u, d in enumerate(dirs):
        arr = np.load(Path(d) / keys_file, mmap_mode="r")
        col = arr[:, 0] if column0 else arr
        a, b = _slice(col, lo, hi)
        if a == b:
            continue
        ks.append(np.array(col[a:b]))
        rs.append(np.array(np.load(Path(d) / rows_file, mmap_mode="r")[a:b]))
        us.append(np.full(b - a, u, np.uint32))
    if not ks:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    return np.concatenate(ks), np.concatenate(us), np.concatenate(rs)


def _exact_edges(dirs: list[str], new: np.ndarray, lo: int, hi: int | None) -> np.ndarray:
    """(m, 4) uint32 (unit, row, unit, row): every row joined to the first row of its digest group
    (by unit rank, row), only where one of the two is new (old rows are joined by an earlier
    generation's edges)."""
    k0, us, rs = _read_range(dirs, "dsorted.npy", "drows.npy", lo, hi, column0=True)
    sub = _dup_subset(k0)
    us, rs = us[sub], rs[sub]
    d0, d1 = _gather_digests(dirs, us, rs)
    order = np.lexsort((rs, us, d1, d0))
    d0, d1, us, rs = d0[order], d1[order], us[order], rs[order]
    same = np.zeros(len(d0), bool)
    same[1:] = (d0[1:] == d0[:-1]) & (d1[1:] == d1[:-1])
    head = np.maximum.accumulate(np.where(same, 0, np.arange(len(d0))))
    pick = same & (new[us] | new[us[head]])
    return np.stack([us[head][pick], rs[head][pick], us[pick], rs[pick]], axis=1).astype(np.uint32)


def _near_candidates(dirs: list[str], new: np.ndarray, lo: int, hi: int | None, stats: dict) -> np.ndarray:
    """(m, 2) uint64 candidate pairs (unit << 32 | row, smaller code first, unique) of the band keys
    in [lo, hi) that involve a new row; verified later by ``_verify_unit``."""
    ks, us, rs = _read_range(dirs, "bkeys.npy", "brows.npy", lo, hi)
    stats["entries"] += len(ks)
    if len(ks) and not new.all():  # only buckets that hold a new row can hold a new pair
        keep = np.isin(ks, np.unique(ks[new[us]]))
        ks, us, rs = ks[keep], us[keep], rs[keep]
    sub = _dup_subset(ks)  # buckets with >= 2 rows
    ks, us, rs = ks[sub], us[sub], rs[sub]
    if not len(ks):
        return np.zeros((0, 2), np.uint64)
    # members of a bucket in content order (digest, unit rank, row: the same in every run); the
    # rows of one digest are represented by the first of them
    d0, d1 = _gather_digests(dirs, us, rs)
    order = np.lexsort((rs, us, d1, d0, ks))
    ks, us, rs, d0, d1 = ks[order], us[order], rs[order], d0[order], d1[order]
    first = np.ones(len(ks), bool)
    first[1:] = (ks[1:] != ks[:-1]) | (d0[1:] != d0[:-1]) | (d1[1:] != d1[:-1])
    ks, us, rs = ks[first], us[first], rs[first]
    start = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1])))
    size = np.diff(np.append(start, len(ks)))
    stats["buckets"] += int((size > 1).sum())
    stats["largest_bucket"] = max(stats["largest_bucket"], int(size.max(initial=0)))
    # candidate pairs (i < j, i among the first CLIQUE of the bucket), at least one row new
    two = start[size == 2]
    ia, ib = [two], [two + 1]
    for s, m in zip(start[size > 2].tolist(), size[size > 2].tolist()):
        i, j = np.triu_indices(m, 1)
        sel = i < CLIQUE
        ia.append(s + i[sel])
        ib.append(s + j[sel])
    ia, ib = np.concatenate(ia), np.concatenate(ib)
    need = new[us[ia]] | new[us[ib]]
    ia, ib = ia[need], ib[need]
    code = lambda k: (us[k].astype(np.uint64) << np.uint64(32)) | rs[k].astype(np.uint64)  # noqa: E731
    ca, cb = code(ia), code(ib)
    pairs = np.unique(np.stack([np.minimum(ca, cb), np.maximum(ca, cb)], axis=1), axis=0)
    stats["candidates"] += len(pairs)
    return pairs


def _verify(dirs: list[str], pairs: np.ndarray, threshold: float, stats: dict) -> np.ndarray:
    """(m, 4) uint32 (unit, row, unit, row) of the candidate pairs whose exact shingle Jaccard is
    >= threshold; a pair whose rows this call already joined is not compared (same clusters)."""
    if not len(pairs):
        return np.zeros((0, 4), np.uint32)
    nodes, inv = np.unique(pairs, return_inverse=True)
    inv = inv.reshape(-1, 2)
    uf = UnionFind(len(nodes))
    sets = _Sets(dirs)
    nu = (nodes >> np.uint64(32)).astype(np.int64).tolist()
    nr = (nodes & np.uint64(0xFFFFFFFF)).astype(np.int64).tolist()
    out = []
    try:
        for a, b in inv.tolist():
            if uf.find(a) == uf.find(b):
                stats["skipped_joined"] += 1
                continue
            if _jaccard(sets.get(nu[a], nr[a]), sets.get(nu[b], nr[b])) >= threshold:
                uf.union(a, b)
                out.append((nu[a], nr[a], nu[b], nr[b]))
    finally:
        sets.close()
    stats["verified"] += len(out)
    return np.array(out, dtype=np.uint32).reshape(-1, 4)


def _route(pairs: np.ndarray, k: int) -> np.ndarray:
    """The verification partition of each candidate pair: a hash of both rows, so a pair found in
    several band partitions (it shares several bands) is compared once, in one place."""
    h = _mix64(pairs[:, 0] * np.uint64(0x9E3779B97F4A7C15) ^ pairs[:, 1])
    return (h % np.uint64(k)).astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(31))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    return x ^ (x >> np.uint64(29))


def _partition_unit(args) -> dict:
    """Phase 2 for one key range: its exact and verified near edges, stored as a unit."""
    store_root, key, spec = args

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        dirs, new = spec["dirs"], np.array(spec["new"], dtype=bool)
        lo, hi = _bounds(spec["p"], spec["k"])
        stats = {"entries": 0, "buckets": 0, "largest_bucket": 0, "candidates": 0}
        exact = _exact_edges(dirs, new, lo, hi)
        cands = _near_candidates(dirs, new, lo, hi, stats) if spec["near"] else np.zeros((0, 2), np.uint64)
        np.save(tmp / "edges.npy", exact)
        np.save(tmp / "candidates.npy", cands)
        stats.update(exact_edges=len(exact), seconds=round(time.perf_counter() - t0, 3))
        return {"files": [FileEntry("edges.npy", role="index", records=len(exact)),
                          FileEntry("candidates.npy", role="index", records=len(cands))],
                "counters": {"in": 0, "out": 0, "rejected": {}}, "stats": stats, "p": spec["p"], "k": spec["k"]}

    return Store(store_root).unit_write(PART_STAGE, key, write)


def _verify_unit(args) -> dict:
    """Phase 2b for one verification partition: the candidate pairs of every band partition that
    route here (``_route``), unique, verified by exact shingle Jaccard; its near edges as a unit."""
    store_root, key, spec = args

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        mine = []
        for d in spec["partitions"]:
            c = np.load(Path(d) / "candidates.npy")
            if len(c):
                mine.append(c[_route(c, spec["k"]) == spec["q"]])
        pairs = np.unique(np.concatenate(mine), axis=0) if mine else np.zeros((0, 2), np.uint64)
        stats = {"candidates": len(pairs), "skipped_joined": 0, "verified": 0}
        edges = _verify(spec["dirs"], pairs, spec["threshold"], stats)
        np.save(tmp / "edges.npy", edges)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return {"files": [FileEntry("edges.npy", role="index", records=len(edges))],
                "counters": {"in": 0, "out": 0, "rejected": {}}, "stats": stats, "q": spec["q"], "k": spec["k"]}

    return Store(store_root).unit_write(VERIFY_STAGE, key, write)


# ---------------------------------------------------------------------------------------------
# generations: the persisted, incremental graph
# ---------------------------------------------------------------------------------------------
@dataclass
class SketchUnit:
    key: str  # the unit's cache key (stable: content + settings)
    dir: Path
    records: int
    bytes: int = 0  # its input's size: only for progress (MB/s of the partition phases)


@dataclass
class Decisions:
    """What the merge decided, for the units in run order."""

    units: list[SketchUnit]
    removed: pa.Table  # one row per removed record, in input order (see _REMOVED_COLUMNS)
    stats: dict = field(default_factory=dict)

    def keep_mask(self, u: int) -> np.ndarray:
        """Per row of unit ``u``: kept (True) or removed."""
        if not hasattr(self, "_bounds"):
            # removed rows are in input order, so each unit's rows are one contiguous run
            self._units_col = self.removed.column("unit").to_numpy()
            self._rows_col = self.removed.column("row").to_numpy()
            self._bounds = np.searchsorted(self._units_col, np.arange(len(self.units) + 1))
        keep = np.ones(self.units[u].records, dtype=bool)
        keep[self._rows_col[self._bounds[u]:self._bounds[u + 1]]] = False
        return keep


def fan_out(stage: str, items: list[tuple[str, str, tuple, int]], worker, ctx: StageContext, workers: int) -> tuple[dict, dict]:
    """Compute with ``worker`` every (key, label, args, input bytes) whose unit is not in the store
    under ``stage`` yet (``tasks.stage.compute_units``: the Dask cluster the stage runs on, else a
    process pool of ``workers``) and return ({key: unit info}, {"units", "units_computed",
    "units_reused"}). Units finished before a kill are found here and reused."""
    from corpus2model.tasks.stage import compute_units

    store = ctx.store
    infos = {k: store.unit_lookup(stage, k) for k, _, _, _ in items}
    todo = [Unit(key=k, stem=k, label=label, args=args, bytes=nbytes) for k, label, args, nbytes in items if infos[k] is None]
    done = compute_units(stage, todo, worker, ctx, workers)
    for k, info in done.items():
        infos[k] = info
    missing = [k for k, info in infos.items() if info is None]
    if missing:
        raise StageError(f"dedup: {len(missing)} {stage} units were computed but cannot be read back from {store.root}; "
                         f"check the store's disk and rerun")
    return infos, {"units": len(infos), "units_computed": len(done), "units_reused": len(infos) - len(done)}


def _gen_settings(c) -> dict:
    near = c.method == "minhash"
    return {"method": c.method, "normalize": c.normalize, "threshold": c.threshold if near else None,
            "ngram": c.ngram if near else None, "bands": c.bands if near else None, "rows": c.rows if near else None,
            "seed": c.seed if near else None, "clique": CLIQUE}


def _find_base(store: Store, settings_hash: str, keys: set[str]) -> dict | None:
    """The stored generation with the most units, all of them among ``keys`` (ties: smallest key),
    whose edge units are all still in the store; None when there is none."""
    root = store.root / "_units" / GEN_STAGE
    best = None
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            info = json.loads((d / "unit.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("settings") != settings_hash or not set(info.get("units", ())) <= keys:
            continue
        if best is None or len(info["units"]) > len(best["units"]):
            best = {**info, "dir": str(d)}
    if best is None:
        return None
    for _, stage, part in best["edges"]:
        if store.unit_lookup(stage, part) is None:
            return None  # a partition of it was removed from the store: start over
    return best


def build_graph(units: list[SketchUnit], c, ctx: StageContext) -> tuple[dict, dict]:
    """Phase 2 for this run's units: reuse the stored generation of exactly these units, or extend
    the largest stored one, or start a cold one. Returns (generation info, stats)."""
    store = ctx.store
    settings = _gen_settings(c)
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    keys = sorted({u.key for u in units})
    gen_key = cache_key(GEN_STAGE, INDEX_VERSION, settings, keys)
    hit = store.unit_lookup(GEN_STAGE, gen_key)
    if hit is not None and all(store.unit_lookup(st, k) is not None for _, st, k in hit["edges"]):
        return hit, {"generation": "reused", "partitions": 0, "partitions_computed": 0, "partitions_reused": 0,
                     "verify_partitions_computed": 0, "verify_partitions_reused": 0}
    base = _find_base(store, settings_hash, set(keys))
    base_keys = set(base["units"]) if base else set()
    by_key = {u.key: u for u in units}
    dirs = [str(by_key[k].dir) for k in keys]
    new = [k not in base_keys for k in keys]
    rows = {u.key: u.records for u in units}
    bands = c.bands if c.method == "minhash" else 0
    entries = sum(rows[k] * (bands + 1) for k in keys)
    in_bytes = sum(u.bytes for u in units)  # progress: each partition counts its share of the input
    k_parts = choose_partitions(entries, c.memory_mb, c.workers)
    if entries >= PARALLEL_ENTRIES:  # enough work to keep every worker busy: at least one partition each
        k_parts = max(k_parts, c.workers)
    items = []
    for p in range(k_parts):
        pkey = cache_key(PART_STAGE, INDEX_VERSION, {**settings, "k": k_parts, "p": p}, [gen_key, base["key"] if base else ""])
        spec = {"dirs": dirs, "new": new, "p": p, "k": k_parts, "threshold": c.threshold, "near": c.method == "minhash"}
        items.append((pkey, f"partition {p + 1}/{k_parts}", (str(store.root), pkey, spec), in_bytes // k_parts))
    infos, gstats = fan_out(PART_STAGE, items, _partition_unit, ctx, c.workers)
    n_cands = sum(infos[pkey]["stats"]["candidates"] for pkey, _, _, _ in items)
    edges = (base["edges"] if base else []) + [[gen_key, PART_STAGE, pkey] for pkey, _, _, _ in items]
    vst = []
    if c.method == "minhash":
        # a candidate costs its two rows' verification shingles (~4 KB each) while it is compared
        k_verify = choose_partitions(n_cands, c.memory_mb, c.workers, VERIFY_BYTES)
        if n_cands >= PARALLEL_CANDIDATES:
            k_verify = max(k_verify, c.workers)
        parts = [infos[pkey]["dir"] for pkey, _, _, _ in items]
        vitems = []
        for q in range(k_verify):
            vkey = cache_key(VERIFY_STAGE, INDEX_VERSION, {**settings, "k": k_parts, "kv": k_verify, "q": q},
                             [gen_key, base["key"] if base else ""])
            spec = {"dirs": dirs, "partitions": parts, "q": q, "k": k_verify, "threshold": c.threshold}
            vitems.append((vkey, f"verification {q + 1}/{k_verify}", (str(store.root), vkey, spec), in_bytes // k_verify))
        vinfos, vg = fan_out(VERIFY_STAGE, vitems, _verify_unit, ctx, c.workers)
        edges += [[gen_key, VERIFY_STAGE, vkey] for vkey, _, _, _ in vitems]
        vst = [vinfos[vkey].get("stats", {}) for vkey, _, _, _ in vitems]
    else:
        vg = {"units_computed": 0, "units_reused": 0}

    def write(tmp: Path) -> dict:
        return {"files": [], "settings": settings_hash, "units": keys, "edges": edges, "base": base["key"] if base else None}

    gen = store.unit_write(GEN_STAGE, gen_key, write)
    pst = [infos[pkey].get("stats", {}) for pkey, _, _, _ in items]
    stats = {"generation": "incremental" if base else "cold", "base_units": len(base_keys), "new_units": sum(new),
             "partitions": k_parts, "verify_partitions": len(vst),
             "partitions_computed": gstats["units_computed"], "partitions_reused": gstats["units_reused"],
             "verify_partitions_computed": vg["units_computed"], "verify_partitions_reused": vg["units_reused"],
             "index_entries": entries, "candidate_pairs": sum(s.get("candidates", 0) for s in vst),
             "verified_near_pairs": sum(s.get("verified", 0) for s in vst),
             "pairs_skipped_joined": sum(s.get("skipped_joined", 0) for s in vst),
             "largest_bucket": max((s.get("largest_bucket", 0) for s in pst), default=0),
             "seconds_partitions_max": max((s.get("seconds", 0) for s in pst), default=0),
             "seconds_verify_max": max((s.get("seconds", 0) for s in vst), default=0)}
    return gen, stats


def _components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, component label per node) of the graph with edges a-b (global row numbers), by
    min-label hooking and pointer jumping over the nodes that have an edge (memory: the edges)."""
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[:len(a)], inv[len(a):]
    parent = np.arange(len(nodes))
    while True:
        pa_, pb_ = parent[ia], parent[ib]
        m = np.minimum(pa_, pb_)
        if np.array_equal(pa_, pb_):
            break
        np.minimum.at(parent, pa_, m)
        np.minimum.at(parent, pb_, m)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return nodes, parent


_REMOVED_COLUMNS = ("unit", "row", "kind", "path", "line", "id", "name", "kept_unit", "kept_row", "kept_path", "kept_line",
                    "kept_id", "kept_name")


def decide(units: list[SketchUnit], gen: dict, store: Store) -> Decisions:
    """Phase 3: union-find over the generation's edge files; each cluster keeps its smallest
    (source_path, source_line, id, tie) member, every other member is a removed row naming it."""
    t0 = time.perf_counter()
    starts = np.zeros(len(units) + 1, dtype=np.int64)
    np.cumsum([u.records for u in units], out=starts[1:])
    ordinal = {u.key: i for i, u in enumerate(units)}
    unit_lists: dict[str, list[str]] = {}
    ga, gb = [], []
    for gkey, stage, pkey in gen["edges"]:
        if gkey not in unit_lists:
            info = gen if gkey == gen["key"] else store.unit_lookup(GEN_STAGE, gkey)
            if info is None:
                raise StageError(f"dedup: generation {gkey} named by the index is gone from {store.root}; rerun with a fresh store")
            unit_lists[gkey] = info["units"]
        to_ord = np.array([ordinal[k] for k in unit_lists[gkey]], dtype=np.int64)
        part = store.unit_lookup(stage, pkey)
        e = np.load(Path(part["dir"]) / "edges.npy").astype(np.int64)
        if len(e):
            ga.append(starts[to_ord[e[:, 0]]] + e[:, 1])
            gb.append(starts[to_ord[e[:, 2]]] + e[:, 3])
    ga = np.concatenate(ga) if ga else np.zeros(0, np.int64)
    gb = np.concatenate(gb) if gb else np.zeros(0, np.int64)
    nodes, comp = _components(ga, gb)
    # who each clustered row is: meta and digest, read per unit for its clustered rows only
    uo = np.searchsorted(starts, nodes, side="right") - 1
    cols = {k: [] for k in ("path", "line", "id", "tie", "name")}
    d0, d1 = np.empty(len(nodes), np.uint64), np.empty(len(nodes), np.uint64)
    order_parts = []
    for u in np.unique(uo).tolist():
        sel = np.flatnonzero(uo == u)
        rows = nodes[sel] - starts[u]
        meta = read_meta(units[u].dir).take(pa.array(rows))
        for k in cols:
            cols[k].extend(meta.column(k).chunks)
        dg = np.load(units[u].dir / "digests.npy", mmap_mode="r")[rows]
        d0[sel], d1[sel] = dg[:, 0], dg[:, 1]
        order_parts.append(sel)
    sel_order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
    t = pa.table({"node": pa.array(sel_order), **{k: pa.chunked_array(v, META_SCHEMA.field(k).type) if v else pa.array([], META_SCHEMA.field(k).type)
                                                  for k, v in cols.items()}})
    import pyarrow.compute as pc

    t = t.append_column("comp", pa.array(comp[sel_order]))
    rk = pa.table({"comp": t["comp"], "path": pc.fill_null(t["path"], ""), "line": pc.fill_null(t["line"], -1),
                   "id": pc.fill_null(t["id"], ""), "tie": pc.fill_null(t["tie"], "")})
    srt = pc.sort_indices(rk, sort_keys=[("comp", "ascending"), ("path", "ascending"), ("line", "ascending"),
                                         ("id", "ascending"), ("tie", "ascending")]).to_numpy()
    t = t.take(pa.array(srt))
    compv = t["comp"].to_numpy()
    is_rep = np.ones(len(compv), bool)
    is_rep[1:] = compv[1:] != compv[:-1]
    rep_pos = np.maximum.accumulate(np.where(is_rep, np.arange(len(compv)), 0))
    node_s = t["node"].to_numpy()
    mem = ~is_rep
    rm_idx, kp_idx = np.flatnonzero(mem), rep_pos[mem]
    same = (d0[node_s[rm_idx]] == d0[node_s[kp_idx]]) & (d1[node_s[rm_idx]] == d1[node_s[kp_idx]])
    grow = nodes[node_s[rm_idx]]
    krow = nodes[node_s[kp_idx]]
    io = np.argsort(grow, kind="stable")  # input order
    rm_idx, kp_idx, same, grow, krow = rm_idx[io], kp_idx[io], same[io], grow[io], krow[io]
    gu, ku = uo[node_s[rm_idx]], uo[node_s[kp_idx]]
    take = lambda col, idx: t[col].take(pa.array(idx))  # noqa: E731
    removed = pa.table({
        "unit": pa.array(gu, pa.int64()), "row": pa.array(grow - starts[gu], pa.int64()),
        "kind": pa.array(np.where(same, "exact", "near").tolist(), pa.string()),
        "path": take("path", rm_idx), "line": take("line", rm_idx), "id": take("id", rm_idx), "name": take("name", rm_idx),
        "kept_unit": pa.array(ku, pa.int64()), "kept_row": pa.array(krow - starts[ku], pa.int64()),
        "kept_path": take("path", kp_idx), "kept_line": take("line", kp_idx), "kept_id": take("id", kp_idx),
        "kept_name": take("name", kp_idx)})
    sizes = np.bincount(np.unique(comp, return_inverse=True)[1]) if len(comp) else np.zeros(0, np.int64)
    n_exact = int(same.sum())
    stats = {"clusters": int(len(sizes)), "largest_cluster": int(sizes.max()) if len(sizes) else (1 if starts[-1] else 0),
             "exact_duplicates": n_exact, "near_duplicates": int(len(same) - n_exact), "edges": int(len(ga)),
             "seconds_merge": round(time.perf_counter() - t0, 3)}
    return Decisions(units=units, removed=removed, stats=stats)


def run_index(units: list[SketchUnit], c, ctx: StageContext) -> Decisions:
    """Phases 2 and 3 for sketch units in run (input) order."""
    t0 = time.perf_counter()
    # Two inputs with the same bytes share one sketch unit; in the index each occurrence is a unit
    # of its own (its rows are other records), named by the key and its occurrence number.
    seen: dict[str, int] = {}
    named = []
    for u in units:
        n = seen[u.key] = seen.get(u.key, -1) + 1
        named.append(u if n == 0 else SketchUnit(f"{u.key}#{n}", u.dir, u.records, u.bytes))
    units = named
    gen, gstats = build_graph(units, c, ctx)
    t1 = time.perf_counter()
    dec = decide(units, gen, ctx.store)
    dec.stats = {**gstats, **dec.stats, "seconds_partitions": round(t1 - t0, 3)}
    return dec
