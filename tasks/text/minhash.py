"""Near-duplicate detection: word n-gram shingles, MinHash signatures, LSH banding, exact-Jaccard
verification, union-find clusters. Pure numpy, vectorised over a batch of documents.

Shingles follow the benchmark's ground truth (``re.findall(r"\\w+", text.lower())``, sets of word
5-grams), so "Jaccard" here means the same number the corpus generator planted.

* Words are hashed from the bytes of the whole batch with numpy (``word_hashes``); an n-gram's
  hash is a mixed linear combination of its word hashes, computed for a whole batch at once.
* A signature has ``bands * rows`` bins filled by one-permutation hashing: each shingle hash is
  mixed once, its high bits pick a bin, the bin keeps the minimum of the low bits, empty bins are
  densified (``signatures``). One hash per shingle instead of one per shingle and permutation.
* LSH: each band's rows are folded into one uint64 key; documents sharing a key in any band are
  candidates. Grouping is a sort per band, not a Python dict, so it scales to millions of docs.
* Candidates are verified with the *exact* Jaccard of their shingle-hash sets (sorted uint32
  arrays kept per unit on disk and memory-mapped), so LSH only decides what is compared and the
  threshold is a real Jaccard threshold. Many narrow bands (default 18 x 5) push the miss
  probability at J = 0.8 below 1e-3, and verification removes the extra candidates that buys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

WORD_RE = re.compile(r"\w+")
_M64 = (1 << 64) - 1

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (in place on a fresh array): spreads every input bit over the output."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# Odd constants for the n-gram combination (position matters: "a b" != "b a").
_POS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63,
                 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3,
                 0x1D8E4E27C47D124F], dtype=np.uint64)


def doc_words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


# ASCII fast path of doc_words: ``\w`` on ASCII is [A-Za-z0-9_], so lower-casing A-Z and turning
# every other byte into a space gives the regex's words, space-separated, at C speed.
_WORD_BYTES = bytes((c + 32 if 65 <= c <= 90 else c) if (chr(c).isalnum() or c == 95) and c < 128 else 32
                    for c in range(256))
# Words hash as a polynomial in an odd P modulo 2**64 over their bytes, read off prefix sums of the
# whole batch: S[i] = sum_{j<i} b_j P^j, so word [s, e) is (S[e] - S[s]) * P^-s (P is invertible).
_P = 0x9E3779B97F4A7C15
_PINV = pow(_P, -1, 1 << 64)
_POWERS: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^j and P^-j for j < n (grown by doubling and kept per process)."""
    if len(_POWERS.get("p", ())) < n:
        m = max(n, 2 * len(_POWERS.get("p", ())), 1 << 16)
        for name, base in (("p", _P), ("i", _PINV)):
            a = np.full(m, base, dtype=np.uint64)
            a[0] = 1
            _POWERS[name] = np.cumprod(a, out=a)
    return _POWERS["p"], _POWERS["i"]


class CodepointClass:
    """A boolean property of code points (``predicate(chr) -> bool``) looked up for whole numpy arrays.
    The Basic Multilingual Plane's table is filled on first use (65,536 Python calls, ~10 ms once per
    process), the rest lazily per page of 256 code points the first time a text uses one (a whole
    table is 1.1 M Python calls): a lookup is then one gather, plus one max for the astral check."""

    def __init__(self, predicate):
        self.predicate = predicate
        self.table = np.zeros(0x110000, dtype=bool)
        self.filled = np.zeros(0x110000 >> 8, dtype=bool)

    def _fill(self, pages) -> None:
        for pg in pages:
            base = pg << 8
            self.table[base:base + 256] = [self.predicate(chr(c)) for c in range(base, base + 256)]
            self.filled[pg] = True

    def __call__(self, cps: np.ndarray) -> np.ndarray:
        if not self.filled[0]:
            self._fill(range(0x100))
        if len(cps) and cps.max() > 0xFFFF:
            pages = np.unique(cps[cps > 0xFFFF] >> 8)
            self._fill(pages[~self.filled[pages]].tolist())
        return self.table[cps]


# A regex word character (``\w`` on str: str.isalnum() or "_").
_word_codepoints = CodepointClass(lambda ch: ch.isalnum() or ch == "_")


