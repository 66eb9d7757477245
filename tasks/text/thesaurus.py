"""Synonym replacement from the bundled WordNet 3.0 table (data/thesaurus, offline, licensed).

Baseline paraphrase without a model: a fraction of the words that have an entry in the table are
replaced by one of their synonyms. The table only holds common lemmas in their most frequent sense
and their regular inflections (data/thesaurus/SOURCE.md says how it was chosen), so no
part-of-speech tagger is needed. Case is
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


def replaceable(text: str, table: dict[str, tuple[str, ...]] | None = None) -> list[re.Match]:
    """The words of ``text`` that have synonyms (all-letter words whose lowercase form is a headword).
    Capitalised words in the middle of a sentence are skipped: they are likely names ("Bill", "May")."""
    table = load_table() if table is None else table
    out = []
    for m in _WORD.finditer(text):
        w = m.group(0)
        if w.lower() not in table:
            continue
        if w[0].isupper() and not w.isupper() and not _sentence_start(text, m.start()):
            continue
        out.append(m)
    return out


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in ".!?:\"'\u201c\u2018(\n"


def synonym_replace(text: str, p: float, rng: random.Random, table: dict[str, tuple[str, ...]] | None = None) -> str:
    """Replace each replaceable word with probability ``p`` by a synonym drawn from ``rng``; when the
    draw picks none but the text has replaceable words, one is replaced (so an eligible text always
    changes, like word_dropout keeps one word). Everything else, whitespace included, is kept."""
    table = load_table() if table is None else table
    matches = replaceable(text, table)
    if not matches:
        return text
    chosen = [rng.random() < p for _ in matches]
    if not any(chosen):
        chosen[rng.randrange(len(matches))] = True
    parts: list[str] = []
    last = 0
    for m, pick in zip(matches, chosen):
        if not pick:
            continue
        word = m.group(0)
        syns = table[word.lower()]
        parts.append(text[last:m.start()])
        parts.append(_match_case(word, syns[rng.randrange(len(syns))]))
        last = m.end()
    parts.append(text[last:])
    return "".join(parts)
