"""Document quality filters for the clean stage (datatrove's filter shape).

Every filter is a pure function ``fn(text, cfg) -> (keep, reason, score)``: ``keep`` is the
decision, ``reason`` names the rule that dropped the document (None when kept) and ``score`` is
the measured value the rule compared with its threshold (kept for quarantine rows and tuning).
``cfg`` is the clean section (schemas.config.CleanConfig); the thresholds are the Gopher paper's
(Rae et al. 2021, appendix A) and are module constants here, not config, so a config hash does
not move when someone only reads them.

- ``gopher_quality``: word count, mean word length, symbol/word ratio, bullet and ellipsis
  lines, alphabetic words, English stop words (only when the document is English).
- ``gopher_repetition``: duplicate lines/paragraphs (by count and by characters) and the
  character share of the most common 2/3/4-gram.
- ``c4_lorem_ipsum``: placeholder text. C4's terminal-punctuation line filter is left out on
  purpose: it deletes most lines of our wiki/web dumps (headings, tables, tokenised text).
- ``language_filter``: py3langid (langid.py's bundled model, offline) against
  ``cfg.allowed_languages``.
- ``strip_gutenberg``: a transform, not a filter: removes the Project Gutenberg header and
  licence footer so only the book text stays.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

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

# Languages written without spaces between words: every word-based rule would call a whole
# Chinese article "one word" and drop it, so those rules are skipped for them.
NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "bo"})

_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…“”‘’«»„–—·•")
_BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*")
_ELLIPSES = ("...", "…")


def _words(text: str) -> list[str]:
    return text.split()


def _non_symbol_words(words: list[str]) -> list[str]:
    # Tokens made only of punctuation ("-", "(", "...") are not words for counts and lengths.
    return [w for w in words if any(ch not in _PUNCT for ch in w)]


def gopher_quality(text: str, cfg, lang: str | None = None) -> Decision:
    """Gopher quality rules; ``lang`` (ISO 639-1 from language ID, or None) turns the stop-word
    rule on for English and skips word-based rules for languages written without spaces."""
    if lang in NO_SPACE_LANGS:
        return KEEP
    words = _words(text)
    real = _non_symbol_words(words)
    n = len(real)
    if n < MIN_WORDS:
        return False, "gopher_short_doc", float(n)
    if n > MAX_WORDS:
        return False, "gopher_long_doc", float(n)
    mean_len = sum(len(w) for w in real) / n
    if not MIN_MEAN_WORD_LEN <= mean_len <= MAX_MEAN_WORD_LEN:
        return False, "gopher_mean_word_length", round(mean_len, 4)
    symbols = text.count("#") + text.count("...") + text.count("…")
    ratio = symbols / n
    if ratio > MAX_SYMBOL_WORD_RATIO:
        return False, "gopher_symbol_word_ratio", round(ratio, 4)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        bullets = sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines)
        if bullets > MAX_BULLET_LINES:
            return False, "gopher_bullet_lines", round(bullets, 4)
        ellipsis = sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines)
        if ellipsis > MAX_ELLIPSIS_LINES:
            return False, "gopher_ellipsis_lines", round(ellipsis, 4)
    # Over words, not punctuation tokens: tokenised dumps (wikitext's " , " and " ( ") would
    # otherwise fail on commas alone, while numbers and symbol soup still count against it.
    alpha = sum(any(ch.isalpha() for ch in w) for w in real) / n
    if alpha < MIN_ALPHA_WORDS:
        return False, "gopher_alpha_words", round(alpha, 4)
    if lang == "en":
        stops = sum(w.lower().strip("".join(_PUNCT)) in STOP_WORDS for w in words)
        if stops < MIN_STOP_WORDS:
            return False, "gopher_stop_words", float(stops)
    return KEEP


def _dup_stats(elements: list[str]) -> tuple[float, float]:
    """(fraction of elements that repeat an earlier one, fraction of their characters)."""
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for e in elements:
        total_chars += len(e)
        if e in seen:
            dup_n += 1
            dup_chars += len(e)
        else:
            seen.add(e)
    if not elements:
        return 0.0, 0.0
    return dup_n / len(elements), dup_chars / max(total_chars, 1)


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most common word n-gram (its length times its count) over all
    characters of the words (Gopher's "fraction of characters in the top n-gram")."""
    if len(words) < n:
        return 0.0
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:  # a single occurrence is not repetition
        return 0.0
    total = sum(len(w) for w in words) + len(words) - 1
    return len(gram) * count / max(total, 1)


def gopher_repetition(text: str, cfg, lang: str | None = None) -> Decision:
    """Gopher repetition rules: duplicate paragraphs/lines by count and by characters, then the
    top 2/3/4-gram character fractions (word n-grams are skipped for no-space languages)."""
    paragraphs = [p.strip() for p in re.split(r"\n{2,}", text.strip()) if p.strip()]
    frac, chars = _dup_stats(paragraphs)
    if frac > MAX_DUP_PARA_FRAC:
        return False, "gopher_dup_para_frac", round(frac, 4)
    if chars > MAX_DUP_PARA_CHAR_FRAC:
        return False, "gopher_dup_para_char_frac", round(chars, 4)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    frac, chars = _dup_stats(lines)
    if frac > MAX_DUP_LINE_FRAC:
        return False, "gopher_dup_line_frac", round(frac, 4)
    if chars > MAX_DUP_LINE_CHAR_FRAC:
        return False, "gopher_dup_line_char_frac", round(chars, 4)
    if lang in NO_SPACE_LANGS:
        return KEEP
    words = [w.lower() for w in _words(text)]
    for n, limit in MAX_TOP_NGRAM_CHAR_FRAC.items():
        f = top_ngram_char_fraction(words, n)
        if f > limit:
            return False, f"gopher_top_{n}gram", round(f, 4)
    return KEEP


_LOREM = re.compile(r"lorem ipsum", re.I)


def c4_lorem_ipsum(text: str, cfg, lang: str | None = None) -> Decision:
    """C4's placeholder rule: a document with "lorem ipsum" is a template, not content."""
    return (False, "c4_lorem_ipsum", 1.0) if _LOREM.search(text) else KEEP


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


QUALITY_FILTERS = (c4_lorem_ipsum, gopher_repetition, gopher_quality)


def filter_document(text: str, cfg) -> tuple[Decision, str | None]:
    """Run language ID then every quality filter; returns (first failing decision or KEEP,
    detected language)."""
    lang, conf = detect_language(text)
    decision = language_filter(text, cfg, lang, conf)
    if not decision[0]:
        return decision, lang
    for fn in QUALITY_FILTERS:
        decision = fn(text, cfg, lang)
        if not decision[0]:
            return decision, lang
    return KEEP, lang


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
