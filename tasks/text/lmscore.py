"""LM-score filter: document perplexity under a small word-trigram language model.

The model is interpolated Kneser-Ney (one absolute discount, D = 0.75) over lowercased word
tokens, trained on reference text bundled with the project (data/reference/*.txt: NTREX-128's
English news and WordNet 3.0's example sentences; see data/reference/SOURCE.md). Words seen once in the reference are mapped to ``<unk>`` so the
model has learned how likely an unknown word is; numbers become ``<num>``. Each line is a
sentence (``<s> <s> ... </s>``). An unknown word costs P(<unk> | context) times the probability of
its spelling under a character unigram model of the reference (with an end-of-word symbol): without
it, text made only of unknown words (lorem ipsum, another language, a hash soup) would score
*better* than news prose, since ``<unk>`` is one of the most frequent tokens.

``load_model(ref_dir)`` trains once per reference text and caches the model as a pickle named by
the texts' sha256 (``.cache/lm/<sha>.pkl`` in the project), so editing the reference retrains and a
stale model is never read. ``perplexity(model, text)`` is the per-token perplexity;
``lm_filter(text, cfg, lang)`` drops English documents above ``cfg.lm_max_perplexity`` (reason
``lm_perplexity``, score = the perplexity). Pure dict lookups: ~1 us per token.

A filter in the style of CCNet's perplexity bucketing (Wenzek et al. 2020), with a trigram
instead of a 5-gram and a small reference so it ships inside the repository.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from corpus2model.tasks.common.resources import cache_dir, data_path

REFERENCE = data_path("reference")
CACHE_DIR = cache_dir("lm")
DISCOUNT = 0.75
MODEL_VERSION = 2  # bump when the model's construction changes (part of the cache file name)

_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+(?:[.,]\d+)*|[^\w\s]")
BOS, EOS, UNK, NUM = "<s>", "</s>", "<unk>", "<num>"


def tokenize(line: str) -> list[str]:
    """Lowercased words, numbers as ``<num>``, each punctuation mark a token."""
    return [NUM if t[0].isdigit() else t for t in _TOKEN.findall(line.lower())]


def _sentences(text: str):
    for line in text.split("\n"):
        toks = tokenize(line)
        if toks:
            yield toks


def train(text: str) -> dict:
    """Interpolated Kneser-Ney trigram statistics from ``text`` (one sentence a line)."""
    counts = Counter(t for s in _sentences(text) for t in s)
    vocab = {w for w, c in counts.items() if c > 1} | {BOS, EOS, NUM}
    tri: Counter = Counter()
    for s in _sentences(text):
        s = [BOS, BOS] + [w if w in vocab else UNK for w in s] + [EOS]
        tri.update(zip(s, s[1:], s[2:]))
    vocab.add(UNK)
    # Highest order: raw counts. Lower orders: continuation counts (distinct left contexts).
    c_uv: Counter = Counter()  # c(u v .)
    n_uv: Counter = Counter()  # N1+(u v .)
    bi_cont: Counter = Counter()  # N1+(. v w)
    for (u, v, w), c in tri.items():
        c_uv[(u, v)] += c
        n_uv[(u, v)] += 1
        bi_cont[(v, w)] += 1
    c_v: Counter = Counter()  # sum_w N1+(. v w)
    n_v: Counter = Counter()  # N1+(v .) among continuation bigrams
    uni_cont: Counter = Counter()  # N1+(. w)
    for (v, w), c in bi_cont.items():
        c_v[v] += c
        n_v[v] += 1
        uni_cont[w] += 1
    total_cont = sum(uni_cont.values())
    targets = vocab - {BOS}  # what can be predicted: never the start symbol
    # Unigram continuation probability, interpolated with uniform so every word is > 0.
    p_uni = {w: (max(uni_cont.get(w, 0) - DISCOUNT, 0) + DISCOUNT * len(uni_cont) / len(targets)) / total_cont for w in targets}
    p_bi = {}
    for (v, w), c in bi_cont.items():
        p_bi[(v, w)] = (c - DISCOUNT) / c_v[v]
    backoff_bi = {v: DISCOUNT * n_v[v] / c_v[v] for v in c_v}
    p_tri = {k: (c - DISCOUNT) / c_uv[k[:2]] for k, c in tri.items()}
    backoff_tri = {k: DISCOUNT * n_uv[k] / c for k, c in c_uv.items()}
    chars = Counter()
    for w, c in counts.items():
        if w not in vocab:  # spell the words that became <unk>: what unknown words look like
            chars.update({ch: c for ch in w})
            chars[""] += c  # end of word
    n_chars = sum(chars.values())
    # Add-one over the seen characters plus one slot for any character never seen.
    log_char = {ch: math.log((c + 1) / (n_chars + len(chars) + 1)) for ch, c in chars.items()}
    log_char_unseen = math.log(1 / (n_chars + len(chars) + 1))
    return {"vocab": vocab, "p_uni": p_uni, "log_char": log_char, "log_char_unseen": log_char_unseen, "p_bi": p_bi, "backoff_bi": backoff_bi,
            "p_tri": p_tri, "backoff_tri": backoff_tri, "version": MODEL_VERSION}


def _prob(model: dict, u: str, v: str, w: str) -> float:
    p = model["p_uni"][w]
    b = model["backoff_bi"].get(v)
    if b is not None:
        p = model["p_bi"].get((v, w), 0.0) + b * p
    b = model["backoff_tri"].get((u, v))
    if b is not None:
        p = model["p_tri"].get((u, v, w), 0.0) + b * p
    return p


def _spelling_logp(model: dict, word: str) -> float:
    log_char, unseen = model["log_char"], model["log_char_unseen"]
    return sum(log_char.get(ch, unseen) for ch in word) + log_char.get("", unseen)


def perplexity(model: dict, text: str) -> float | None:
    """Per-token perplexity of ``text`` (every line a sentence, ``</s>`` counted); None for text
    without tokens."""
    vocab = model["vocab"]
    logp, n = 0.0, 0
    for words in _sentences(text):
        s = [BOS, BOS] + [w if w in vocab else UNK for w in words] + [EOS]
        for u, v, w in zip(s, s[1:], s[2:]):
            logp += math.log(_prob(model, u, v, w))
            n += 1
        for w in words:
            if w not in vocab:
                logp += _spelling_logp(model, w)
    return math.exp(-logp / n) if n else None


def _reference_text(ref: Path) -> str:
    files = sorted(ref.glob("*.txt")) if ref.is_dir() else [ref]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"LM reference text {ref} is missing: restore data/reference/ or set clean.lm_max_perplexity: null")
    # A blank line between files so no trigram spans two of them.
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


@lru_cache(maxsize=4)
def load_model(ref: Path = REFERENCE, cache_dir: Path = CACHE_DIR) -> dict:
    """The model for the reference text ``ref`` (a folder of ``*.txt`` or one file): from
    ``cache_dir/<sha256 of the text>-v<version>.pkl`` when there, else trained and written there
    (atomically: a pool of workers may race to write it)."""
    text = _reference_text(Path(ref))
    cached = Path(cache_dir) / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}-v{MODEL_VERSION}.pkl"
    if cached.is_file():
        try:
            with cached.open("rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # a damaged cache file is rebuilt below
    model = train(text)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only checkout still scores, it just retrains next time
    return model


def lm_filter(text: str, cfg, lang: str | None = None) -> tuple[bool, str | None, float | None]:
    """Drop an English document whose perplexity exceeds ``cfg.lm_max_perplexity`` (None: off;
    other languages are not judged by an English model). Returns (keep, reason, perplexity)."""
    limit = cfg.lm_max_perplexity
    if limit is None or lang != "en":
        return True, None, None
    ppl = perplexity(load_model(), text)
    if ppl is None:
        return True, None, None
    ppl = round(ppl, 2)
    return (False, "lm_perplexity", ppl) if ppl > limit else (True, None, ppl)
