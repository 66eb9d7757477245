"""Document quality filters for the clean stage (datatrove's filter shape).

Every filter is a pure function ``fn(text, cfg, lang) -> (keep, reason, score)``: ``keep`` is the
decision, ``reason`` names the rule that dropped the document (None when kept) and ``score`` is
the measured value the rule compared with its threshold (kept for quarantine rows and tuning).
``cfg`` is the clean section (schemas.config.CleanConfig); the thresholds are the Gopher paper's
(Rae et al. 2021, appendix A) and C4's (Raffel et al. 2020), as datatrove sets them.

The rules are datatrove 0.10's GopherRepetitionFilter, GopherQualityFilter and C4QualityFilter,
re-implemented to make the same decision at a fraction of the cost (bench/quality_bench.py
measures both: speed and per-document agreement):

- ``words``: spaCy's English tokenizer (prefix/suffix/infix rules, special cases, the special-case
  matcher) replayed in Python over whitespace chunks with a per-process chunk cache, so a word
  seen before costs one dict lookup; the token list equals ``spacy.blank("en")``'s (whitespace
  tokens dropped, as datatrove does). spaCy itself is imported only once per spaCy version, to
  extract its rules into ``.cache/spacy/`` (importing it costs seconds: thinc, torch).
- ``gopher_repetition``: duplicate paragraphs/lines by count and by characters (over the whole
  text's length), the character share of the most common 2/3/4-gram, and the share of
  characters in repeated 5..10-grams.
- ``gopher_quality``: word count, mean word length, hash and ellipsis/word ratios, bullet and
  ellipsis lines, alphabetic words, English stop words (only when the document is English).
- ``c4_quality``: C4's line rules (terminal punctuation, >= 3 words, no "javascript", no policy
  phrases, citations removed) then lorem ipsum, curly bracket and >= ``cfg.c4_min_sentences``
  sentences over the kept lines (skipped for languages written without spaces). Sentences are
  counted (spaCy's sentencizer rule, replayed on ``words``) only when fewer than that many lines
  are kept: every kept line holds at least one sentence, so with enough lines the answer is
  known without counting.
- ``language_filter``: py3langid (langid.py's bundled model, offline) against
  ``cfg.allowed_languages``.
- ``strip_gutenberg``: a transform, not a filter: removes the Project Gutenberg header and
  licence footer so only the book text stays.

Where we differ from datatrove, on purpose: the stop-word rule runs only on English documents
(datatrove applies English stop words to whatever it is given), and languages written without
spaces skip the word rules (every Chinese article would be "one word").
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

from corpus2model.tasks.common.resources import cache_dir

Decision = tuple[bool, str | None, float | None]
KEEP: Decision = (True, None, None)

# Gopher quality thresholds (Rae et al. 2021, A.1.1).
MIN_WORDS, MAX_WORDS = 50, 100_000
MIN_MEAN_WORD_LEN, MAX_MEAN_WORD_LEN = 3.0, 10.0
MAX_SYMBOL_WORD_RATIO = 0.1
MAX_BULLET_LINES = 0.9
MAX_ELLIPSIS_LINES = 0.3
MIN_ALPHA_WORDS = 0.8
MIN_STOP_WORDS = 2
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
# Gopher repetition thresholds (A.1.2).
MAX_DUP_LINE_FRAC = 0.3
MAX_DUP_PARA_FRAC = 0.3
MAX_DUP_LINE_CHAR_FRAC = 0.2
MAX_DUP_PARA_CHAR_FRAC = 0.2
MAX_TOP_NGRAM_CHAR_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}
MAX_DUP_NGRAM_CHAR_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
# C4 (Raffel et al. 2020, 2.2; the TFDS c4_utils code for the policy phrases and long words).
C4_MIN_WORDS_PER_LINE = 3
C4_MAX_WORD_LEN = 1000
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")

# Languages written without spaces between words: every word-based rule would call a whole
# Chinese article "one word" and drop it, so those rules are skipped for them.
NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})

# datatrove's PUNCTUATION_SET (utils/text.py): ASCII/CJK punctuation, control characters except
# \t and \n, and the Unicode sentence terminators. A token made only of these is a symbol, not a
# word. Copied (not imported) so the pipeline does not depend on datatrove.
_PUNCT = frozenset(
    '\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17'
    '\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~\x7f\x80\x81\x82\x83'
    '\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98\x99'
    '\x9a\x9b\x9c\x9d\x9e\x9f\xab\xb4\xbb\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702'
    '\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735'
    '\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab'
    '\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u2013\u2014\u2019\u201c'
    '\u201d\u201e\u2026\u203c\u203d\u2047\u2048\u2049\u2236\u2501\u25ba\u2e2e\u2e3c\u2e53'
    '\u2e54\u3001\u3002\u3008\u3009\u300a\u300b\u300c\u300d\u3010\u3011\ua4ff\ua60e\ua60f'
    '\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1'
    '\uabeb\ufe52\ufe56\ufe57\uff01\uff05\uff08\uff09\uff0c\uff0e\uff11\uff1a\uff1b\uff1f'
    '\uff5e\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59'
    '\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf'
    '\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd'
    '\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b'
    '\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd'
    '\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5'
    '\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944'
    '\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7'
    '\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38'
    '\U00016b44\U00016e98\U0001bc9f\U0001da88'
)
_BULLETS = ("•", "-")
_ELLIPSES = ("...", "…")


# ---------------------------------------------------------------------------------------------
# words: spaCy's English tokenizer, replayed with a chunk cache
# ---------------------------------------------------------------------------------------------
_RULES_CACHE = cache_dir("spacy")


def _extract_spacy_rules() -> dict:
    """Pattern strings and special cases of ``spacy.blank("en")``'s tokenizer and the
    sentencizer's punctuation (importing spaCy pulls in thinc and torch: seconds to a minute, so
    this runs once per spaCy version and the result is cached as a pickle)."""
    import spacy
    from spacy.pipeline import Sentencizer

    tok = spacy.blank("en").tokenizer

    def pat(fn):
        p = getattr(fn, "__self__", None)  # a bound re.Pattern method, or None
        return None if p is None else (p.pattern, p.flags)

    return {"prefix": pat(tok.prefix_search), "suffix": pat(tok.suffix_search), "infix": pat(tok.infix_finditer),
            "token_match": pat(tok.token_match), "url_match": pat(tok.url_match),
            "special": {k: [d[65] for d in v] for k, v in tok.rules.items()},  # 65 = spacy.attrs.ORTH
            "punct_chars": sorted(Sentencizer.default_punct_chars)}


@lru_cache(maxsize=1)
def _spacy_rules():
    """The compiled affix regexes and special cases of ``spacy.blank("en")``, loaded once per
    process from ``.cache/spacy/en-<spaCy version>.pkl`` (written on first use). ``affixed``
    are the special cases spaCy's special-case matcher restores after affix splitting ("d."
    split into "d" "." is "d." again)."""
    import pickle
    from importlib.metadata import version

    cached = _RULES_CACHE / f"en-{version('spacy')}-v1.pkl"
    try:
        with cached.open("rb") as f:
            raw = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError):
        raw = _extract_spacy_rules()
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            with tmp.open("wb") as f:
                pickle.dump(raw, f)
            os.replace(tmp, cached)
        except OSError:
            pass  # read-only checkout: extracted again by the next process
    never = re.compile("a^")

    def comp(p):
        return never if p is None else re.compile(p[0], p[1])

    prefix, suffix, infix = comp(raw["prefix"]).search, comp(raw["suffix"]).search, comp(raw["infix"]).finditer
    special = raw["special"]
    affixed = {k: v for k, v in special.items() if prefix(k) or suffix(k) or any(True for _ in infix(k))}
    return (prefix, suffix, infix, comp(raw["token_match"]).match, comp(raw["url_match"]).match, special, affixed,
            frozenset(raw["punct_chars"]))


def _merge_affixed(tokens: list[str], affixed: dict) -> list[str]:
    out, i, n = [], 0, len(tokens)
    while i < n:
        for w in (3, 2):
            if i + w <= n and (key := "".join(tokens[i:i + w])) in affixed:
                out.extend(affixed[key])
                i += w
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


def _split_chunk(chunk: str) -> list[str]:
    """One whitespace-free chunk into spaCy tokens (the algorithm of spaCy's Tokenizer.explain)."""
    prefix_search, suffix_search, infix_finditer, token_match, url_match, special, affixed, _ = _spacy_rules()
    tokens: list[str] = []
    suffixes: list[str] = []
    s = chunk
    while s:
        if s in special:
            tokens.extend(special[s])
            break
        while prefix_search(s) or suffix_search(s):
            if token_match(s):
                tokens.append(s)
                s = ""
                break
            if s in special:
                tokens.extend(special[s])
                s = ""
                break
            m = prefix_search(s)
            if m:
                if m.end() == 0:
                    break
                tokens.append(s[:m.end()])
                s = s[m.end():]
                if s in special:
                    continue
            m = suffix_search(s)
            if m:
                if m.start() == len(s):
                    break
                suffixes.append(s[m.start():])
                s = s[:m.start()]
        if not s:
            continue
        if token_match(s) or url_match(s):
            tokens.append(s)
        elif s in special:
            tokens.extend(special[s])
        else:
            off, found = 0, False
            for m in infix_finditer(s):
                found = True
                if off == 0 and m.start() == 0:
                    continue
                if s[off:m.start()]:
                    tokens.append(s[off:m.start()])
                if m.start() != m.end():
                    tokens.append(s[m.start():m.end()])
                off = m.end()
            if not found:
                tokens.append(s)
            elif s[off:]:
                tokens.append(s[off:])
        s = ""
    tokens.extend(reversed(suffixes))
    return _merge_affixed(tokens, affixed) if len(tokens) > 1 else tokens


_CHUNK_CACHE: dict[str, tuple] = {}
_CHUNK_CACHE_MAX = 400_000  # ~100 MB at worst; cleared (not LRU) when full: cheap and bounded


def _chunk(chunk: str) -> tuple[list[str], int, int, int]:
    """(tokens, tokens with a letter, non-symbol tokens, characters of non-symbol tokens) of one
    whitespace-free chunk, cached: the Gopher counts then cost one lookup per chunk."""
    hit = _CHUNK_CACHE.get(chunk)
    if hit is None:
        toks = _split_chunk(chunk)
        real = [t for t in toks if not _PUNCT.issuperset(t)]
        hit = (toks, sum(any(ch.isalpha() for ch in t) for t in toks), len(real), sum(map(len, real)))
        if len(_CHUNK_CACHE) >= _CHUNK_CACHE_MAX:
            _CHUNK_CACHE.clear()
        _CHUNK_CACHE[chunk] = hit
    return hit


class Tokens(list):
    """``words(text)`` with the counts Gopher's quality rules need, summed per chunk."""
    n_alpha = n_real = real_chars = 0


def words(text: str) -> Tokens:
    """spaCy English word tokens of ``text`` without whitespace tokens (datatrove's
    ``split_into_words``), as a list carrying ``n_alpha`` (tokens with a letter), ``n_real``
    (tokens that are not only punctuation) and ``real_chars`` (their characters)."""
    out = Tokens()
    n_alpha = n_real = real_chars = 0
    cache = _CHUNK_CACHE
    for chunk in text.split():
        hit = cache.get(chunk) or _chunk(chunk)
        out.extend(hit[0])
        n_alpha += hit[1]
        n_real += hit[2]
        real_chars += hit[3]
    out.n_alpha, out.n_real, out.real_chars = n_alpha, n_real, real_chars
    return out


# ---------------------------------------------------------------------------------------------
# Gopher
# ---------------------------------------------------------------------------------------------
def gopher_quality(text: str, cfg, lang: str | None = None, toks: Tokens | None = None) -> Decision:
    """Gopher quality rules; ``lang`` (ISO 639-1 from language ID, or None) turns the stop-word
    rule on for English and skips word-based rules for languages written without spaces.
    ``toks`` are ``words(text)`` when the caller already has them."""
    if lang in NO_SPACE_LANGS:
        return KEEP
    toks = words(text) if toks is None else toks
    n = toks.n_real
    if n < MIN_WORDS:
        return False, "gopher_short_doc", float(n)
    if n > MAX_WORDS:
        return False, "gopher_long_doc", float(n)
    mean_len = toks.real_chars / n
    if not MIN_MEAN_WORD_LEN <= mean_len <= MAX_MEAN_WORD_LEN:
        return False, "gopher_mean_word_length", round(mean_len, 4)
    n_all = len(toks)  # symbol ratios and the alphabetic share are over every token, as in datatrove
    for ratio in (text.count("#") / n_all, (text.count("...") + text.count("…")) / n_all):
        if ratio > MAX_SYMBOL_WORD_RATIO:
            return False, "gopher_symbol_word_ratio", round(ratio, 4)
    lines = text.splitlines()  # blank lines count in the denominator, as in datatrove
    if lines:
        bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines)
        if bullets > MAX_BULLET_LINES:
            return False, "gopher_bullet_lines", round(bullets, 4)
        ellipsis = sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines)
        if ellipsis > MAX_ELLIPSIS_LINES:
            return False, "gopher_ellipsis_lines", round(ellipsis, 4)
    alpha = toks.n_alpha / (n if cfg.gopher_alpha_basis == "words" else n_all)
    if alpha < MIN_ALPHA_WORDS:
        return False, "gopher_alpha_words", round(alpha, 4)
    if lang == "en":
        # Distinct stop words, case as written (datatrove's set intersection): "The" at the start
        # of every sentence does not make a keyword list English.
        stops = len(STOP_WORDS.intersection(toks))
        if stops < MIN_STOP_WORDS:
            return False, "gopher_stop_words", float(stops)
    return KEEP


