"""Synonym replacement from the bundled WordNet 3.0 table (data/thesaurus, offline, licensed).

Baseline paraphrase without a model: a fraction of the lemmas that have a usable entry in the table
are replaced by one of their synonyms. The table only holds common lemmas in their most frequent
sense and their regular inflections (data/thesaurus/SOURCE.md says how it was chosen); on top of it
``usable_synonyms`` keeps only mutual synonyms (both words' dominant sense is the shared synset),
because neither a tagger nor WordNet's sense counts are available offline. A rewrite must keep the
meaning of the record (issue 15): a lemma is replaced at every occurrence or at none, and never
when it occurs in the target, is a number, a name or a function word (``replaceable``). Case is
kept (``Quick`` -> ``Speedy``, ``BIG`` -> ``LARGE``); punctuation and whitespace around a word stay.
"""
from __future__ import annotations

import functools
import gzip
import random
import re
from pathlib import Path

from corpus2model.tasks.common.resources import data_path

TABLE = data_path("thesaurus", "wordnet_synonyms.tsv.gz")
# A word: letters with inner apostrophes/hyphens; only all-letter words are looked up.
_WORD = re.compile(r"[A-Za-z]+(?:['\u2019-][A-Za-z]+)*")


@functools.lru_cache(maxsize=4)
def load_table(path: str | Path = TABLE) -> dict[str, tuple[str, ...]]:
    """headword -> synonyms (lowercase)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"thesaurus table {path} is missing; rebuild it with python data/thesaurus/build_thesaurus.py")
    table: dict[str, tuple[str, ...]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            head, syns = line.rstrip("\n").split("\t", 1)
            table[head] = tuple(syns.split())
    return table


def _match_case(word: str, repl: str) -> str:
    if word.isupper() and len(word) > 1:
        return repl.upper()
    if word[0].isupper():
        return repl[0].upper() + repl[1:]
    return repl


# Words never replaced, whatever the table says: function words, discourse and degree adverbs
# ("Instead it took 60% longer" -> "Alternatively ..." changes the logic of a sentence), quantity
# words (a math prompt's "dozen" is a number), and month names (the table maps "October" to "oct").
STOPWORDS = frozenset("""
a about above after afterward afterwards again against all almost also alternatively although always am
an and another any anyway approximately are around as at away back be because been before being below
besides between both but by can cannot certainly consequently could did do does doing done down during
each either else enough entirely especially even eventually ever every exactly finally first for forth
frequently from further furthermore had has have having he hence her here hers herself him himself his
how however i if in indeed instead into is it its itself just largely later lately least less likewise
many maybe me meanwhile merely might more moreover most mostly much must my myself namely nearly neither
nevertheless next no nonetheless nor normally not notwithstanding now of off often on once only or other
otherwise ought our ours ourselves out over own perhaps precisely presently probably quite rather really
roughly same second shall she should similarly since so some soon still subsequently such than that the
their theirs them themselves then there thereby therefore these they this those though through thus to
together too totally truly under unless until up upon usually very was we well were what whatever when
whenever where whereas wherever whether which while who whom whose why will with within without would yet
you your yours yourself yourselves altogether completely wholly whole withal
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred hundreds thousand
thousands million millions billion billions dozen dozens score scores twoscore half halves quarter quarters
third thirds double twice triple pair pairs couple lots tons wads grand grands percent percentage
january february march april may june july august september october november december
jan feb mar apr jun jul aug sep sept oct nov dec
""".split())

# Suffixes stripped to find a word's lemma group ("balloons" and "balloon" are one lemma): a
# guess from spelling, used only to be more careful (a group with two forms in one record is left
# alone), so a wrong guess can only skip a replacement, never make a wrong one.
_SUFFIXES = (("ies", "y"), ("ied", "y"), ("ying", "ie"), ("ing", "e"), ("ing", ""), ("es", ""), ("ed", "e"),
             ("ed", ""), ("s", ""), ("d", ""))


def lemma_key(word: str, table: dict[str, tuple[str, ...]] | None = None) -> str:
    """The lemma group of ``word`` (lowercase): the first base form from stripping a regular suffix
    that is a headword of the table, else the word itself."""
    table = load_table() if table is None else table
    w = word.lower()
    for suffix, repl in _SUFFIXES:
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            base = w[: -len(suffix)] + repl
            if base in table:
                return base
    return w


def usable_synonyms(word: str, table: dict[str, tuple[str, ...]] | None = None,
                    vocab: frozenset[str] | set[str] | None = None) -> tuple[str, ...]:
    """The synonyms of ``word`` (lowercase) that may replace it blind, without a tagger.

    The bundled table has no part-of-speech or sense counts per occurrence and WordNet's database
    is not available offline to rebuild it with them, so this is the conservative filter the issue
    allows: a synonym is kept only when
    * the relation is mutual: the synonym's own entry lists ``word`` back, i.e. the shared synset
      is the dominant SemCor sense of *both* lemmas and both passed the build's evidence rule
      ("quit" -> "discontinue" goes: "discontinue" has no entry pointing back to "quit");
    * it is not a stopword and not a spelling variant of the word ("profit" -> "profits",
      "minute" -> "min", "october" -> "oct");
    * when ``vocab`` is given (the LM reference vocabulary, tasks/text/lmscore.py), it is a word
      seen there at least twice, which drops archaic words and bogus plurals ("workses").
    """
    table = load_table() if table is None else table
    out = []
    for s in table.get(word, ()):
        if s in STOPWORDS or s.startswith(word) or word.startswith(s) or word not in table.get(s, ()):
            continue
        if vocab is not None and s not in vocab:
            continue
        out.append(s)
    return tuple(out)


def _words(text: str) -> list[str]:
    return [m.group(0).lower() for m in _WORD.finditer(text)]


def _name_like(text: str, m: re.Match, capitalised_mid: set[str]) -> bool:
    """A capitalised word in the middle of a sentence, or at a sentence start when the same word is
    capitalised mid-sentence elsewhere ("Tara ... Tara"): probably a name ("Bill", "May", "Frank")."""
    w = m.group(0)
    if not w[0].isupper() or w.isupper():
        return False
    return not _sentence_start(text, m.start()) or w.lower() in capitalised_mid


def replaceable(text: str, table: dict[str, tuple[str, ...]] | None = None, protect: str = "",
                vocab: frozenset[str] | set[str] | None = None) -> list[re.Match]:
    """The words of ``text`` that may be replaced, in text order: all-letter words with usable
    synonyms that are not stopwords, not names, and whose lemma group
    * does not occur in ``protect`` (the record's target: the answer must still match the question),
    * occurs in ``text`` in one form only and never as a name or in a form without synonyms
      (every occurrence is replaced, or none: "20 red balloons ... 3 red burst" stays consistent).
    """
    table = load_table() if table is None else table
    matches = list(_WORD.finditer(text))
    capitalised_mid = {m.group(0).lower() for m in matches
                       if m.group(0)[0].isupper() and not m.group(0).isupper() and not _sentence_start(text, m.start())}
    protected = {lemma_key(w, table) for w in _words(protect)} | set(_words(protect))
    groups: dict[str, list[re.Match]] = {}
    for m in matches:
        groups.setdefault(lemma_key(m.group(0), table), []).append(m)
    ok: set[str] = set()
    for key, ms in groups.items():
        forms = {m.group(0).lower() for m in ms}
        if len(forms) != 1 or key in protected or forms & protected:
            continue
        (form,) = forms
        if form in STOPWORDS or key in STOPWORDS or not usable_synonyms(form, table, vocab):
            continue
        if any(_name_like(text, m, capitalised_mid) for m in ms):
            continue
        ok.add(key)
    return [m for m in matches if lemma_key(m.group(0), table) in ok]


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in ".!?:\"'\u201c\u2018(\n"


def synonym_replace(text: str, p: float, rng: random.Random, table: dict[str, tuple[str, ...]] | None = None,
                    protect: str = "", vocab: frozenset[str] | set[str] | None = None) -> str:
    """Replace each replaceable lemma (``replaceable``) with probability ``p`` by one usable synonym
    drawn from ``rng``, at every occurrence; when the draw picks none but the text has replaceable
    words, one lemma is replaced (so an eligible text always changes, like word_dropout keeps one
    word). ``protect`` is text whose words must not be touched (the target). Everything else,
    whitespace included, is kept."""
    table = load_table() if table is None else table
    matches = replaceable(text, table, protect, vocab)
    if not matches:
        return text
    lemmas = list(dict.fromkeys(m.group(0).lower() for m in matches))  # one form per lemma here
    chosen = [rng.random() < p for _ in lemmas]
    if not any(chosen):
        chosen[rng.randrange(len(lemmas))] = True
    repl = {}
    for w, pick in zip(lemmas, chosen):
        if pick:
            syns = usable_synonyms(w, table, vocab)
            repl[w] = syns[rng.randrange(len(syns))]
    parts: list[str] = []
    last = 0
    for m in matches:
        word = m.group(0)
        new = repl.get(word.lower())
        if new is None:
            continue
        parts.append(text[last:m.start()])
        parts.append(_match_case(word, new))
        last = m.end()
    parts.append(text[last:])
    return "".join(parts)


def replaced_words(before: str, after: str) -> list[tuple[str, str]]:
    """(old, new) lowercase word pairs where a synonym edit changed ``before`` into ``after`` (a
    synonym is one word, so the words align one to one); [] when they do not align."""
    a, b = _words(before), _words(after)
    if len(a) != len(b):
        return []
    return [(x, y) for x, y in zip(a, b) if x != y]


def leftover_words(before: str, after: str, target: str = "") -> list[str]:
    """The words a synonym edit replaced that still appear, unreplaced, in the rewrite or in the
    target (the inconsistency of issue 15: "20 red balloons ... 3 crimson and 2 green balloons")."""
    kept = set(_words(after)) | set(_words(target))
    return sorted({old for old, _ in replaced_words(before, after) if old in kept})
