"""augment: word-level noise, the per-task-type cap, ids/metadata, determinism, and the stage."""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from corpus2model.schemas.config import AugmentConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks import augment
from corpus2model.tasks.augment import Candidates, augment_records, word_dropout, word_swap
from corpus2model.tasks.stage import run_stage

TEXT = "the quick brown fox jumps over\nthe lazy dog while the cat sleeps"


# --------------------------------------------------------------------------------------------
# edits
# --------------------------------------------------------------------------------------------
def test_word_swap_swaps_adjacent_pairs_and_keeps_layout():
    assert word_swap("a b c d e", 0.999999, random.Random(0)) == "b a d c e"
    assert word_swap("a b  c\nd", 0.999999, random.Random(0)) == "b a  d\nc"
    for seed in range(20):
        out = word_swap(TEXT, 0.3, random.Random(seed))
        assert sorted(out.split()) == sorted(TEXT.split())
        assert re.split(r"\S+", out) == re.split(r"\S+", TEXT)  # every separator where it was
    assert word_swap(TEXT, 0.3, random.Random(7)) == word_swap(TEXT, 0.3, random.Random(7))
    assert word_swap("  lone  ", 0.9, random.Random(0)) == "  lone  "


def test_word_swap_changes_something_at_high_p():
    changed = sum(word_swap(TEXT, 0.5, random.Random(s)) != TEXT for s in range(20))
    assert changed >= 18


def test_word_dropout_keeps_order_and_never_drops_everything():
    words = TEXT.split()
    for seed in range(30):
        out = word_dropout(TEXT, 0.3, random.Random(seed)).split()
        it = iter(words)
        assert all(w in it for w in out)  # a subsequence: order kept, nothing invented
        assert 1 <= len(out) <= len(words)
    for seed in range(20):
        out = word_dropout("one two three", 0.999999, random.Random(seed))
        assert out in {"one", "two", "three"}


def test_word_dropout_keeps_line_breaks_when_words_vanish():
    # Dropping "over" and "the" around the line break keeps the break, not a space.
    text = "alpha over\nthe beta"
    outs = {word_dropout(text, 0.5, random.Random(s)) for s in range(200)}
    assert "alpha\nbeta" in outs
    assert "alpha beta" not in outs
    assert all("  " not in o for o in outs)


# --------------------------------------------------------------------------------------------
# augment_records
# --------------------------------------------------------------------------------------------
def _rec(i, task_type, words=10):
    inp = " ".join(f"w{i}_{j}" for j in range(words))
    return make_record(inp, f"answer {i}", task_type=task_type, domain="d", source="s", source_path=f"{task_type}.jsonl", source_line=i)


def _corpus():
    return (
        [_rec(i, "math_qa") for i in range(30)]
        + [_rec(100 + i, "instruction") for i in range(10)]
        + [_rec(200 + i, "instruction", words=3) for i in range(2)]  # too short to be parents
        + [_rec(300 + i, "text") for i in range(6)]  # not an augmented task type
    )


def _cfg(**kw):
    # The cap/id/determinism tests use noise on synthetic tokens: opted in, and no LM gate (tokens
    # like "w3_7" have no fluency to judge); the gate has tests of its own on real text below.
    base = dict(methods=["word_swap"], max_ratio=1 / 3, task_types=["instruction", "math_qa"], probability=0.3, min_words=8, seed=0,
                noise_task_types=["instruction", "math_qa"], max_perplexity_ratio=None)
    return AugmentConfig(**{**base, **kw})


def test_cap_is_respected_per_task_type():
    recs = _corpus()
    added = augment_records(recs, _cfg())
    by_type = Counter(r["metadata"]["task_type"] for r in added)
    originals = Counter(r["metadata"]["task_type"] for r in recs)
    assert by_type["math_qa"] == math.floor(originals["math_qa"] / 3) == 10
    assert by_type["instruction"] == math.floor(originals["instruction"] / 3) == 4
    assert "text" not in by_type
    for tt, n in by_type.items():
        assert n <= math.floor(1 / 3 * originals[tt])