def _dup_stats(elements: list[str]) -> tuple[int, int]:
    """(number of elements that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for e in elements:
        if e in seen:
            dup_n += 1
            dup_chars += len(e)
        else:
            seen.add(e)
    return dup_n, dup_chars


def top_ngram_char_fraction(words: list[str], n: int, text_len: int | None = None) -> float:
    """Characters covered by the most common word n-gram (its length with single spaces, times
    its count) over ``text_len`` (the document's characters; default: the words joined by spaces),
    Gopher's "fraction of characters in the top n-gram". Counted on tuples: joining with a space
    is one-to-one because tokens hold no whitespace."""
    if len(words) < n:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = grams.most_common(1)[0]
    total = text_len if text_len is not None else sum(map(len, words)) + len(words) - 1
    return (sum(map(len, gram)) + n - 1) * count / max(total, 1)


def dup_ngram_chars(words: list[str], n: int, cum: list[int] | None = None, keys: list[tuple] | None = None) -> int:
    """Characters in repeated n-grams, scanning left to right and jumping past each repeat
    (datatrove's ``find_all_duplicate``). datatrove keys an n-gram by its words concatenated
    without spaces; this keys it by the word tuple, which differs only when two different word
    sequences concatenate to the same string ("ab" "c" / "a" "bc" at one n), and is ~5x faster.
    ``cum`` are the cumulative word lengths and ``keys`` the n-gram tuples (computed when not
    given)."""
    if keys is None:
        keys = list(zip(*(words[i:] for i in range(n))))
    if len(set(keys)) == len(keys):
        return 0
    if cum is None:
        cum = list(accumulate(map(len, words), initial=0))
    seen: set = set()
    add = seen.add
    repeated = idx = 0
    last = len(keys)
    while idx < last:
        k = keys[idx]
        if k in seen:
            repeated += cum[idx + n] - cum[idx]
            idx += n
        else:
            add(k)
            idx += 1
    return repeated


_PARA_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile("\n+")


def gopher_repetition(text: str, cfg, lang: str | None = None, toks: Tokens | None = None) -> Decision:
    """Gopher repetition rules: duplicate paragraphs/lines by count and by characters (over the
    text's length), the top 2/3/4-gram and the repeated 5..10-gram character fractions (word
    n-grams are skipped for no-space languages)."""
    if not text:
        return False, "gopher_empty", 0.0
    size = len(text)
    paragraphs = _PARA_SPLIT.split(text.strip())
    n, chars = _dup_stats(paragraphs)
    if n / len(paragraphs) > MAX_DUP_PARA_FRAC:
        return False, "gopher_dup_para_frac", round(n / len(paragraphs), 4)
    if chars / size > MAX_DUP_PARA_CHAR_FRAC:
        return False, "gopher_dup_para_char_frac", round(chars / size, 4)
    lines = _LINE_SPLIT.split(text)
    n, chars = _dup_stats(lines)
    if n / len(lines) > MAX_DUP_LINE_FRAC:
        return False, "gopher_dup_line_frac", round(n / len(lines), 4)
    if chars / size > MAX_DUP_LINE_CHAR_FRAC:
        return False, "gopher_dup_line_char_frac", round(chars / size, 4)
    if lang in NO_SPACE_LANGS:
        return KEEP
    toks = words(text) if toks is None else toks
    for n, limit in MAX_TOP_NGRAM_CHAR_FRAC.items():
        f = top_ngram_char_fraction(toks, n, size)
        if f > limit:
            return False, f"gopher_top_{n}gram", round(f, 4)
    cum = None
    max_tok = max(map(len, toks), default=0)
    for n, limit in MAX_DUP_NGRAM_CHAR_FRAC.items():
        if len(toks) < n:
            break
        keys = list(zip(*(toks[i:] for i in range(n))))
        repeats = len(keys) - len(set(keys))
        if repeats == 0:  # no repeated n-gram: no repeated longer one either
            break
        # The scan counts a subset of the positions whose n-gram occurred before, each at most
        # n * longest-token characters: when even that is under the limit, skip the scan.
        if repeats * n * max_tok <= limit * size:
            continue
        if cum is None:
            cum = list(accumulate(map(len, toks), initial=0))
        chars = dup_ngram_chars(toks, n, cum, keys)
        if chars / size > limit:
            return False, f"gopher_dup_{n}gram", round(chars / size, 4)
    return KEEP


# ---------------------------------------------------------------------------------------------
# C4
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=65536)
def _is_punct(token: str) -> bool:
    # spaCy's IS_PUNCT lexical attribute: every character in a Unicode punctuation category.
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def count_sentences(line: str) -> int:
    """Sentences in one line by spaCy's rule-based sentencizer (datatrove's
    ``split_into_sentences``), replayed on ``words``: a sentence ends at a token in the
    sentencizer's punctuation list and the next one starts at the first following token that
    is not punctuation. (spaCy also has whitespace tokens for runs of spaces; inside a
    stripped line they start a sentence exactly where the next word would.)"""
    punct_chars = _spacy_rules()[7]
    toks = words(line)
    if not toks:
        return 0
    n, seen_period = 1, False
    for t in toks:
        in_chars = t in punct_chars
        if seen_period and not in_chars and not _is_punct(t):
            n += 1
            seen_period = False
        elif in_chars:
            seen_period = True
    return n


def c4_lines(text: str, min_sentences: int = 5) -> tuple[Decision, list[str]]:
    """C4's line pass: (decision, kept lines). A line is kept when no word exceeds 1,000
    characters, it ends in terminal punctuation (not an ellipsis) once citation marks are
    removed, it has >= 3 words and mentions neither "javascript" nor a cookie/terms-of-use
    phrase; "lorem ipsum" or "{" in a kept line drops the whole document."""
    kept: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        ws = line.split()
        if len(line) > C4_MAX_WORD_LEN and any(len(w) > C4_MAX_WORD_LEN for w in ws):
            continue
        if "[" in line:
            line = _CITATION.sub("", line)
        if not line.endswith(C4_END_PUNCTUATION) or line.endswith("..."):
            continue
        if len(ws) < C4_MIN_WORDS_PER_LINE:
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return (False, "c4_lorem_ipsum", 1.0), kept
        if "javascript" in low:
            continue
        if "{" in line:
            return (False, "c4_curly_bracket", 1.0), kept
        if any(p in low for p in C4_POLICY):
            continue
        kept.append(line)
    if min_sentences > 0 and len(kept) < min_sentences:
        # Each kept line holds >= 1 sentence, so only a short list needs the sentencizer.
        n = sum(count_sentences(ln) for ln in kept)
        if n < min_sentences:
            return (False, "c4_too_few_sentences", float(n)), kept
    return KEEP, kept


def c4_quality(text: str, cfg, lang: str | None = None) -> Decision:
    """C4's document decision (``c4_lines``) with ``cfg.c4_min_sentences``."""
    return c4_lines(text, cfg.c4_min_sentences)[0]


def quality_filters(text: str, cfg, lang: str | None = None) -> Decision:
    """The quality rules (Gopher quality, Gopher repetition, C4); the first drop wins. A document
    is kept only when every rule keeps it, so the order changes only the reason a drop is
    reported under: Gopher quality first, so a ten-word page reads "gopher_short_doc" rather
    than "gopher_top_4gram" (datatrove runs repetition first; the decision is the same).
    Tokenises once for both Gopher filters. The pure core of the clean stage's decision and of
    bench/quality_bench.py."""
    toks = None if lang in NO_SPACE_LANGS else words(text)
    decision = gopher_quality(text, cfg, lang, toks)
    if decision[0]:
        decision = gopher_repetition(text, cfg, lang, toks)
    # C4's terminal punctuation is ASCII ". ? !": every line of a Chinese or Japanese page ends
    # in "。" and would be dropped, so C4 is skipped where the word rules are.
    if decision[0] and cfg.c4_filters and lang not in NO_SPACE_LANGS:
        decision = c4_quality(text, cfg, lang)
    return decision


# ---------------------------------------------------------------------------------------------
# language ID
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _identifier():
    # Normalised probabilities so the score is a confidence in [0, 1]; the model ships inside the
    # wheel (no download), loaded once per process (pool workers each load their own).
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


LANGID_MAX_CHARS = 5000  # the first few thousand characters decide as well as the whole book


def detect_language(text: str) -> tuple[str | None, float]:
    """(ISO 639-1 code, confidence) or (None, 0.0) for text with no letters."""
    sample = text[:LANGID_MAX_CHARS]
    if not any(ch.isalpha() for ch in sample):
        return None, 0.0
    lang, prob = _identifier().classify(sample)
    return lang, float(prob)


def language_filter(text: str, cfg, lang: str | None = None, confidence: float = 0.0) -> Decision:
    """Drop documents whose detected language is not in ``cfg.allowed_languages`` (None: all
    allowed). ``lang``/``confidence`` come from ``detect_language`` (run once per document)."""
    allowed = cfg.allowed_languages
    if allowed is None or lang is None or lang in allowed:
        return KEEP
    return False, f"language:{lang}", round(confidence, 4)


def filter_document(text: str, cfg) -> tuple[Decision, str | None]:
    """Run language ID then the quality filters; returns (first failing decision or KEEP,
    detected language)."""
    lang, conf = detect_language(text)
    decision = language_filter(text, cfg, lang, conf)
    if not decision[0]:
        return decision, lang
    return quality_filters(text, cfg, lang), lang


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate
# ---------------------------------------------------------------------------------------------
# Header ends at the "*** START OF THIS/THE PROJECT GUTENBERG EBOOK ... ***" line, or, in old
# etexts, at the end of the "Small Print" licence block.
_PG_START = re.compile(
    r"^.*\*\*\*\s*START OF (?:THIS|THE) PROJECT GUTENBERG E(?:BOOK|TEXT).*$"
    r"|^\*END\*?\s*THE SMALL PRINT!.*$",
    re.I | re.M,
)
_PG_END = re.compile(
    r"^.*\*\*\*\s*END OF (?:THIS|THE) PROJECT GUTENBERG E(?:BOOK|TEXT).*$"
    r"|^\s*End of (?:the )?Project Gutenberg(?:'s|’s)?\b.*$"
    r"|^\s*End of The Project Gutenberg E(?:Book|text)\b.*$",
    re.I | re.M,
)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove the Project Gutenberg header (up to and including the START line) and footer (from
    the first END line on). Returns (text, whether anything was stripped). Text without the
    markers is returned unchanged; a START without a later END strips only the header."""
    if "gutenberg" not in text[:20_000].lower() and "gutenberg" not in text[-40_000:].lower():
        return text, False
    changed = False
    # The last header marker in the first half: old etexts carry a START banner and then the
    # "Small Print" block, whose end is the real start of the book.
    starts = [m for m in _PG_START.finditer(text) if m.start() <= len(text) // 2]
    if starts:
        text = text[starts[-1].end():]
        changed = True
    # With the header gone the first END line is the footer ("End of Project Gutenberg's ..."
    # comes just before "*** END OF ...": cut at whichever is first).
    end = _PG_END.search(text)
    if end is not None:
        text = text[:end.start()]
        changed = True
    return (text.strip("\n") if changed else text), changed
