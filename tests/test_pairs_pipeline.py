"""Preference records through the data stages: ingest keeps {prompt, chosen, rejected} lines as pairs,
clean applies its rules to each text, dedup compares prompt+chosen, augment passes them, validate checks
them with the preference_pairs suite, shard writes pairs/<split>-NNNNN.parquet, tokenize leaves them out,
and DPO trained from the shards matches DPO trained from the same pairs file."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from corpus2model.flows.stages import STAGES
from corpus2model.schemas.records import make_pair, pair_content_hash, pairs_table
from corpus2model.tasks import clean, dedup, shard
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.model import dpo
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, run_stage, sha256_file
from helpers import chain_config, learnable_records


def pair_lines(n: int) -> list[dict]:
    """Distinct, already-clean pairs (clean changes none of their text, dedup removes none)."""
    out = []
    for i in range(n):
        a, b = 3 + i, 40 + 2 * i
        out.append({"id": f"p{i:03d}", "prompt": f"Human: task {i}: what is {a} plus {b}?\n\nAssistant:",
                    "chosen": f"Happy to help with task {i}: {a} plus {b} is {a + b}.",
                    "rejected": f"No. Task {i} is not my problem, go away."})
    return out


def write_raw(root, pairs: list[dict], extra_lines: list[str] = ()) -> None:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    recs = [{"id": r["id"], "input": r["input"], "target": r["target"],
             "metadata": {k: r["metadata"][k] for k in ("task_type", "domain", "source")}} for r in learnable_records(120)]
    for r in recs:
        r["metadata"]["source"] = "test"
    (raw / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    (raw / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    if extra_lines:  # a file of its own: the file route (finetune.dpo.pairs_path) reads pairs.jsonl as it is
        (raw / "more.jsonl").write_text("".join(extra_lines), encoding="utf-8")


def run_data_stages(root, cfg, upto: str = "shard") -> dict[str, Manifest]:
    ctx = StageContext(store=Store(cfg.paths.store))
    done = {"source": scan_raw(root / "raw", cfg.ingest.include, ctx.store)}
    for name in ("ingest", "clean", "dedup", "augment", "validate", "shard", "tokenize", "finetune"):
        done[name] = run_stage(STAGES[name], [done[s] for s in STAGES[name].inputs], cfg, ctx)
        if name == upto:
            break
    return done


def pairs_manifest(root, pairs: list[dict], name: str = "up", records: list[dict] = ()) -> Manifest:
    """An upstream output holding one records part (empty unless ``records``) and one pairs part."""
    from corpus2model.schemas.records import records_table

    folder = root / name
    (folder / "parts").mkdir(parents=True)
    (folder / "pairs").mkdir()
    pq.write_table(records_table(list(records)), folder / "parts" / "a.parquet")
    pq.write_table(pairs_table(pairs), folder / "pairs" / "a.parquet")
    files = [FileEntry(p, (folder / p).stat().st_size, sha256_file(folder / p), role, k)
             for p, role, k in (("parts/a.parquet", "data", len(records)), ("pairs/a.parquet", "pairs", len(pairs)))]
    return Manifest(stage=name, stage_version="1", key=name, files=files, path=str(folder),
                    counters={"in": len(pairs), "out": len(pairs), "rejected": {}, "duplicates": 0})


def test_clean_pair_applies_the_rules_to_each_text(make_cfg):
    c = make_cfg({"clean": {"min_chars": 10}}).clean
    pair = make_pair("Human: hi\u200b  there\r\n\nAssistant:", "  Mail me at bob@example.com  ", "No.")
    out, reason, _, _ = clean.clean_pair(pair, c)
    assert reason is None and out["id"] == pair["id"] and out["metadata"] == pair["metadata"]
    assert out["prompt"] == "Human: hi there\n\nAssistant:" and out["chosen"] == "Mail me at <EMAIL>"
    assert clean.clean_pair(make_pair("Human: hi\n\nAssistant:", " \u200b ", "No."), c)[1] == "empty_chosen"
    assert clean.clean_pair(make_pair("Human: hi\n\nAssistant:", "Sure  thing.", "Sure thing."), c)[1] == "chosen_equals_rejected"
    assert clean.clean_pair(make_pair("x" * 40_000, "a", "b"), c)[1] == "too_long"


def test_dedup_compares_prompt_and_chosen(tmp_path, make_cfg, ctx):
    base = pair_lines(4)
    pairs = [make_pair(p["prompt"], p["chosen"], p["rejected"], source_path="p.jsonl", source_line=i + 1)
             for i, p in enumerate(base)]
    # the same prompt and preferred answer (other case and spacing) against another rejected answer: one pair
    d = base[1]
    pairs.append(make_pair(d["prompt"].upper(), d["chosen"] + "  ", "Something else entirely.", source_path="p.jsonl",
                           source_line=9))
    up = pairs_manifest(tmp_path, pairs)
    m = run_stage(dedup, [up], make_cfg(), ctx)
    assert m.counters == {"in": 5, "out": 4, "rejected": {}, "duplicates": 1}
    kept = shard.read_pairs(m.files_with("pairs"))
    assert [p["id"] for p in kept] == [p["id"] for p in pairs[:4]]
    (removed,) = pq.read_table(m.file("removed_pairs.parquet")).to_pylist()
    assert removed["id"] == pairs[4]["id"] and removed["duplicate_of"] == pairs[1]["id"] and removed["kind"] == "exact"
    assert m.stats["pairs"]["exact_duplicates"] == 1


def test_validate_reports_pairs_that_fail_the_suite(tmp_path, make_cfg):
    from corpus2model.tasks.validate.stage import _validate_pairs

    p = pair_lines(2)
    pairs = [make_pair(x["prompt"], x["chosen"], x["rejected"], source_path="p.jsonl", source_line=1) for x in p]
    report, files, failing = _validate_pairs(pairs_table(pairs), make_cfg().validate_, tmp_path, "validate")  # one id twice
    assert not report.success and report.error_failed == 1
    assert {r["reason"] for r in failing.to_pylist()} == {"expectation:expect_column_values_to_be_unique:id"}
    assert (tmp_path / "pairs_failing_rows.parquet").is_file() and (tmp_path / "pairs_data_docs" / "index.html").is_file()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_pairs_flow_to_shards_and_dpo_matches_the_file_route(tmp_path):
    pairs = pair_lines(80)
    write_raw(tmp_path, pairs, ['{"prompt": "Human: half a pair\\n\\nAssistant:", "chosen": "yes"}\n'])
    dpo_cfg = {"objective": "dpo", "max_steps": 8, "eval_every": 4, "batch_size": 8,
               "dpo": {"max_prompt_tokens": 24, "max_response_tokens": 16}}
    cfg = chain_config(tmp_path, finetune=dpo_cfg)
    m = run_data_stages(tmp_path, cfg, upto="finetune")

    ing = m["ingest"]
    assert ing.stats["pairs"] == 80 and ing.counters["rejected"] == {"incomplete_pair": 1}
    (q,) = [r for p in ing.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
    assert q["source_path"] == "more.jsonl" and q["source_line"] == 1 and "not rejected" in q["detail"]
    first = shard.read_pairs(ing.files_with("pairs"))[0]
    assert first["metadata"]["source_path"] == "pairs.jsonl" and first["metadata"]["source_line"] == 1
    assert first["metadata"]["source_id"] == "p000" and first["metadata"]["source_sha256"]
    # every stage counts the pairs among its records; augment passes them through untouched
    assert m["augment"].stats["pairs_passed"] == 80 and m["clean"].stats["pairs"] == 80
    assert m["validate"].stats["pairs"]["rows"] == 80 and m["validate"].stats["pairs"]["errors_failed"] == 0
    assert m["shard"].counters["in"] == m["validate"].counters["out"] == m["augment"].counters["out"]
    assert sum(v["records"] for v in m["shard"].stats["pairs"]["splits"].values()) == 80

    # shard: pairs/<split>-NNNNN.parquet, split by the content hash as dpo.split_pairs splits the file
    files = shard.pair_files(m["shard"])
    assert all(p.name.startswith(f"{s}-") for s, ps in files.items() for p in ps)
    expect = dpo.split_pairs(pairs, cfg.shard.splits, cfg.shard.seed)
    got = {s: [p["metadata"]["source_id"] for p in shard.read_pairs(ps)] for s, ps in files.items()}
    assert got == {s: [p["id"] for p in v] for s, v in expect.items() if v}
    assert shard.pair_split_key(pairs[0]) == pair_content_hash(pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"])
    # tokenize packs the training records only
    assert m["tokenize"].counters["in"] == sum(v["records"] for v in m["shard"].stats["splits"].values())
    assert m["tokenize"].stats["pairs_skipped"] == 80
    # a second shard run reuses every pair shard
    again = shard.run([m["validate"]], type("C", (), {"shard": cfg.shard})(), tmp_path / "again",
                      StageContext(store=Store(cfg.paths.store)))
    assert again.stats["units_computed"] == 0 and shard.pair_files(again).keys() == files.keys()

    # DPO from the shards and from the pairs file: the same train / held-out pairs, the same accuracy
    from_shards = m["finetune"]
    cfg_files = chain_config(tmp_path, finetune={**dpo_cfg, "dpo": {**dpo_cfg["dpo"], "pairs_path": str(tmp_path / "raw" / "pairs.jsonl")}})
    ctx = StageContext(store=Store(cfg.paths.store))
    from_files = run_stage(STAGES["finetune"], [m["tokenize"], m["shard"]], cfg_files, ctx)
    assert from_files.key != from_shards.key
    held = [json.loads(x) for x in (from_shards.dir / "heldout_pairs.jsonl").read_text().splitlines()]
    held_f = [json.loads(x) for x in (from_files.dir / "heldout_pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in held] == [p["prompt"] for p in held_f] == [p["prompt"] for p in expect["validation"]]
    s, f = from_shards.stats, from_files.stats
    assert s["train_blocks"] == f["train_blocks"] == len(expect["train"])
    assert s["dpo_heldout_after"] == f["dpo_heldout_after"]
    assert s["dpo_heldout_after"]["loss"] < s["dpo_heldout_before"]["loss"]


def test_validate_runs_each_suite_only_on_what_is_there(tmp_path, make_cfg, ctx):
    """No records and no pairs (an empty pairs part upstream): the records suite stops the flow with a
    message that says nothing arrived, and the pairs suite is not run on the empty part; records beside an
    empty pairs part pass."""
    from corpus2model.tasks import validate
    from corpus2model.tasks.validate import ValidationFailed

    up = pairs_manifest(tmp_path, [])
    with pytest.raises(ValidationFailed, match=r"row_count_to_be_between\(table\): observed 0.*no training records and "
                                               r"no preference pairs") as e:
        run_stage(validate, [up], make_cfg(), ctx)
    assert not (e.value.folder / "pairs_report.json").exists() and (e.value.folder / "report.json").is_file()
    # records and an empty pairs part (clean removed every pair): the records pass, no pairs suite stops them
    m = run_stage(validate, [pairs_manifest(tmp_path, [], "up2", learnable_records(5))], make_cfg(), ctx)
    assert m.stats["rows"] == 5 and "pairs" not in m.stats and not (m.dir / "pairs_report.json").exists()
    assert "not_applicable" not in json.loads((m.dir / "report.json").read_text())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_corpus_of_pairs_only_runs_to_dpo(tmp_path):
    """Only a pairs file under raw/: every boundary passes (the records suites do not count rows, the pairs
    are checked at check_clean, check_augment and validate), tokenize trains its tokenizer on the pairs and
    packs nothing, SFT stops with a clear error, and DPO trains and holds out the validation pairs."""
    from corpus2model.tasks.finetune import tokenizer_dir
    from corpus2model.tasks.stage import StageError
    from corpus2model.tasks.tokenize import load_tokenizer

    pairs = pair_lines(60)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    dpo_cfg = {"objective": "dpo", "max_steps": 4, "eval_every": 2, "batch_size": 8,
               "dpo": {"max_prompt_tokens": 24, "max_response_tokens": 16}}
    cfg = chain_config(tmp_path, finetune=dpo_cfg)
    ctx = StageContext(store=Store(cfg.paths.store))
    m = {"source": scan_raw(tmp_path / "raw", cfg.ingest.include, ctx.store)}
    for name in ("ingest", "check_raw", "clean", "dedup", "check_clean", "augment", "check_augment", "validate",
                 "shard", "tokenize", "finetune"):
        m[name] = run_stage(STAGES[name], [m[s] for s in STAGES[name].inputs], cfg, ctx)

    for name in ("check_raw", "check_clean", "check_augment", "validate"):
        report = json.loads((m[name].dir / "report.json").read_text())
        assert report["rows"] == 0 and report["success"], name
        assert list(report["not_applicable"]) == ["expect_table_row_count_to_be_between:table"], name
        assert "Not run on this table" in (m[name].dir / "report.md").read_text()
    for name in ("check_clean", "check_augment", "validate"):
        assert m[name].stats["pairs"]["rows"] == 60 and m[name].stats["pairs"]["errors_failed"] == 0, name
        assert (m[name].dir / "pairs_report.json").is_file() and (m[name].dir / "pairs_data_docs" / "index.html").is_file()
    assert "pairs" not in m["check_raw"].stats  # raw pairs are not clean yet: the pairs suite starts at check_clean

    tok = m["tokenize"]
    assert tok.files_with("packed") == [] and tok.counters["in"] == 0
    assert all(s["blocks"] == 0 and s["records"] == 0 for s in tok.stats["splits"].values())
    assert tok.stats["tokenizer_source"] == "trained on preference pairs" and tok.stats["pairs_skipped"] == 60
    from corpus2model.flows.summary import _detail

    # the run table says where the 60 went (tokenize's records in/out count training records only)
    assert "60 preference pairs not packed (finetune reads them from shard)" in _detail(tok)
    tokenizer = load_tokenizer(tokenizer_dir(tok))
    # learned from the pairs: their recurring words are merges, not bytes
    assert len(tokenizer("Happy to help with task", add_special_tokens=False)["input_ids"]) <= 8

    ft, by_split = m["finetune"], shard.pair_files(m["shard"])
    held = [json.loads(x) for x in (ft.dir / "heldout_pairs.jsonl").read_text().splitlines()]
    assert held and [p["prompt"] for p in held] == [p["prompt"] for p in shard.read_pairs(by_split["validation"])]
    assert ft.stats["train_blocks"] == len(shard.read_pairs(by_split["train"]))

    # a fixed tokenizer (tokenize.tokenizer_path) works on a pairs-only corpus too
    fixed = chain_config(tmp_path, finetune=dpo_cfg, tokenize={"tokenizer_path": str(tokenizer_dir(tok))})
    tok2 = run_stage(STAGES["tokenize"], [m["shard"]], fixed, ctx)
    assert tok2.stats["tokenizer_sha256"] == tok.stats["tokenizer_sha256"] and tok2.files_with("packed") == []

    sft = chain_config(tmp_path, finetune={"max_steps": 2})
    with pytest.raises(StageError, match="no packed train blocks: this corpus holds only preference pairs; set "
                                         "finetune.objective: dpo or model.task: reward"):
        run_stage(STAGES["finetune"], [tok, m["shard"]], sft, ctx)

    # evaluate scores the held-out pairs (no record to compute perplexity on), base = the reference at 0.5
    small = chain_config(tmp_path, finetune=dpo_cfg, evaluate={"max_records": 8, "latency_runs": 2,
                                                              "throughput_runs": 1, "generate_records": 0})
    q = run_stage(STAGES["quantize"], [ft, tok], small, ctx)
    ev = run_stage(STAGES["evaluate"], [m["shard"], tok, ft, q], small, ctx)
    report = json.loads((ev.dir / "eval.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["base"]["preference_accuracy"] == 0.5 and rows["tuned"]["pairs"] == len(held)
    assert rows["tuned"]["perplexity"] is None and "preference pairs only" in " ".join(report["notes"])
