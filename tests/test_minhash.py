"""tasks.text.minhash: shingles agree with the benchmark's Jaccard, signatures estimate it, LSH finds
the pairs above the threshold and verification rejects the rest."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from corpus2model.tasks.text import minhash as mh

VOCAB = [f"w{i}" for i in range(3000)]


def _doc(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _edit(text: str, k: int, seed: int) -> str:
    rng = random.Random(seed)
    toks = text.split()
    for _ in range(k):
        toks[rng.randrange(len(toks))] = rng.choice(VOCAB)
    return " ".join(toks)


def _true_jaccard(a: str, b: str, n: int = 5) -> float:
    def sh(t):
        w = re.findall(r"\w+", t.lower())
        return set(zip(*[w[i:] for i in range(n)])) if len(w) >= n else {tuple(w)}

    A, B = sh(a), sh(b)
    return len(A & B) / len(A | B)


def _sets(flat, off):
    return [mh.verification_hashes(flat[off[i]:off[i + 1]]) for i in range(len(off) - 1)]


def test_shingle_jaccard_equals_word_ngram_jaccard():
    base = _doc(1)
    texts = [base, _edit(base, 5, 2), _edit(base, 25, 3), _doc(4), "Short text.", "short   TEXT", ""]
    flat, off = mh.shingle_hashes(texts, 5)
    assert list(np.diff(off)) == [296, 296, 296, 296, 1, 1, 1]
    sets = _sets(flat, off)
    for i in range(4):
        for j in range(4):
            assert mh.jaccard_sets(sets[i], sets[j]) == pytest.approx(_true_jaccard(texts[i], texts[j]), abs=1e-3)
    # short texts: one whole-text shingle, case and punctuation ignored as in the benchmark
    assert mh.jaccard_sets(sets[4], sets[5]) == 1.0
    assert mh.jaccard_sets(sets[4], sets[6]) == 0.0


def test_shingles_do_not_depend_on_batch_neighbours():
    a, b = _doc(10, 50), _doc(11, 3)
    f1, o1 = mh.shingle_hashes([a], 5)
    f2, o2 = mh.shingle_hashes([b, a, b], 5)
    assert np.array_equal(f1, f2[o2[1]:o2[2]])
    # word order matters: a reversed 5-gram is another shingle
    fa, _ = mh.shingle_hashes(["a b c d e"], 5)
    fb, _ = mh.shingle_hashes(["e d c b a"], 5)
    assert fa[0] != fb[0]


def test_signature_agreement_estimates_jaccard():
    p = mh.Params(bands=32, rows=8)  # 256 permutations: tight estimate
    base = _doc(20, 600)
    texts = [base, base.upper(), _edit(base, 20, 21), _doc(22, 600)]
    flat, off = mh.shingle_hashes(texts, 5)
    sig = mh.signatures(flat, off, p)
    assert sig.shape == (4, 256)
    assert np.array_equal(sig[0], sig[1])  # casefolded words: the same document
    est = float(np.mean(sig[0] == sig[2]))
    assert est == pytest.approx(_true_jaccard(texts[0], texts[2]), abs=0.08)
    assert np.mean(sig[0] == sig[3]) < 0.05
    # chunking on document boundaries gives the same signatures as one chunk
    assert np.array_equal(mh.signatures(flat, off, p, chunk=64), sig)


def test_candidate_pairs_groups_equal_keys_per_band():
    keys = np.array([[1, 7], [2, 7], [1, 8], [3, 9], [4, 9], [5, 10]], dtype=np.uint64)
    pairs = mh.candidate_pairs(keys)
    assert pairs.tolist() == [[0, 1], [0, 2], [3, 4]]
    assert mh.candidate_pairs(np.zeros((0, 3), np.uint64)).shape == (0, 2)


def test_near_duplicate_pairs_threshold_is_exact_jaccard():
    base = _doc(30, 400)
    texts = [base, _edit(base, 4, 31), _edit(base, 60, 32), _doc(33, 400)]
    p = mh.Params()
    sk = mh.sketch(texts, p, batch_docs=2)
    so, sets = sk["set_offsets"], sk["sets"]
    pairs, n_cand = mh.near_duplicate_pairs(sk["keys"], lambda i: sets[so[i]:so[i + 1]], 0.8)
    js = {(i, j): _true_jaccard(texts[i], texts[j]) for i, j, _ in pairs}
    assert set(js) == {(0, 1)}
    assert js[(0, 1)] >= 0.8 > _true_jaccard(texts[0], texts[2])
    assert n_cand >= 1


def test_union_find_joins_transitively_to_smallest_root():
    uf = mh.UnionFind(6)
    uf.union(4, 2)
    uf.union(2, 5)
    uf.union(0, 1)
    assert uf.roots().tolist() == [0, 0, 2, 3, 2, 2]


def test_recall_on_planted_pairs_above_threshold():
    """50 pairs at J ~ 0.80-0.95 among 100 unrelated docs: all found, none invented."""
    texts, truth = [], set()
    for k in range(50):
        base = _doc(1000 + k, 300)
        texts.append(base)
        texts.append(_edit(base, random.Random(k).randint(2, 5), 2000 + k))
        truth.add((2 * k, 2 * k + 1))
    texts += [_doc(5000 + k, 300) for k in range(100)]
    sk = mh.sketch(texts, mh.Params())
    so, sets = sk["set_offsets"], sk["sets"]
    pairs, _ = mh.near_duplicate_pairs(sk["keys"], lambda i: sets[so[i]:so[i + 1]], 0.8)
    found = {(i, j) for i, j, _ in pairs}
    above = {t for t in truth if _true_jaccard(texts[t[0]], texts[t[1]]) >= 0.8}
    assert len(above) >= 45
    assert above <= found
    assert found <= truth


def test_non_ascii_words_are_the_regex_words():
    """The code-point table path of _doc_bytes gives re.findall(r"\\w+", text.lower())'s words."""
    rng = random.Random(3)
    alphabet = "abcXYZ _-–—'’ßİıÅéñ中文字🙂١٢٣\u0301\u00a0\t\n½Ⅻﬁ"
    for _ in range(500):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert mh._doc_bytes(t).split() == [w.encode() for w in re.findall(r"\w+", t.lower())]


