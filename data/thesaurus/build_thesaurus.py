"""Build data/thesaurus/wordnet_synonyms.tsv.gz from the WordNet 3.0 database (Debian ``wordnet-base``).

    python data/thesaurus/build_thesaurus.py [--wordnet /usr/share/wordnet] [--out data/thesaurus/wordnet_synonyms.tsv.gz]

The synonym method of tasks/augment.py replaces words without a part-of-speech tagger or a
word-sense model, so the table is built to make a blind replacement safe more often than not:

* a headword is a common single-word lemma: lowercase letters only, at least 3 letters, not a
  function word, and its most frequent sense was seen at least ``--min-count`` times in the
  SemCor tagged corpus (``cntlist.rev``);
* only the headword's *most frequent* sense (first synset of its most frequent part of speech) is
  used, and only when that sense covers at least ``--dominance`` of the lemma's tagged uses
  (a word like "bank" whose uses are spread over senses gets no entry);
* synonyms are the other single-word lemmas of that synset that were themselves tagged at least
  once (drops rare and archaic words) and whose own most frequent sense is that synset (drops
  "car" -> "machine", "absolutely" -> "dead").

Regular inflections are added as headwords of their own (noun plurals, verb -s/-ed/-ing: "cars" ->
"autos", "started" -> "commenced"), mapped to the same inflection of each synonym; irregular words
(noun.exc / verb.exc) and uncertain spellings are left out (``add_inflections``).

The output is deterministic (sorted rows, gzip mtime 0), so rebuilding gives the same bytes.
Format: one ``headword<TAB>synonym synonym ...`` per line, preceded by ``#`` comment lines.
"""
from __future__ import annotations

import argparse
import gzip
import io
import re
from collections import defaultdict
from pathlib import Path

POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# ss_type digit in sense keys -> the index file's part of speech (5 = adjective satellite).
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
WORD = re.compile(r"^[a-z]{3,}$")
# Function words and auxiliaries that WordNet lists as rare nouns/verbs ("will", "can", "may").
STOP = set("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can cannot could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just
let like may me might more most must my myself no nor not now of off on once only or other ought our
ours ourselves out over own same shall she should so some such than that the their theirs them
themselves then there these they this those through to too under until up upon very was we were what
when where which while who whom why will with would yet you your yours yourself yourselves one two
three four five six seven eight nine ten first second get got make made say said go went gone see
seen come came take took know knew think thought use used want give gave find found tell told well
way even new old many much still back
""".split())


def read_counts(wordnet: Path) -> tuple[dict, dict]:
    """(first-sense tag count per (lemma, pos), total tag count per lemma) from cntlist.rev."""
    first: dict[tuple[str, str], int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for line in (wordnet / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, sense_number, count = line.split()
        lemma, rest = key.split("%", 1)
        pos = SS_TYPE[rest[0]]
        total[lemma] += int(count)
        if sense_number == "1":
            first[(lemma, pos)] = max(first[(lemma, pos)], int(count))
    return first, total


def read_synsets(wordnet: Path, pos: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(lemma -> offset of its first (most frequent) synset, offset -> lemmas of the synset)."""
    first_synset: dict[str, str] = {}  # index files list a lemma's synsets most frequent first
    for line in (wordnet / f"index.{POS[pos]}").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):  # licence header
            continue
        f = line.split()
        lemma, p_cnt = f[0], int(f[3])
        offsets = f[4 + p_cnt + 2:]
        if offsets:
            first_synset[lemma] = offsets[0]
    members: dict[str, list[str]] = {}
    for line in (wordnet / f"data.{POS[pos]}").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        offset, w_cnt = f[0], int(f[3], 16)
        words = [re.sub(r"\(.*\)$", "", w).lower() for w in f[4:4 + 2 * w_cnt:2]]  # drop "(a)", "(p)" markers
        members[offset] = words
    return first_synset, members