def test_ids_metadata_and_target():
    recs = _corpus()
    parents = {r["id"]: r for r in recs}
    added = augment_records(recs, _cfg(methods=["word_swap", "word_dropout"]))
    assert len({r["id"] for r in added}) == len(added)
    for a in added:
        pid, k = a["id"].split("#aug")
        assert k == "1"
        p = parents[pid]
        md = a["metadata"]
        assert md["parent_id"] == pid and md["aug_method"] in {"word_swap", "word_dropout"}
        assert {k: v for k, v in md.items() if k not in ("parent_id", "aug_method")} == {
            k: v for k, v in p["metadata"].items() if k not in ("parent_id", "aug_method")}
        assert a["target"] == p["target"]
        assert a["input"] != p["input"]
        assert len(p["input"].split()) >= 8
    # Round robin: both methods used, alternating across parents of one task type.
    methods = [a["metadata"]["aug_method"] for a in added if a["metadata"]["task_type"] == "math_qa"]
    assert abs(methods.count("word_swap") - methods.count("word_dropout")) <= 2


def test_deterministic_across_calls_and_input_order():
    recs = _corpus()
    a = augment_records(recs, _cfg())
    shuffled = recs[:]
    random.Random(3).shuffle(shuffled)
    b = augment_records(shuffled, _cfg())
    assert a == augment_records(recs, _cfg())
    assert sorted(a, key=lambda r: r["id"]) == sorted(b, key=lambda r: r["id"])
    c = augment_records(recs, _cfg(seed=1))
    assert {r["id"] for r in c} != {r["id"] for r in a}


def test_unchanged_output_is_skipped_and_next_parent_tried():
    # Inputs of one repeated word never change under a swap: those parents are skipped.
    same = [make_record(" ".join(["la"] * 10), f"song {i}", task_type="instruction") for i in range(6)]
    varied = [_rec(i, "instruction") for i in range(6)]
    cands = Candidates(_cfg(max_ratio=0.5))
    for r in same + varied:
        cands.add(r)
    added, stats = cands.augment()
    assert len(added) == 6  # floor(0.5 * 12): all from the varied parents
    assert {r["metadata"]["parent_id"] for r in added} <= {r["id"] for r in varied}
    assert stats["no_change"] >= 6
    assert stats["task_types"]["instruction"] == {"originals": 12, "eligible": 12, "cap": 6, "augmented": 6, "ratio": 0.5}


def test_ratio_above_one_gives_several_augmentations_per_parent():
    recs = [_rec(i, "math_qa", words=12) for i in range(4)]
    added = augment_records(recs, _cfg(max_ratio=2.0, methods=["word_swap", "word_dropout"]))
    assert len(added) == 8
    ks = Counter(a["metadata"]["parent_id"] for a in added)
    assert set(ks.values()) == {2}
    assert {a["id"].rsplit("#aug", 1)[1] for a in added} == {"1", "2"}
    per_parent = {}
    for a in added:
        per_parent.setdefault(a["metadata"]["parent_id"], set()).add(a["input"])
    assert all(len(v) == 2 for v in per_parent.values())  # two different edits, not a repeat