def _doc_bytes(text: str) -> bytes:
    """The words of ``doc_words`` as UTF-8, separated by spaces (runs of spaces allowed)."""
    return _docs_bytes([text])[0]


def _docs_bytes(texts: list[str]) -> list[bytes]:
    """``_doc_bytes`` of every text. ASCII: lower-case A-Z, every other byte a space (one translate).
    The others all at once: lower-cased per text, their code points classified with one table
    lookup for the whole batch and every non-word character made a space (text by text, the fixed
    cost of the numpy calls made this twice as slow on the anchor corpus)."""
    docs = [t.encode("ascii").translate(_WORD_BYTES) if t.isascii() else None for t in texts]
    uni = [i for i, d in enumerate(docs) if d is None]
    if uni:
        low = [texts[i].lower() for i in uni]
        cps = np.frombuffer("".join(low).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        cps = np.where(_word_codepoints(cps), cps, np.uint32(32))
        spaced = cps.tobytes().decode("utf-32-le", "surrogatepass")
        pos = 0
        for i, lt in zip(uni, low):  # lower() keeps a text's code points apart from its neighbours'
            docs[i] = spaced[pos:pos + len(lt)].encode("utf-8", "surrogatepass")
            pos += len(lt)
    return docs


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word of every text, in order; words per text), vectorised over the
    bytes of the whole batch (a few numpy passes, no Python object per word): the polynomial
    hash of the word's UTF-8 bytes plus its length, mixed."""
    docs = _docs_bytes(texts)
    docs.append(b"")
    buf = np.frombuffer(b" ".join(docs), dtype=np.uint8)  # every doc followed by a space
    word = buf != 32
    # word edges alternate start, end (buf ends with a space, so every word ends inside it)
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1
    if len(buf) and word[0]:
        edges = np.concatenate(([0], edges))
    ws, we = edges[0::2], edges[1::2]
    if not len(ws):
        return np.zeros(0, np.uint64), np.zeros(len(texts), np.int64)
    pw, pinv = _powers(len(buf))
    prefix = np.empty(len(buf) + 1, dtype=np.uint64)
    prefix[0] = 0
    prefix[1:] = buf  # cast, then a same-type in-place product: a mixed-type multiply is 1.5x slower
    prefix[1:] *= pw[:len(buf)]
    np.cumsum(prefix[1:], out=prefix[1:])
    wh = prefix[we]
    wh -= prefix[ws]
    wh *= pinv[ws]
    wh += (we - ws).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    doc_start = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(np.fromiter(map(len, docs[:-2]), dtype=np.int64, count=max(len(texts) - 1, 0)) + 1, out=doc_start[1:])
    # words never straddle two docs (a space separates them): each doc's first word by one search per doc
    first = np.searchsorted(ws, doc_start)
    return _mix64(wh), np.diff(np.append(first, len(ws))).astype(np.int64)