def build(wordnet: Path, min_count: int, dominance: float) -> dict[str, list[str]]:
    first, total = read_counts(wordnet)
    table: dict[str, list[str]] = {}
    best: dict[str, tuple[int, str]] = {}
    for (lemma, pos), count in first.items():
        if count > best.get(lemma, (-1, ""))[0]:
            best[lemma] = (count, pos)
    synsets = {pos: read_synsets(wordnet, pos) for pos in POS}
    pos_of: dict[str, str] = {}
    for lemma, (count, pos) in sorted(best.items()):
        if not WORD.match(lemma) or lemma in STOP or count < min_count or count < dominance * total[lemma]:
            continue
        first_synset, members = synsets[pos]
        offset = first_synset.get(lemma)
        if offset is None:
            continue
        # A synonym must have this synset as its own most frequent sense too: "machine" is a
        # synonym of "car" in WordNet, but replacing "machine" by "car" (or back) rarely fits.
        syns = [w for w in dict.fromkeys(members.get(offset, []))
                if w != lemma and WORD.match(w) and w not in STOP and total.get(w, 0) >= 1
                and first_synset.get(w) == offset]
        if syns:
            table[lemma] = syns
            pos_of[lemma] = pos
    add_inflections(table, pos_of, wordnet, synsets)
    return table


_VOWEL = set("aeiou")


def _regular(lemma: str, suffix: str) -> str | None:
    """The regular inflection of ``lemma`` (suffix "s", "ed" or "ing"), or None where spelling
    rules are uncertain (a final consonant-vowel-consonant may double: stop -> stopped, visit ->
    visited)."""
    w = lemma
    if suffix == "s":
        if w.endswith("man"):  # madman -> madmen: WordNet derives these by rule, not from noun.exc
            return None
        if w.endswith(("s", "x", "z", "ch", "sh")):
            return w + "es"
        if w.endswith("y") and w[-2] not in _VOWEL:
            return w[:-1] + "ies"
        return w + "s"
    if len(w) >= 3 and w[-1] not in _VOWEL and w[-1] not in "wxy" and w[-2] in _VOWEL and w[-3] not in _VOWEL:
        return None
    if suffix == "ed":
        if w.endswith("e"):
            return w + "d"
        if w.endswith("y") and w[-2] not in _VOWEL:
            return w[:-1] + "ied"
        return w + "ed"
    if w.endswith("ie"):
        return w[:-2] + "ying"
    if w.endswith("e") and not w.endswith(("ee", "ye", "oe")):
        return w[:-1] + "ing"
    return w + "ing"


def add_inflections(table: dict[str, list[str]], pos_of: dict[str, str], wordnet: Path, synsets: dict) -> None:
    """Add regular inflected forms as headwords: noun plurals and verb -s/-ed/-ing forms, mapped to
    the same inflection of each synonym. Skipped where it could go wrong: a lemma or synonym with an
    irregular form (noun.exc / verb.exc: "man" -> "men", "begin" -> "began"), a spelling rule that
    is uncertain, or a form that is itself a WordNet lemma ("building" is a noun of its own)."""
    irregular = set()
    for name in ("noun.exc", "verb.exc"):
        for line in (wordnet / name).read_text(encoding="utf-8").splitlines():
            irregular.update(line.split()[1:])
    lemmas = {w for first_synset, _ in synsets.values() for w in first_synset}
    suffixes = {"n": ("s",), "v": ("s", "ed", "ing")}
    for lemma, pos in list(pos_of.items()):
        if pos not in suffixes or lemma in irregular:
            continue
        for suffix in suffixes[pos]:
            form = _regular(lemma, suffix)
            if form is None or form in lemmas or form in table:
                continue
            syns = [f for w in table[lemma] if w not in irregular and (f := _regular(w, suffix)) and f not in lemmas]
            if syns:
                table[form] = syns


def write(table: dict[str, list[str]], out: Path, wordnet: Path, args) -> None:
    buf = io.StringIO()
    buf.write("# English synonyms extracted from WordNet 3.0 (Princeton University), see LICENSE and SOURCE.md\n")
    buf.write(f"# built by data/thesaurus/build_thesaurus.py --min-count {args.min_count} --dominance {args.dominance}\n")
    for lemma in sorted(table):
        buf.write(f"{lemma}\t{' '.join(table[lemma])}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("wordnet_synonyms.tsv.gz"))
    ap.add_argument("--min-count", type=int, default=3)
    ap.add_argument("--dominance", type=float, default=0.5)
    args = ap.parse_args(argv)
    table = build(args.wordnet, args.min_count, args.dominance)
    write(table, args.out, args.wordnet, args)
    print(f"{len(table)} headwords, {sum(map(len, table.values()))} synonyms -> {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