def test_augmented_records_are_not_parents_or_originals():
    recs = [_rec(i, "math_qa") for i in range(9)]
    first = augment_records(recs, _cfg())
    second = augment_records(recs + first, _cfg())
    assert second == first  # the 3 augmented ones neither raise the cap nor get re-noised


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def test_stage_counters_output_and_cache_hit(make_cfg, ctx, records_manifest):
    recs = _corpus()
    up = records_manifest(recs, parts=2)
    cfg = make_cfg({"augment": {"methods": ["word_swap", "word_dropout"], "probability": 0.3,
                                "noise_task_types": ["instruction", "math_qa"], "max_perplexity_ratio": None}})
    m = run_stage(augment, [up], cfg, ctx)
    c = m.counters
    assert c == {"in": 48, "added": 14, "out": 62, "rejected": {}, "duplicates": 0}
    assert m.stats["candidates"] == m.stats["accepted"] == 14 and m.stats["rejected_by_reason"] == {}
    assert m.stats["task_types"]["math_qa"]["augmented"] == 10
    assert m.stats["task_types"]["instruction"]["augmented"] == 4
    assert m.stats["task_types"]["text"]["augmented"] == 0
    assert sum(m.stats["methods"].values()) == 14

    rows = [r for p in m.files_with("data") for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 62 == sum(e.records for e in m.entries("data"))
    assert rows[:48] == recs  # originals first, unchanged, in input order
    assert rows[48:] == augment_records(recs, cfg.augment)

    again = run_stage(augment, [up], cfg, ctx)
    assert again.stats["cache"] == "hit"


def test_stage_with_nothing_to_augment(make_cfg, ctx, records_manifest):
    recs = [_rec(i, "text") for i in range(5)]
    m = run_stage(augment, [records_manifest(recs)], make_cfg(), ctx)
    assert m.counters == {"in": 5, "added": 0, "out": 5, "rejected": {}, "duplicates": 0}


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_small_ratio_adds_nothing_below_one_record(ratio):
    assert augment_records([_rec(i, "math_qa") for i in range(9)], _cfg(max_ratio=ratio)) == []


# --------------------------------------------------------------------------------------------
# synonym replacement (WordNet thesaurus bundled in data/thesaurus)
# --------------------------------------------------------------------------------------------
from corpus2model.tasks.text.thesaurus import TABLE, load_table, replaceable, synonym_replace  # noqa: E402

SYN_TEXT = "The big dog will begin to run. BIG cars are quick, said Big Bill."


def test_thesaurus_table_is_bundled_small_and_licensed():
    table = load_table()
    assert 1000 < len(table) < 20000
    assert TABLE.stat().st_size < 2_000_000
    assert "large" in table["big"] and "start" in table["begin"]
    assert "autos" in table["cars"] and "began" not in table and "stopped" not in table  # regular inflections only
    assert all(w.isalpha() and w.islower() for syns in table.values() for w in syns)
    lic = (TABLE.parent / "LICENSE").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in lic


def test_synonym_replace_keeps_case_layout_and_other_words():
    table = load_table()
    words = [m.group(0) for m in replaceable(SYN_TEXT, table)]
    assert words == ["cars"]  # "begin" -> "start"/"commence" is not mutual in the table: not replaced blind
    # "Big Bill" is capitalised mid-sentence (a name), so no occurrence of "big" is replaced: all or none.
    assert "big" not in words and "BIG" not in words and "Bill" not in words
    for seed in range(20):
        out = synonym_replace(SYN_TEXT, 0.5, random.Random(seed), table)
        assert out != SYN_TEXT
        assert re.split(r"[A-Za-z]+", out) == re.split(r"[A-Za-z]+", SYN_TEXT)  # punctuation/space kept
        for a, b in zip(re.findall(r"[A-Za-z]+", SYN_TEXT), re.findall(r"[A-Za-z]+", out)):
            if a != b:
                assert b.lower() in table[a.lower()]
                assert (a.isupper(), a[0].isupper()) == (b.isupper(), b[0].isupper())
    assert synonym_replace(SYN_TEXT, 0.5, random.Random(3), table) == synonym_replace(SYN_TEXT, 0.5, random.Random(3), table)
    assert synonym_replace("Zxq wvv 42.", 0.9, random.Random(0), table) == "Zxq wvv 42."


def test_synonym_method_changes_input_only_and_split_follows_parent():
    from corpus2model.schemas.records import records_table
    from corpus2model.tasks.shard import split_codes

    recs = [make_record(f"Question {i}: the big dog began to run quickly, how far did it go?", f"{i} km",
                        task_type="math_qa") for i in range(60)]
    added = augment_records(recs, _cfg(methods=["synonym", "word_swap"], max_ratio=1.0))
    assert len(added) == 60
    assert all("km" not in a["input"].split() for a in added)
    assert Counter(a["metadata"]["aug_method"] for a in added) == {"synonym": 30, "word_swap": 30}
    parents = {r["id"]: r for r in recs}
    for a in added:
        assert a["target"] == parents[a["metadata"]["parent_id"]]["target"]
    # shard buckets an augmented record by its parent: no copy of an evaluation record in train.
    table = records_table(recs + added)
    splits = {"train": 0.6, "validation": 0.2, "test": 0.2}
    codes = split_codes(table, splits, seed=0)
    by_id = dict(zip(table.column("id").to_pylist(), codes))
    assert len(set(codes[:60])) == 3  # the parents really are spread over the splits
    assert all(by_id[a["id"]] == by_id[a["metadata"]["parent_id"]] for a in added)


def test_ratio_per_task_type_override():
    recs = _corpus()
    added = augment_records(recs, _cfg(max_ratio_by_task={"math_qa": 0.1, "instruction": 0.5}))
    by_type = Counter(r["metadata"]["task_type"] for r in added)
    assert by_type == {"math_qa": 3, "instruction": 6}  # floor(0.1 * 30), floor(0.5 * 12)


def test_backtranslate_without_translator_is_an_error():
    with pytest.raises(ValueError, match="no translator"):
        augment_records(_corpus(), _cfg(methods=["backtranslate"]))


def test_demo_config_augments_without_a_translation_model():
    from corpus2model.schemas.config import load_config

    cfg = load_config(augment.Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert "backtranslate" not in cfg.augment.methods and "synonym" in cfg.augment.methods
    extra = augment.key_extra(type("C", (), {"augment": cfg.augment})())
    assert set(extra) == {"thesaurus", "lm_reference"} and len(extra["thesaurus"]) == 64  # a rebuilt table reruns augment
    assert extra["lm_reference"] and all(len(v) == 64 for v in extra["lm_reference"].values())  # so does a new LM reference
    # issue 15: the demo no longer pairs word-noised math/instruction prompts with their answers.
    assert not set(cfg.augment.methods) & {"word_swap", "word_dropout"} and cfg.augment.max_perplexity_ratio


# --------------------------------------------------------------------------------------------
# issue 15: rewrites that keep the meaning, noise only where opted in, the perplexity gate
# --------------------------------------------------------------------------------------------
from corpus2model.schemas.config import ConfigError, parse_config  # noqa: E402
from corpus2model.tasks.text.lmscore import load_model, perplexity  # noqa: E402
from corpus2model.tasks.text.thesaurus import leftover_words, usable_synonyms  # noqa: E402

# Real snippets from the demo corpus (data/sample, GSM8K-style math_qa), the kind issue 15 quotes.
BALLOONS = ("There were 20 red balloons and 15 green balloons at the party. During the party, 3 red and 2 green "
            "balloons burst. How many balloons are left?")
CARS = ("Rick wants to buy two large cars for his shop. Each car costs $3000 and a dozen tires cost $400. "
        "Instead he decides to buy one car and quit the plan. How much does he spend?")
FLUENT = ("Rafael works 10 hours on Monday and 8 hours on Tuesday on his delivery job. With 20 hours left to work "
          "in the week, how much money does Rafael make if he is paid $20 per hour?")


def _vocab():
    return load_model()["vocab"]


@pytest.mark.parametrize("text", [BALLOONS, CARS, FLUENT])
def test_synonym_replacement_is_consistent_within_a_record(text):
    table = load_table()
    changed = 0
    for seed in range(40):
        out = synonym_replace(text, 0.5, random.Random(seed), table)
        old = re.findall(r"[A-Za-z]+(?:['-][A-Za-z]+)*", text)
        new = re.findall(r"[A-Za-z]+(?:['-][A-Za-z]+)*", out)
        assert len(old) == len(new)
        by_word: dict[str, set[str]] = {}
        for a, b in zip(old, new):
            by_word.setdefault(a.lower(), set()).add(b.lower())
        for a, outs in by_word.items():
            assert len(outs) == 1, (a, outs, out)  # every occurrence replaced the same way, or none
        assert leftover_words(text, out) == []
        changed += out != text
    assert changed >= 30  # these snippets do have replaceable words


def test_synonym_never_touches_target_words_numbers_names_or_function_words():
    table = load_table()
    assert "red" in [m.group(0) for m in replaceable(BALLOONS, table)]
    # A word of the target is left alone (the answer must still match the question).
    assert "red" not in [m.group(0) for m in replaceable(BALLOONS, table, protect="3 red balloons burst, 30 are left")]
    assert "red" not in [m.group(0) for m in replaceable(BALLOONS, table, protect="Red ones: 30")]  # case-blind
    words = {m.group(0).lower() for m in replaceable(CARS, table)}
    assert {"buy", "large"} <= words
    assert not words & {"dozen", "instead", "rick", "two", "one"}  # numbers, a discourse adverb, a name
    assert not words & {"car", "cars"}  # one lemma in two forms: left alone rather than replaced in one form only
    assert "dozen" in table and "instead" in table  # the table has them: the filter is what keeps them
    text = "The team met Frank at noon. Frank said the game was over and the players quit early."
    assert "frank" not in {m.group(0).lower() for m in replaceable(text, table)}  # a name, also at a sentence start
    # Sense: "quit" (as in "players quit") -> "discontinue"/"cease": WordNet has no sense counts per
    # context here, so the filter the augmenter uses is the LM reference vocabulary (rare, formal
    # synonyms go) on top of mutual synonyms. Without the vocabulary they would still be offered.
    assert "discontinue" in usable_synonyms("quit", table)
    assert usable_synonyms("quit", table, _vocab()) == ()
    assert usable_synonyms("buy", table, _vocab()) == ("purchase",)
    recs = [make_record(CARS, "He spends $3400 on one car and a dozen tires.", task_type="math_qa") for _ in range(3)]
    cands = Candidates(_cfg(methods=["synonym"], max_ratio=1.0, noise_task_types=[]))
    for r in recs:
        cands.add(r)
    added, _ = cands.augment()
    assert added
    for a in added:
        assert leftover_words(CARS, a["input"], a["target"]) == []
        for w in ("car", "dozen", "Instead", "Rick", "$3000", "quit"):
            assert w in a["input"]


def test_noise_methods_are_refused_for_targeted_task_types_unless_opted_in():
    with pytest.raises(Exception, match="noise_task_types") as e:
        AugmentConfig(methods=["synonym", "word_swap"], task_types=["math_qa", "text"])
    assert "math_qa" in str(e.value) and "text" not in str(e.value).split("targeted types")[1].split("]")[0]
    with pytest.raises(ConfigError, match="noise_task_types: \\['instruction'\\]"):
        parse_config({"augment": {"methods": ["word_dropout"], "task_types": ["instruction"]}})
    AugmentConfig(methods=["word_swap"], task_types=["text"])  # no target: noise is allowed
    cfg = AugmentConfig(methods=["synonym", "word_swap"], task_types=["math_qa"], noise_task_types=["math_qa"])
    assert Candidates(cfg).methods_for("math_qa") == ["synonym", "word_swap"]
    # A config built around the validator still never noises a targeted type that did not opt in.
    raw = AugmentConfig.model_construct(**{**AugmentConfig().model_dump(), "methods": ["synonym", "word_swap"]})
    assert Candidates(raw).methods_for("math_qa") == ["synonym"]
    assert Candidates(raw).methods_for("text") == ["synonym", "word_swap"]


def test_perplexity_gate_rejects_a_scrambled_rewrite_and_keeps_a_fluent_one():
    cands = Candidates(_cfg(methods=["synonym"], max_perplexity_ratio=1.15, noise_task_types=[]))
    scrambled = " ".join(reversed(FLUENT.split()))
    fluent = FLUENT.replace("job", "occupation")
    bad, _ = cands.perplexity_ratio("p", FLUENT, scrambled)
    good, detail = cands.perplexity_ratio("p", FLUENT, fluent)
    assert bad > 1.15 >= good and detail.startswith("ppl ")
    assert perplexity(load_model(), scrambled) > perplexity(load_model(), FLUENT)
    # Through the augmenter: strong word_swap noise (opted in) is rejected with reason and score.
    recs = [make_record(t, "answer", task_type="math_qa", source_line=i) for i, t in enumerate([FLUENT, BALLOONS, CARS] * 2)]
    cands = Candidates(_cfg(methods=["word_swap"], probability=0.6, max_ratio=1.0, max_perplexity_ratio=1.15))
    for r in recs:
        cands.add(r)
    added, stats = cands.augment()
    n_rej = stats["rejected_by_reason"].get(augment.GATE_REASON, 0)
    assert n_rej >= 3 and len(cands.rejected) == n_rej
    assert stats["candidates"] == stats["accepted"] + n_rej == len(added) + n_rej
    for row in cands.rejected:
        assert row["score"] > 1.15 and row["method"] == "word_swap" and row["candidate"] != row["original"]
    for a in added:  # what was kept passed the gate
        parent = next(r for r in recs if r["id"] == a["metadata"]["parent_id"])
        assert perplexity(load_model(), a["input"]) <= 1.15 * perplexity(load_model(), parent["input"]) + 1e-6


def test_stage_quarantines_rejected_candidates_and_writes_the_samples_report(make_cfg, ctx, records_manifest):
    recs = [make_record(t, f"answer {i}", task_type="math_qa", source_line=i)
            for i, t in enumerate([FLUENT, BALLOONS, CARS] * 4)]
    cfg = make_cfg({"augment": {"methods": ["synonym", "word_swap"], "probability": 0.6, "max_ratio": 1.0,
                                "task_types": ["math_qa"], "noise_task_types": ["math_qa"], "max_perplexity_ratio": 1.15}})
    m = run_stage(augment, [records_manifest(recs)], cfg, ctx)
    c, st = m.counters, m.stats
    assert c["in"] == 12 and c["out"] == 12 + c["added"] and c["rejected"] == {}  # candidates are not input records
    assert st["candidates"] == st["accepted"] + sum(st["rejected_by_reason"].values()) and st["accepted"] == c["added"]
    assert st["rejected_by_reason"].get(augment.GATE_REASON, 0) >= 1
    (q,) = m.files_with("quarantine")
    rows = pq.read_table(q).to_pylist()
    assert len(rows) == sum(st["rejected_by_reason"].values())
    assert all(r["reason"] and r["score"] is not None and r["candidate"] for r in rows)
    (html,) = m.files_with("html")
    page = html.read_text(encoding="utf-8")
    assert "<table>" in page and "Accepted rewrites" in page and "Rejected candidates" in page
    added = [r for p in m.files_with("data") for r in pq.read_table(p).to_pylist()][12:]
    assert added and added[0]["input"].split()[0] in page