def shingle_hashes(texts: list[str], ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 shingle hashes, offsets of length len(texts)+1) for a batch of texts.

    A text with fewer than ``ngram`` words has one shingle (all its words), an empty text one
    shingle of nothing, so every document has a signature and two empty texts match each other.
    Duplicate shingles inside a document are kept: the min and the set Jaccard ignore them."""
    if ngram > len(_POS):
        raise ValueError(f"ngram must be <= {len(_POS)}")
    wh, lens = word_hashes(texts)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    total = len(wh)
    # combo[j] = sum_k POS[k] * w[j+k] over the concatenation (pad with zeros at the end)
    padded = np.concatenate([wh, np.zeros(ngram, dtype=np.uint64)])
    combo = np.zeros(total, dtype=np.uint64)
    for k in range(ngram):
        combo += padded[k:k + total] * _POS[k]
    # A document of n >= ngram words owns the n-gram starts [start, start + n - ngram]; a shorter
    # one owns exactly its first position, whose combo must only see its own words.
    n_sh = np.where(lens >= ngram, lens - ngram + 1, 1)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(n_sh, out=offsets[1:])
    idx = np.repeat(starts[:-1] - offsets[:-1], n_sh) + np.arange(offsets[-1], dtype=np.int64)
    short = np.flatnonzero(lens < ngram)
    out = combo[np.minimum(idx, max(total - 1, 0))] if total else np.zeros(offsets[-1], dtype=np.uint64)
    for d in short:  # rare: a few per corpus
        s, n = int(starts[d]), int(lens[d])
        v = sum(int(wh[s + k]) * int(_POS[k]) for k in range(n)) + len(_POS) - 1 - n  # the length keeps "a" != "a a"
        out[offsets[d]] = np.uint64(v & _M64)
    return _mix64(out), offsets


@dataclass(frozen=True)
class Params:
    ngram: int = 5
    bands: int = 18
    rows: int = 5
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def signatures(flat: np.ndarray, offsets: np.ndarray, params: Params, chunk: int = 1 << 20) -> np.ndarray:
    """(n_docs, num_perm) uint64 MinHash signatures by one-permutation hashing with optimal
    densification (Li, Owen & Zhang 2012; Shrivastava 2017); every document has >= 1 shingle.

    Each shingle hash is re-mixed once with the seed; its high 32 bits pick one of ``num_perm``
    bins and its low 32 bits are the value; a bin keeps its minimum (``np.minimum.at``). That is
    one hash per shingle instead of ``num_perm`` multiply-adds, and two documents agree on a bin
    with probability = their Jaccard, as with k independent permutations. An empty bin (a
    document with fewer shingles than bins) borrows the value of a non-empty bin picked by a
    document-independent hash of (bin, attempt), so two documents with equal sets still agree
    everywhere and the per-bin collision probability stays the Jaccard."""
    k = params.num_perm
    n = len(offsets) - 1
    empty = np.uint64(_M64)
    sig = np.full((n, k), empty, dtype=np.uint64)
    if n == 0:
        return sig
    seed = np.uint64((params.seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64)
    flat_sig = sig.reshape(-1)
    d0 = 0
    while d0 < n:  # doc-aligned chunks bound the temporaries (three arrays of the chunk's size)
        d1 = int(np.searchsorted(offsets, offsets[d0] + chunk, side="right")) - 1
        d1 = min(max(d1, d0 + 1), n)
        h = _mix64(flat[offsets[d0]:offsets[d1]] ^ seed)
        doc = np.repeat(np.arange(d0, d1, dtype=np.uint64), np.diff(offsets[d0:d1 + 1]).astype(np.int64))
        slot = doc * np.uint64(k) + (((h >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32))
        np.minimum.at(flat_sig, slot.astype(np.int64), h & np.uint64(0xFFFFFFFF))
        d0 = d1
    _densify(sig, params.seed)
    return sig


def _densify(sig: np.ndarray, seed: int, attempts: int = 64) -> None:
    """Fill empty bins in place (optimal densification): bin j of a document takes the value of
    bin ``g(j, t) mod k`` for the first attempt t whose bin is non-empty in the *original*
    sketch. After ``attempts`` misses (a document with very few shingles) the first non-empty bin
    at or after j (circularly) is used; every choice depends only on the bin pattern."""
    n, k = sig.shape
    empty = np.uint64(_M64)
    orig_empty = sig == empty
    rows, cols = np.nonzero(orig_empty)
    if not len(rows):
        return
    src = sig.copy()
    pending = np.ones(len(rows), dtype=bool)
    base = np.uint64((seed * 0xD6E8FEB86659FD93) & _M64)
    for t in range(1, attempts + 1):
        idx = np.flatnonzero(pending)
        if not len(idx):
            return
        g = cols[idx].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64((t * 0xC2B2AE3D27D4EB4F) & _M64) + base
        donor = (((_mix64(g) >> np.uint64(32)) * np.uint64(k)) >> np.uint64(32)).astype(np.int64)
        ok = ~orig_empty[rows[idx], donor]
        hit = idx[ok]
        sig[rows[hit], cols[hit]] = src[rows[hit], donor[ok]]
        pending[hit] = False
    for p in np.flatnonzero(pending).tolist():  # rare: nearly empty documents
        r, c = int(rows[p]), int(cols[p])
        for step in range(1, k):
            c2 = (c + step) % k
            if not orig_empty[r, c2]:
                sig[r, c] = src[r, c2]
                break


def band_keys(sig: np.ndarray, params: Params) -> np.ndarray:
    """(n_docs, bands) uint64: the rows of each band folded into one mixed key (band index included)."""
    n = sig.shape[0]
    keys = np.empty((n, params.bands), dtype=np.uint64)
    for bi in range(params.bands):
        block = sig[:, bi * params.rows:(bi + 1) * params.rows]
        acc = np.full(n, ((bi + 1) * 0x9E3779B97F4A7C15) & _M64, dtype=np.uint64)
        for r in range(params.rows):
            acc = _mix64(acc ^ block[:, r])
        keys[:, bi] = acc
    return keys


def verification_hashes(flat: np.ndarray) -> np.ndarray:
    """The low 32 bits of each shingle hash: what candidate pairs are verified against. Stored
    unsorted (sorting every document costs more than the whole signature); only the few
    candidates are made unique and compared (``jaccard_sets``)."""
    return (flat & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def jaccard_sets(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of the sets of two hash arrays (duplicates and order ignored)."""
    a, b = np.unique(a), np.unique(b)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (len(a) + len(b) - inter)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(m, 2) int64 unique pairs (i < j) of rows sharing a key in some band: every member of a
    bucket is paired with the bucket's first (smallest index) member (a star: the union-find
    joins the bucket whatever the order)."""
    n, bands = keys.shape
    pairs = []
    for bi in range(bands):
        col = keys[:, bi]
        order = np.argsort(col, kind="stable")
        s = col[order]
        same = np.flatnonzero(s[1:] == s[:-1]) + 1  # positions equal to their predecessor
        if not len(same):
            continue
        # the head of each run: the first position of the run the element belongs to
        is_head = np.ones(n, dtype=bool)
        is_head[same] = False
        head_pos = np.maximum.accumulate(np.where(is_head, np.arange(n), 0))
        pairs.append(np.stack([order[head_pos[same]], order[same]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(pairs)
    p = np.sort(p, axis=1)
    return np.unique(p, axis=0)


class UnionFind:
    """Union-find over dense ids 0..n-1 with path compression; a union keeps the smaller root, so
    every element's root is the smallest id of its set. One class for near_duplicate_pairs' callers
    and dedup_index's verification partitions. The parents are a Python list: find/union run one
    element at a time from Python, where a list index is ~1.5x faster than a numpy scalar index."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> bool:
        """Join the sets of a and b; False when they were one set already."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True

    def roots(self) -> np.ndarray:
        """Every element's root, by pointer jumping over the whole array (no Python loop)."""
        r = np.array(self.parent, dtype=np.int64)
        while True:
            nxt = r[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt


def sketch(texts: list[str], params: Params, batch_docs: int = 512) -> dict[str, np.ndarray]:
    """Everything the index keeps per document, for a list of texts, in batches (bounded memory):
    ``keys`` (n, bands) uint64, ``sets`` / ``set_offsets`` (verification shingles)."""
    keys, sets, lens = [], [], []
    for i in range(0, len(texts), batch_docs):
        flat, off = shingle_hashes(texts[i:i + batch_docs], params.ngram)
        keys.append(band_keys(signatures(flat, off, params), params))
        sets.append(verification_hashes(flat))
        lens.append(np.diff(off))
    n_len = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
    set_offsets = np.zeros(len(n_len) + 1, dtype=np.int64)
    np.cumsum(n_len, out=set_offsets[1:])
    return {
        "keys": np.concatenate(keys) if keys else np.zeros((0, params.bands), dtype=np.uint64),
        "sets": np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint32),
        "set_offsets": set_offsets,
    }


def near_duplicate_pairs(keys: np.ndarray, get_set, threshold: float, skip=None) -> tuple[list[tuple[int, int, float]], int]:
    """Verified pairs (i, j, J) with exact shingle Jaccard >= threshold, and the candidate count.
    ``get_set(i)`` returns document i's verification hashes; ``skip(i, j)`` drops a pair before
    verification (e.g. already in one exact cluster)."""
    cand = candidate_pairs(keys)
    out = []
    for i, j in cand.tolist():
        if skip is not None and skip(i, j):
            continue
        jac = jaccard_sets(get_set(i), get_set(j))
        if jac >= threshold:
            out.append((i, j, jac))
    return out, len(cand)
