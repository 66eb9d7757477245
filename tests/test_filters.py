"""Document quality filters (tasks/text/filters.py) on real corpus snippets and synthetic texts, the
Gutenberg boilerplate strip, language ID, and their integration in the clean stage."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.config import CleanConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks import clean
from corpus2model.tasks.clean import clean_document
from corpus2model.tasks.text.filters import (
    c4_lines,
    c4_quality,
    count_sentences,
    detect_language,
    dup_ngram_chars,
    filter_document,
    gopher_quality,
    gopher_repetition,
    language_filter,
    quality_filters,
    strip_gutenberg,
    top_ngram_char_fraction,
    words,
)
from corpus2model.tasks.stage import run_stage

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RAW = DATASETS / "raw_text_corpus" / "raw"
CFG = CleanConfig()


def _raw(rel: str) -> str:
    path = RAW / rel
    if not path.is_file():
        pytest.skip(f"shared corpus file {path} not found")
    return path.read_bytes().decode("utf-8", errors="replace")


# A plain English paragraph of ~90 words that every rule keeps.
GOOD = (
    "The river rises in the northern hills and flows south through a wide valley of farms and "
    "small towns. In the spring the water is high, and the people of the valley have learned to "
    "build their houses on raised ground. The old bridge at the market town was built with stone "
    "from a nearby quarry and has stood for almost three hundred years. Travellers who cross it "
    "today can still see the marks of the masons on the lower blocks, and a small museum beside "
    "the road tells the story of the men who worked there. On market days the bridge is closed to "
    "cars and the farmers sell their goods in the square."
)


# ---------------------------------------------------------------------------------------------
# Gopher quality, on real snippets
# ---------------------------------------------------------------------------------------------
def test_wiki_article_is_kept():
    text = _raw("wiki/wiki_2dee326f.txt")  # WikiText: judged by words (see test_alpha_basis_tokens_or_words)
    assert filter_document(text, CleanConfig(gopher_alpha_basis="words")) == ((True, None, None), "en")


def test_navigation_junk_is_a_short_doc():
    keep, reason, score = gopher_quality(_raw("snippets/snip_51b85460.txt"), CFG, "en")
    assert (keep, reason, score) == (False, "gopher_short_doc", 4.0)  # Home | About | Contact | Login


def test_symbol_line_has_no_words():
    keep, reason, score = gopher_quality(_raw("snippets/snip_d077aff1.txt"), CFG)  # a row of '*'
    assert not keep and reason == "gopher_short_doc" and score == 0.0


def test_good_text_passes_and_each_rule_can_fail():
    assert gopher_quality(GOOD, CFG, "en") == (True, None, None)
    # Stop words only count for English: the same words without them fail in English only.
    no_stops = " ".join(w for w in GOOD.split() if w.lower().strip(".,") not in {"the", "and", "to", "of", "that", "have", "with", "be"})
    assert gopher_quality(no_stops, CFG, "en")[:2] == (False, "gopher_stop_words")
    assert gopher_quality(no_stops, CFG, "de") == (True, None, None)
    assert gopher_quality("a b c d e " * 20, CFG)[:2] == (False, "gopher_mean_word_length")
    assert gopher_quality("x" * 12 + " " + ("internationalisation " * 60), CFG)[:2] == (False, "gopher_mean_word_length")
    hashtags = GOOD + " " + " ".join(f"#tag{i}" for i in range(20))
    keep, reason, score = gopher_quality(hashtags, CFG)
    assert (keep, reason) == (False, "gopher_symbol_word_ratio") and score > 0.1
    bullets = "\n".join(f"- item number {i} in the list of things" for i in range(20))
    assert gopher_quality(bullets, CFG)[:2] == (False, "gopher_bullet_lines")
    # One ellipsis per 9 words is over the 0.1 symbol ratio before the line rule is reached.
    # One ellipsis per 10 tokens ("..." is a token) is not over the 0.1 ratio; the line rule fires.
    ellipses = "\n".join(f"read more about the story of the day {i}..." for i in range(20))
    assert gopher_quality(ellipses, CFG) == (False, "gopher_ellipsis_lines", 1.0)
    numbers = " ".join(str(1000 + i) for i in range(80)) + " " + " ".join(GOOD.split()[:10])
    assert gopher_quality(numbers, CFG)[:2] == (False, "gopher_alpha_words")
    assert gopher_quality("word " * 100_001, CFG)[:2] == (False, "gopher_long_doc")


def test_ellipsis_lines_rule_alone():
    # Few symbols per word (long lines) but most lines end in an ellipsis.
    lines = [" ".join(GOOD.split()[:40]) + "..." for _ in range(3)] + [GOOD]
    keep, reason, score = gopher_quality("\n".join(lines), CFG)
    assert (keep, reason, score) == (False, "gopher_ellipsis_lines", 0.75)


def test_words_are_spacys_english_tokens_on_real_text():
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    for rel in ("wiki/wiki_2dee326f.txt", "web/web_00c293ca.txt", "snippets/snip_51b85460.txt"):
        text = _raw(rel)
        expected = [t.text.strip() for t in nlp(text) if t.text.strip()]
        assert list(words(text)) == expected, rel
    toks = words("Don't stop: it's 3.5 km (U.S. roads), e.g. well-known.")
    assert list(toks) == ["Do", "n't", "stop", ":", "it", "'s", "3.5", "km", "(", "U.S.", "roads", ")", ",",
                          "e.g.", "well", "-", "known", "."]
    assert (toks.n_real, toks.n_alpha) == (12, 11)  # 6 punctuation tokens; "3.5" has no letter


def test_alpha_basis_tokens_or_words():
    # WikiText's tokenised punctuation: under 80% of tokens have a letter, over 80% of words do.
    wiki = _raw("wiki/wiki_2dee326f.txt")
    keep, reason, score = gopher_quality(wiki, CFG, "en")
    assert (keep, reason) == (False, "gopher_alpha_words") and 0.7 < score < 0.8
    assert gopher_quality(wiki, CleanConfig(gopher_alpha_basis="words"), "en") == (True, None, None)


# ---------------------------------------------------------------------------------------------
# C4
# ---------------------------------------------------------------------------------------------
def test_c4_keeps_prose_and_drops_lorem_and_code():
    assert c4_quality(GOOD, CFG) == (True, None, None)
    assert c4_quality(GOOD + " Lorem Ipsum dolor sit amet.", CFG) == (False, "c4_lorem_ipsum", 1.0)
    assert c4_quality(GOOD + "\nUse {braces} for the set of all values.", CFG) == (False, "c4_curly_bracket", 1.0)
    # Only kept lines count: a heading with a brace (no terminal punctuation) is dropped as a line.
    assert c4_quality(GOOD + "\nfunction f() {", CFG) == (True, None, None)


def test_c4_line_rules_and_sentence_count():
    lines = [
        "Please enable JavaScript to view the comments.",  # javascript: line dropped
        "This site uses cookies to improve your experience.",  # policy: line dropped
        "Read more...",  # ellipsis
        "Home",  # no terminal punctuation
        "Yes.",  # under 3 words
        "The war ended in 1945.[1] It changed the map of Europe.[citation needed]",
    ]
    decision, kept = c4_lines("\n".join(lines), 5)
    assert kept == ["The war ended in 1945. It changed the map of Europe."]  # citations removed
    assert decision == (False, "c4_too_few_sentences", 2.0)  # two sentences in the one kept line
    assert count_sentences("One. Two! Three? Four") == 4
    assert c4_lines("\n".join(lines), 2)[0] == (True, None, None)
    assert c4_quality("One line. Two sentences here.", CleanConfig(c4_min_sentences=0)) == (True, None, None)


def test_c4_on_real_web_and_navigation_snippets():
    # English Web Treebank: a blog post is kept, a three-sentence review is too short for C4.
    assert c4_quality(_raw("web/web_042e0b97.txt"), CFG) == (True, None, None)
    assert c4_quality(_raw("web/web_00c293ca.txt"), CFG) == (False, "c4_too_few_sentences", 3.0)
    # Navigation junk has no line that ends in terminal punctuation.
    assert c4_quality(_raw("snippets/snip_51b85460.txt"), CFG) == (False, "c4_too_few_sentences", 0.0)


# ---------------------------------------------------------------------------------------------
# repetition
# ---------------------------------------------------------------------------------------------
def test_repetition_rules():
    assert gopher_repetition(GOOD, CFG) == (True, None, None)
    paras = "\n\n".join([GOOD, "Buy now and save.", "Buy now and save.", "Buy now and save.", "Call us."])
    keep, reason, score = gopher_repetition(paras, CFG)
    assert (keep, reason, score) == (False, "gopher_dup_para_frac", 0.4)  # 2 of 5 repeat an earlier one
    lines = "\n".join([GOOD] + ["Share this page"] * 5 + ["a", "b"])  # 4 of 8 lines repeat
    assert gopher_repetition(lines, CFG)[:2] == (False, "gopher_dup_line_frac")
    # One long repeated line: few lines repeat (1 of 4) but they hold most characters.
    long_dup = "\n".join([GOOD, GOOD, "short one", "short two"])
    assert gopher_repetition(long_dup, CFG)[:2] == (False, "gopher_dup_line_char_frac")
    spam = GOOD + " " + "click here " * 40
    keep, reason, score = gopher_repetition(spam, CFG)
    assert (keep, reason) == (False, "gopher_top_2gram") and score > 0.2


def test_top_ngram_fraction_definition():
    ws = "a b a b c".split()
    # "a b" twice: 3 chars * 2 over the text "a b a b c" (9 chars), or over a given text length.
    assert top_ngram_char_fraction(ws, 2) == pytest.approx(6 / 9)
    assert top_ngram_char_fraction(ws, 2, 12) == pytest.approx(6 / 12)
    # As datatrove: the most common n-gram counts even when it occurs once.
    assert top_ngram_char_fraction("one two three".split(), 2) == pytest.approx(7 / 13)


def test_dup_ngram_chars_jumps_past_repeats():
    ws = "a b c d e a b c d e a b c d e x".split()
    # The 5-gram "abcde" repeats at 5 and 10: each repeat adds 5 chars and jumps 5 words.
    assert dup_ngram_chars(ws, 5) == 10
    assert dup_ngram_chars("a b c d e f g".split(), 5) == 0
    spam = GOOD + " " + " ".join(["buy cheap watches online today"] * 12)
    keep, reason, score = quality_filters(spam, CFG, "en")
    assert not keep and reason.startswith("gopher_") and score > 0.1


# ---------------------------------------------------------------------------------------------
# language ID
# ---------------------------------------------------------------------------------------------
def test_language_id_en_de_zh():
    assert detect_language(GOOD)[0] == "en"
    de, conf = detect_language(_raw("snippets/snip_f5055cd9.txt"))
    assert de == "de" and 0.5 < conf <= 1.0
    zh_file = DATASETS / "chinese_text" / "gsdsimp_sentences.jsonl"
    if not zh_file.is_file():
        pytest.skip("chinese_text dataset not found")
    lines = zh_file.read_text(encoding="utf-8").splitlines()[:5]
    zh = "".join(json.loads(line)["text"] for line in lines)
    assert detect_language(zh)[0] == "zh"
    assert detect_language("**** 1234 ----") == (None, 0.0)
    # Word rules are skipped for Chinese (no spaces); the repetition line rules still run.
    assert filter_document(zh * 3, CFG)[0] == (True, None, None)


def test_allowed_languages():
    only_en = CleanConfig(allowed_languages=["en"])
    assert language_filter(GOOD, only_en, "en", 0.99) == (True, None, None)
    assert language_filter(GOOD, only_en, "de", 0.97) == (False, "language:de", 0.97)
    assert language_filter(GOOD, CFG, "de", 0.97) == (True, None, None)  # None: all allowed
    english = _raw("web/web_042e0b97.txt")
    book, _ = strip_gutenberg(_raw("gutenberg/pg_93436e14.txt"))  # Kafka, Die Verwandlung
    (keep, reason, score), lang = filter_document(book, only_en)
    assert (keep, reason, lang) == (False, "language:de", "de") and score > 0.9
    assert filter_document(english, only_en)[0] == (True, None, None)


# ---------------------------------------------------------------------------------------------
# Gutenberg
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,first_words", [
    ("pg_435c8288.txt", "CANDIDE"),  # "*** START OF THIS PROJECT GUTENBERG EBOOK" + "End of the ... EBook"
    ("pg_84015f96.txt", "Devil"),  # old etext: "*END*THE SMALL PRINT!" header, "End of The Project Gutenberg Etext"
    ("pg_b5e86506.txt", "NEWS FROM NOWHERE"),  # "***START OF THE PROJECT GUTENBERG EBOOK" without spaces
])
def test_gutenberg_header_and_footer_are_stripped(name, first_words):
    raw = _raw(f"gutenberg/{name}")
    text, changed = strip_gutenberg(raw)
    assert changed
    assert "*** START" not in text and "***START" not in text and "*** END" not in text
    assert "Project Gutenberg License" not in text and "SMALL PRINT" not in text.upper()
    assert "Project Gutenberg" not in text[-2000:]
    assert first_words.lower() in text[:3000].lower()
    assert 0.85 * len(raw) < len(text) < len(raw)  # the book stays


def test_text_without_markers_is_unchanged():
    assert strip_gutenberg(GOOD) == (GOOD, False)
    mention = GOOD + "\nThis text mentions Project Gutenberg once."
    assert strip_gutenberg(mention) == (mention, False)


# ---------------------------------------------------------------------------------------------
# clean stage integration
# ---------------------------------------------------------------------------------------------
def _doc(text: str, **md):
    return make_record("", text, task_type=md.pop("task_type", "text"), **md)


def test_clean_document_order_and_scope():
    stats: dict = {}
    out, reason, detail, score = clean_document(_doc(GOOD), CFG, stats)
    assert reason is None and out["metadata"]["lang"] == "en" and stats["languages"] == {"en": 1}
    short = "Home | About | Contact | Login | Imprint and more"
    assert clean_document(_doc(short), CFG)[1:4:2] == ("gopher_short_doc", 7.0)  # "|" is not a word
    # SFT pairs are not documents: the same short text passes as an instruction target.
    assert clean_document(_doc(short, task_type="instruction"), CFG)[1] is None
    assert clean_document(_doc(short), CleanConfig(quality_filters=False))[1] is None
    # Length rules still come first: a too_short text is not reported as a Gopher drop.
    assert clean_document(_doc("tiny"), CFG)[1] == "too_short"
    # Gutenberg strip comes before too_long: a book is judged without its licence.
    book = _raw("gutenberg/pg_435c8288.txt")
    big = CleanConfig(max_chars=len(book) - 1000)
    stats = {}
    out, reason, _, _ = clean_document(_doc(book), big, stats)
    assert reason is None and stats["gutenberg_stripped"] == 1
    assert "Project Gutenberg" not in out["target"][-3000:]


def test_stage_accounting_quarantine_scores_and_cache(make_cfg, ctx, records_manifest):
    records = [
        _doc(GOOD),
        _doc(GOOD.replace("river", "stream") + " Lorem ipsum dolor sit amet."),
        _doc("Click here to subscribe now for our newsletter!!!"),
        _doc(GOOD.replace("river", "lake") + " " + "click here " * 40),
        _doc("Kurzer Text ohne viel Inhalt, aber lang genug für die Längenregel."),
        make_record("What is the capital of France?", "Paris.", task_type="instruction"),
    ]
    up = records_manifest(records, parts=2)
    cfg = make_cfg()
    m = run_stage(clean, [up], cfg, ctx)
    c = m.counters
    assert c["in"] == 6 and c["out"] == 2
    assert c["rejected"] == {"c4_lorem_ipsum": 1, "gopher_short_doc": 2, "gopher_top_2gram": 1}
    assert m.stats["filtered"] == c["rejected"]
    assert m.stats["languages"]["en"] >= 3
    q = [r for p in m.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
    assert len(q) == 4
    assert {r["reason"] for r in q} == set(c["rejected"])
    assert all(r["score"] is not None for r in q)
    kept = [r for p in m.files_with("data") for r in pq.read_table(p).to_pylist()]
    assert {r["metadata"]["task_type"] for r in kept} == {"text", "instruction"}
    assert next(r for r in kept if r["metadata"]["task_type"] == "text")["metadata"]["lang"] == "en"
    # Per-filter report: drop counts per filter family and reason, score quantiles, a PNG.
    report = json.loads(m.file("filter_stats.json").read_text(encoding="utf-8"))
    assert report["documents_in"] == 6
    assert report["filters"]["gopher"] == {"dropped": 3, "reasons": {"gopher_short_doc": 2, "gopher_top_2gram": 1}}
    assert report["filters"]["c4"] == {"dropped": 1, "reasons": {"c4_lorem_ipsum": 1}}
    assert report["scores"]["gopher_short_doc"]["n"] == 2 and report["scores"]["gopher_top_2gram"]["min"] > 0.2
    assert m.file("filter_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert {e.path for e in m.entries("report")} == {"filter_stats.json", "filter_scores.png"}
    assert run_stage(clean, [up], cfg, ctx).stats["cache"] == "hit"
    # Config changes the key: only English allowed drops nothing more here (the German text is
    # already a short doc), but the German snippet is now reported by its language.
    m2 = run_stage(clean, [up], make_cfg({"clean": {"allowed_languages": ["en"]}}), ctx)
    assert m2.stats["cache"] == "computed"
    assert m2.counters["rejected"].get("language:de") == 1
    assert m2.counters["rejected"]["gopher_short_doc"] == 1