def _reference_word_hash(word: bytes) -> int:
    """The word hash by its definition, one word at a time: polynomial in P over the UTF-8 bytes
    plus the length times a constant, mod 2**64, then splitmix64 (what the stored indexes hold)."""
    v = sum(b * pow(mh._P, j, 1 << 64) for j, b in enumerate(word)) + len(word) * 0xC2B2AE3D27D4EB4F
    return int(mh._mix64(np.array([v & mh._M64], dtype=np.uint64))[0])


def test_batched_word_hashes_are_the_per_word_definition():
    """word_hashes (whole-batch numpy: joined bytes, prefix sums, non-ASCII texts classified together)
    gives every regex word's defined hash, in order, and the right count per text: ASCII, non-ASCII,
    empty and word-less texts, words at the very start and end of the batch."""
    rng = random.Random(11)
    alphabet = "abcXYZ _-–'’ßİıé中🙂١\u0301\u00a0\t\n½ﬁ09"
    for _ in range(300):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(1, 5))]
        wh, counts = mh.word_hashes(texts)
        words = [[w.encode("utf-8") for w in re.findall(r"\w+", t.lower())] for t in texts]
        assert counts.tolist() == [len(w) for w in words]
        assert wh.tolist() == [_reference_word_hash(w) for ws in words for w in ws]


def test_normalised_digests_batch_edge_cases():
    """The batch digest path (texts joined by NUL, whitespace runs dropped by one mask) against
    normalize_for_hash text by text: NUL inside a text (the batch falls back), texts that are only
    whitespace, leading and trailing runs of every kind of whitespace, one text or many."""
    import hashlib

    from corpus2model.schemas.records import normalize_for_hash
    from corpus2model.tasks.text.dedup_index import _WIDE_SPACES, normalized_digests

    assert "".join(_WIDE_SPACES) == "".join(chr(c) for c in range(0x80, 0x110000) if chr(c).isspace())
    rng = random.Random(12)
    alphabet = "aB .\t\n\x0b\x0c\r\x1c\x1f\x00 \u00a0\u2028\u0085\u1680\u3000ßİﬁ中"
    for _ in range(1500):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) for _ in range(rng.randint(1, 6))]
        want = [hashlib.sha256(b"\x1f" + normalize_for_hash(t).encode("utf-8")).digest() for t in texts]
        assert normalized_digests(None, texts) == want, texts
