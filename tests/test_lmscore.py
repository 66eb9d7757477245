"""The LM-score filter (tasks/text/lmscore.py): a Kneser-Ney trigram on the bundled reference text,
its cache keyed by the reference's sha256, and the decisions it makes on real snippets."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from corpus2model.schemas.config import CleanConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks.clean import clean_document
from corpus2model.tasks.text.lmscore import REFERENCE, UNK, _prob, lm_filter, load_model, perplexity, train

RAW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raw_text_corpus" / "raw"
PROSE = ("The government said on Tuesday that it would not change the law before the election, "
         "despite pressure from opposition parties and several members of its own party.")


def test_kneser_ney_distributions_sum_to_one():
    model = train("the cat sat on the mat .\nthe dog sat on the log .\na cat saw the dog .\n" * 3 + "the rug\n")
    vocab = sorted(model["vocab"] - {"<s>"})
    for ctx in [("<s>", "<s>"), ("the", "cat"), ("sat", "on"), ("zebra", "the"), ("zebra", "quokka")]:
        total = sum(_prob(model, *ctx, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-9), ctx
    assert UNK in model["vocab"]  # singletons ("rug") became <unk>


def test_model_is_cached_by_reference_sha(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "a.txt").write_text("one two three .\none two four .\n" * 5, encoding="utf-8")
    cache = tmp_path / "cache"
    m1 = load_model(ref, cache)
    files = list(cache.glob("*.pkl"))
    assert len(files) == 1
    load_model.cache_clear()
    assert load_model(ref, cache)["p_tri"] == m1["p_tri"]  # read back from the pickle
    (ref / "a.txt").write_text("five six seven .\n" * 5, encoding="utf-8")
    load_model.cache_clear()
    load_model(ref, cache)
    assert len(list(cache.glob("*.pkl"))) == 2  # edited reference: a new model, the old file is not reused
    load_model.cache_clear()


def test_prose_scores_far_below_junk():
    model = load_model(REFERENCE)
    prose = perplexity(model, PROSE)
    lorem = perplexity(model, "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.")
    spam = perplexity(model, "cheap viagra buy now cheap pills discount casino bonus free spins best price")
    german = perplexity(model, "Die Regierung sagte am Dienstag, dass sie das Gesetz vor der Wahl nicht ändern werde.")
    assert prose < 1000 < 100 * prose < min(lorem, spam, german)
    assert perplexity(model, "  \n ") is None
    assert math.isfinite(perplexity(model, "zzqx vvbn"))


def test_lm_filter_decisions_on_real_snippets():
    if not RAW.is_dir():
        pytest.skip("shared corpus not found")
    cfg = CleanConfig(lm_max_perplexity=100_000)
    review = (RAW / "web" / "web_042e0b97.txt").read_text(encoding="utf-8")
    keep, reason, ppl = lm_filter(review, cfg, "en")
    assert keep and reason is None and 100 < ppl < 100_000
    nav = (RAW / "snippets" / "snip_51b85460.txt").read_text(encoding="utf-8")  # Home | About | Contact | Login
    keep, reason, ppl = lm_filter(nav, cfg, "en")
    assert (keep, reason) == (False, "lm_perplexity") and ppl > 100_000
    assert lm_filter(nav, CleanConfig(), "en") == (True, None, None)  # off by default
    assert lm_filter(nav, cfg, "de") == (True, None, None)  # an English model judges English only


def test_clean_stage_drops_with_the_perplexity_as_score():
    import random

    # Rare English words (none in the reference) with stop words, in sentence-shaped lines: every
    # Gopher and C4 rule keeps it, language ID says English, the LM finds it improbable.
    rare = ("quixotic zephyr obsequious sesquipedalian lugubrious perspicacious defenestration "
            "crepuscular pusillanimous tintinnabulation grandiloquent ebullient mellifluous "
            "susurrus petrichor vellichor halcyon limerence phosphorescent ineffable").split()
    rng = random.Random(3)
    lines = []
    for _ in range(8):
        ws = [rng.choice(rare) if i % 2 else rng.choice(["the", "and", "of", "with", "to"]) for i in range(14)]
        lines.append(" ".join(ws).capitalize() + ".")
    rec = make_record("", "\n".join(lines), task_type="text")
    cfg = CleanConfig(lm_max_perplexity=100_000)
    stats: dict = {}
    out, reason, detail, score = clean_document(rec, cfg, stats)
    assert (out, reason) == (None, "lm_perplexity") and score > 100_000
    assert stats["scores"]["lm_perplexity"] == [score]
    out, reason, _, _ = clean_document(make_record("", "\n".join(lines), task_type="instruction"), cfg)
    assert reason is None  # not a quality_task_type: never judged
