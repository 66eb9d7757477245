"""Issue 18 acceptance: one hostile corpus through every standalone command and through ``c2m run``.

The fixes for each hostile input are tested one by one (test_record_integrity.py, test_standalone_safety.py,
test_text_preservation.py); this proves they hold together, end to end, the way a user runs the tool:
each command is a subprocess under a timeout (a hang fails the test), its stderr carries no traceback,
every input file and line is accounted for (a record, a quarantine row naming file and line, a removed
duplicate, or a skipped file with its reason), and the records that no documented rule touches leave
clean byte-identical.

``c2m run`` is the whole flow (the demo config pointed at the hostile folder, a tiny model, a few steps),
a subprocess that talks to the session's Prefect test server."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
TIMEOUT_S = 300  # per command; each takes seconds (c2m run: about a minute on 2 cores)
SRC = "hostile-test"


def _sft(id_, prompt: str, answer: str) -> dict:
    return {"id": id_, "input": prompt, "target": answer,
            "metadata": {"task_type": "instruction", "domain": "general", "source": SRC}}


# Valid text no documented clean rule applies to (NFC, single spaces, no debris): clean keeps it byte for byte.
KEEP = {
    "emoji_zwj": "Family: \U0001F468\u200d\U0001F469\u200d\U0001F467 and \U0001F469\u200d\U0001F469\u200d\U0001F466\u200d\U0001F466 "
                 "at home, \U0001F3F3\ufe0f\u200d\U0001F308 on the roof, \U0001F9D1\U0001F3FD\u200d\U0001F4BB at the desk.",
    "persian_zwnj": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u06a9\u062a\u0627\u0628\u200c\u0647\u0627 "
                    "\u0631\u0627 \u0628\u062e\u0648\u0627\u0646\u0645.",
    "version": "Upgrade to version 1.2.3.4; OID 1.3.6.1 is in section 1.2.3.4 of the manual.",
    "cjk": "\u6f22\u5b57\u3068\u304b\u306a\u3001\u4e2d\u6587\u6807\u70b9\uff1f\ud55c\uad6d\uc5b4 \uff21\uff22\uff23 and some English words.",
}
# JSON ids beyond what a double or a 64-bit integer holds are kept as written (the source's text).
# Their answers differ in more than the number, or MinHash would rightly call them near-duplicates.
BIG_IDS = {b"18446744073709551617": "This record is filed under an integer id one past two to the sixty-fourth power.",
           b"1e400": "A floating point id that overflows to infinity in a double files this other record."}

# Plain-text documents long and varied enough for the demo's quality filters, each with UTF-8 beyond ASCII
# (so that the file is evidently UTF-8 and one bad line in it is that line's problem, not the file's).
BAKERY = ["The old bakery on the corner of the market square opens before dawn every morning.",
          "Its owner learned the trade from her grandfather, a pâtissier who built the brick oven that still heats the back room.",
          "Regular customers arrive early for rye loaves and small almond cakes, and the queue often reaches the fountain.",
          "On Saturdays the shop also sells apple tarts and crème brûlée, which disappear within an hour of the doors opening.",
          "Visitors from other towns sometimes ask for the recipe, but the family has never written it down."]
CP1252_LINE = "Le patron dit : très bon gâteau, à bientôt et merci beaucoup."
RIVER = ["The river that divides the city was once crossed by a single wooden bridge near the mill.",
         "Over two centuries the town added stone arches, an iron railway span and a narrow footbridge — the «Passerelle» — for cyclists.",
         "Each crossing tells a story about the money, materials and ambitions of its time.",
         "Floods in the spring still test the oldest piers — engineers inspect them after every storm.",
         "Local schools bring pupils to the embankment to learn how water shaped the streets they walk every day."]
REPORT = ["This annual report describes how the library served its readers during a difficult year.",
          "Visits fell while the main hall was repaired, yet loans of printed books rose by almost a fifth.",
          "Volunteers delivered parcels to elderly members who could not travel, and the reading club moved online.",
          "The board thanks every donor whose support kept the children’s corner open on weekends.",
          "Next year the library plans to extend its opening hours and to digitise the oldest newspapers in its archive."]


def build_corpus(root: Path) -> dict:
    """The hostile raw folder under ``root/raw`` and what each file should give; nothing is committed."""
    raw = root / "raw"
    (raw / "sft").mkdir(parents=True)
    (raw / "text").mkdir()
    rnd = random.Random(18)
    good = [json.dumps(_sft(f"keep-{k}", f"Copy this text exactly as it is written: {v}", v), ensure_ascii=False).encode()
            for k, v in KEEP.items()]
    for literal, answer in BIG_IDS.items():
        good.append(b'{"id": ' + literal + b', "input": "Which id is this record filed under, exactly as written?", '
                    b'"target": "' + answer.encode() + b'", '
                    b'"metadata": {"task_type": "instruction", "domain": "general", "source": "' + SRC.encode() + b'"}}')
    (raw / "sft" / "good.jsonl").write_bytes(b"\n".join(good) + b"\n")
    ok = json.dumps(_sft("bad-file-ok", "A fine question among the broken lines, asked plainly?",
                         "A fine answer among the broken lines, given plainly and in full.")).encode()
    bad = {  # line number -> (bytes, reason ingest gives it)
        1: (ok, None),
        2: (b'{"id": "broken", "input": "no closing brace"', "invalid_json"),
        3: (b'{"id": NaN, "input": "Which id is this?", "target": "An id that names nothing.", "metadata": {"task_type": "instruction"}}',
            "invalid_id"),
        4: (b'{"id": "surrogate", "input": "a lone surrogate \\ud800 in the prompt?", "target": "It cannot be written as UTF-8."}',
            "invalid_unicode"),
        5: (b"[" * 5000 + b"]" * 5000, "too_deep"),
        6: (b'{"id": "latin1", "input": "caf\xe9 cr\xe8me br\xfbl\xe9e?", "target": "A line that is not UTF-8."}', "invalid_utf8"),
        7: (b"", "blank_line"),
        8: (b'{"id": "bytes\x00\xff\xfe", "input": "\x80\x81"}', "invalid_utf8"),
    }
    (raw / "sft" / "bad.jsonl").write_bytes(b"\n".join(v[0] for v in bad.values()) + b"\n")
    dup = json.dumps(_sft("dup-1", "This exact question was copied into two files of the corpus, was it not?",
                          "Yes, and dedup keeps the first copy and names it from the second."))
    (raw / "sft" / "dup_a.jsonl").write_text(dup + "\n" + json.dumps(_sft(
        "dup-a-own", "A question only the first of the two copied files has?", "An answer only the first copied file has.")) + "\n")
    (raw / "sft" / "dup_b.jsonl").write_text(json.dumps(_sft(
        "dup-b-own", "A question only the second of the two copied files has?", "An answer only the second copied file has.")) + "\n"
        + dup + "\n")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    cut_lines = [json.dumps(_sft(f"cut-{i}", f"Question {i}: " + " ".join(rnd.choice(words) for _ in range(12)) + "?",
                                 f"Answer {i}: " + " ".join(rnd.choice(words) for _ in range(20)) + f" {rnd.random():.6f}."))
                 for i in range(200)]
    whole = gzip.compress(("\n".join(cut_lines) + "\n").encode())
    cut = whole[: len(whole) // 2]  # an interrupted download
    (raw / "sft" / "cut.jsonl.gz").write_bytes(cut)
    cut_complete = zlib.decompressobj(31).decompress(cut).count(b"\n")
    (raw / "sft" / "empty.jsonl").write_bytes(b"")
    bakery = [x.encode() for x in BAKERY]
    bakery.insert(3, CP1252_LINE.encode("cp1252"))  # one line saved by a Windows editor
    (raw / "text" / "cp1252_line.txt").write_bytes(b"\n".join(bakery) + b"\n")
    river = [x.encode() for x in RIVER]
    river[1] = river[1].replace(b"narrow", b"nar\xffrow")  # one stray byte in a line with real UTF-8 (the dash)
    (raw / "text" / "stray_byte.txt").write_bytes(b"\n".join(river) + b"\n")
    # form feed between pages, NEL (U+0085) between paragraphs: documented line-break repairs
    (raw / "text" / "separators.txt").write_text(" ".join(REPORT[:2]) + "\x0c" + " ".join(REPORT[2:4]) + "\x85" + REPORT[4] + "\n",
                                                 encoding="utf-8")
    (raw / "text" / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(rnd.randrange(256) for _ in range(4096)))
    (raw / "text" / "empty.txt").write_bytes(b"")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash, a file outside the corpus that is never read\n")
    os.symlink(outside / "secret.txt", raw / "text" / "outside.txt")

    units = Counter()  # (source_path, source_line) -> 1: what ingest must account for, exactly once each
    for name, n in (("good.jsonl", len(good)), ("bad.jsonl", len(bad)), ("dup_a.jsonl", 2), ("dup_b.jsonl", 2),
                    ("cut.jsonl.gz", cut_complete + 1)):
        units.update((f"sft/{name}", i) for i in range(1, n + 1))
    units.update((f"text/{name}", None) for name in ("cp1252_line.txt", "stray_byte.txt", "separators.txt", "binary.txt", "empty.txt"))
    rejected = {("sft/bad.jsonl", i): why for i, (_, why) in bad.items() if why}
    rejected[("sft/cut.jsonl.gz", cut_complete + 1)] = "truncated_gzip"
    rejected[("text/binary.txt", None)] = "binary"
    return {"raw": raw, "units": units, "ingest_rejected": rejected, "skipped": [["text/outside.txt", "link_outside_root"]],
            "included_files": 11}  # every regular file below raw/ (the link is not one)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {**build_corpus(root), "root": root}


def c2m(root: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``c2m ARGS`` in ``root`` as a user runs it; a hang fails the test instead of stalling the suite."""
    cmd = [sys.executable, "-c", "import sys; from corpus2model.flows.cli import main; sys.exit(main())", *map(str, args)]
    full_env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"), **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"c2m {' '.join(map(str, args))} hung: no exit within {TIMEOUT_S} s\n{(e.stderr or b'')[-3000:]!r}")
    assert "Traceback" not in proc.stderr, f"c2m {args[0]}: a traceback in stderr:\n{proc.stderr[-6000:]}"
    return proc


def _rows(paths) -> list[dict]:
    return [r for p in paths for r in pq.read_table(p).to_pylist()]


def _out(folder: Path) -> dict:
    """A standalone output: its manifest, records, quarantine rows and per-stage counters."""
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    files = {kind: [folder / f["path"] for f in m["files"] if f["role"] == kind] for kind in ("data", "quarantine")}
    return {"manifest": m, "records": _rows(files["data"]), "quarantine": _rows(files["quarantine"]),
            "stages": {k: v["counters"] for k, v in m["stats"]["standalone"]["stages"].items()},
            "stats": json.loads((folder / "stats.json").read_text(encoding="utf-8"))}


def _balanced(c: dict) -> bool:
    return c["in"] == c["out"] + sum(c["rejected"].values()) + c.get("duplicates", 0)


def _where(r: dict) -> tuple:
    md = r.get("metadata")
    return (md["source_path"], md["source_line"]) if md is not None else (r["source_path"], r["source_line"])


def check_ingest_ledger(corpus: dict, records: list[dict], quarantine: list[dict], counters: dict, stats: dict) -> None:
    """Every raw unit (a JSONL line, a text file) is exactly one record or one quarantine row naming it."""
    ingest_q = [q for q in quarantine if q["stage"] == "ingest"]
    seen = Counter([_where(r) for r in records] + [_where(q) for q in ingest_q])
    assert seen == corpus["units"], {"missing": corpus["units"] - seen, "extra": seen - corpus["units"]}
    assert {_where(q): q["reason"] for q in ingest_q} == corpus["ingest_rejected"]
    assert _balanced(counters) and counters["in"] == sum(corpus["units"].values())
    assert stats["skipped_files"] == corpus["skipped"]  # the link out of the folder is named, not read
    assert stats["units"] == corpus["included_files"]  # every other file was read (the empty .jsonl gives no line)
    assert not any("root:x" in (r.get("target") or "") for r in records)


def check_clean_kept_text(records: list[dict]) -> None:
    """Records no documented rule applies to are byte-identical; the repaired ones are repaired as documented."""
    by_source = {r["metadata"]["source_id"]: r for r in records if r["metadata"]["source_id"]}
    for k, v in KEEP.items():
        r = by_source[f"keep-{k}"]
        assert r["target"].encode("utf-8") == v.encode("utf-8"), k
        assert r["input"].encode("utf-8") == f"Copy this text exactly as it is written: {v}".encode("utf-8"), k
    for literal, answer in BIG_IDS.items():
        assert by_source[literal.decode()]["target"] == answer
    text = {r["metadata"]["source_path"]: r for r in records if r["metadata"]["source_path"].startswith("text/")}
    bakery = text["text/cp1252_line.txt"]
    assert bakery["target"].split("\n") == BAKERY[:3] + [CP1252_LINE] + BAKERY[3:]  # the line repaired alone
    assert bakery["metadata"]["decode_repairs"] == "line 4: cp1252"
    river = text["text/stray_byte.txt"]
    assert river["target"].split("\n") == RIVER[:1] + [RIVER[1].replace("narrow", "nar\ufffdrow")] + RIVER[2:]
    assert river["metadata"]["decode_repairs"] == "line 2: 1 invalid byte replaced"
    report = text["text/separators.txt"]["target"]
    assert report == "\n".join([" ".join(REPORT[:2]), " ".join(REPORT[2:4]), REPORT[4]])


# ---------------------------------------------------------------------------------------------
# found by this corpus: the raw boundary's line shapes (tasks/validate/tables.py raw_shapes) re-parse
# every raw line; a 5,000-deep line crashed `c2m validate` and check_raw with a RecursionError
# ---------------------------------------------------------------------------------------------
def test_raw_shapes_skip_too_deep_lines_and_read_a_cut_gzip():
    from corpus2model.tasks.validate.tables import raw_shapes

    line = json.dumps({"id": "a", "text": "a record", "extra": 1}).encode()
    deep = b"[" * 5000 + b"]" * 5000
    shapes = raw_shapes(line + b"\n" + deep + b"\n" + line + b"\n", "f.jsonl")
    assert sorted(shapes) == [1, 3] and shapes[1]["raw_extra_keys"] == "extra"
    assert raw_shapes(deep, "f.json") == {}
    lines = [json.dumps({"id": f"r{i}", "text": f"record {i} {random.Random(i).random()}", "extra": i}) for i in range(300)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    cut = whole[: len(whole) // 2]
    complete = zlib.decompressobj(31).decompress(cut).count(b"\n")
    # ingest keeps a cut file's complete lines, so the raw check sees their shapes too
    assert sorted(raw_shapes(cut, "f.jsonl.gz")) == list(range(1, complete + 1))


# ---------------------------------------------------------------------------------------------
# the standalone commands
# ---------------------------------------------------------------------------------------------
def test_c2m_ingest_accounts_for_every_file_and_line(corpus):
    out = corpus["root"] / "ingest_out"
    proc = c2m(corpus["root"], "ingest", corpus["raw"], out, "--config", DEMO)
    assert proc.returncode == 0, proc.stderr
    o = _out(out)
    check_ingest_ledger(corpus, o["records"], o["quarantine"], o["stages"]["ingest"], o["stats"]["ingest"]["stats"])
    assert "skipped 1 files: text/outside.txt (link_outside_root)" in proc.stdout


@pytest.fixture(scope="module")
def cleaned(corpus):
    out = corpus["root"] / "clean_out"
    return c2m(corpus["root"], "clean", corpus["raw"], out, "--config", DEMO), out


def test_c2m_clean_keeps_valid_text_byte_identical(corpus, cleaned):
    proc, out = cleaned
    assert proc.returncode == 0, proc.stderr
    o = _out(out)
    ing, cl = o["stages"]["ingest"], o["stages"]["clean"]
    assert _balanced(cl) and cl["in"] == ing["out"]
    kept_ids = {r["id"] for r in o["records"]}
    dropped = [q for q in o["quarantine"] if q["stage"] == "clean"]
    assert sum(cl["rejected"].values()) == len(dropped) and not kept_ids & {q["id"] for q in dropped}
    assert all(q["source_path"] and (q["source_line"] is not None) == q["source_path"].startswith("sft/") for q in dropped)
    # ingest's drops travel with the output, so the whole input is accounted for here too
    check_ingest_ledger(corpus, o["records"] + [{"metadata": {"source_path": q["source_path"], "source_line": q["source_line"]}}
                                                for q in dropped],
                        o["quarantine"], ing, o["stats"]["ingest"]["stats"])
    assert {q["source_path"]: q["reason"] for q in dropped} == {"text/empty.txt": "empty_target"}
    check_clean_kept_text(o["records"])
    assert o["stats"]["clean"]["stats"]["repairs"]["line_breaks"] == 1  # FF and NEL in one record, counted


@pytest.mark.parametrize("folder", ["raw", "raw/sft"], ids=["stage-path", "jsonl-direct-path"])
def test_c2m_dedup_removes_the_copy_and_names_the_kept_one(corpus, folder):
    out = corpus["root"] / f"dedup_out_{folder.replace('/', '_')}"
    proc = c2m(corpus["root"], "dedup", corpus["root"] / folder, out, "--config", DEMO)
    assert proc.returncode == 0, proc.stderr
    o = _out(out)
    c = o["manifest"]["counters"]
    assert _balanced(c) and c["duplicates"] == 1
    # source paths are relative to the folder given (raw/ or raw/sft/)
    rel = (lambda path: path) if folder == "raw" else (lambda path: path.removeprefix("sft/"))
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["duplicate_of"], r["source_path"]) for r in removed] == [("dup-1", "dup-1", rel("sft/dup_b.jsonl"))]
    # every input line is a kept record, a quarantine row or the removed copy (dup_b.jsonl line 2)
    units = Counter({(rel(path), line): n for (path, line), n in corpus["units"].items()
                     if folder == "raw" or path.startswith("sft/")})
    seen = Counter([_where(r) for r in o["records"]] + [_where(q) for q in o["quarantine"]] + [(rel("sft/dup_b.jsonl"), 2)])
    assert seen == units, {"missing": units - seen, "extra": seen - units}


def test_c2m_validate_reports_instead_of_crashing(corpus):
    out = corpus["root"] / "validate_raw"
    proc = c2m(corpus["root"], "validate", corpus["raw"], "--config", DEMO, "--out", out)
    # the raw folder holds an empty document and control characters: error expectations fail, which is
    # the report's answer (exit 1), not a crash (exit 2 or a traceback)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["unreadable"] == len(corpus["ingest_rejected"]) and report["records"] == sum(corpus["units"].values()) - report["unreadable"]
    failed = {(r["expectation"], r["column"]): r["failing_where"] for r in report["report"]["results"] if not r["success"]}
    assert failed == {("expect_column_value_lengths_to_be_between", "target"): ["text/empty.txt"],
                      ("expect_column_values_to_not_match_regex", "target"): ["text/separators.txt"]}  # FF, NEL: clean's to repair
    assert report["errors_failed"] == 2 and (out / "data_docs" / "index.html").is_file()


def test_c2m_validate_accepts_what_clean_kept(corpus, cleaned):
    assert cleaned[0].returncode == 0, cleaned[0].stderr
    out = corpus["root"] / "validate_clean"
    proc = c2m(corpus["root"], "validate", cleaned[1], "--config", DEMO, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["errors_failed"] == 0


# ---------------------------------------------------------------------------------------------
# the whole flow: c2m run with the demo config on the hostile folder
# ---------------------------------------------------------------------------------------------
TINY_RUN = {
    "tokenize.vocab_size": 300, "tokenize.seq_len": 64,
    "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
    "finetune.max_steps": 2, "finetune.batch_size": 4, "finetune.eval_every": 2, "finetune.warmup_steps": 1,
    "finetune.eval_blocks": 16,
    "quantize.methods": "[dynamic_int8]", "quantize.calibration_samples": 8,
    "evaluate.max_records": 4, "evaluate.generate_records": 1, "evaluate.max_new_tokens": 4, "evaluate.latency_runs": 1,
}


@pytest.mark.flow
@pytest.mark.slow
def test_c2m_run_on_the_hostile_corpus(corpus, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    root = corpus["root"]
    sets = {"paths.raw": corpus["raw"], "paths.store": root / "store", "paths.registry": root / "registry", **TINY_RUN}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    # the session's test server, instead of a temporary one per run (about 10 s to start)
    env = {"PREFECT_API_URL": PREFECT_API_URL.value()} if PREFECT_API_URL.value() else {}
    proc = c2m(root, "run", DEMO, *args, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((root / "store" / "_runs" / "demo.summary.json").read_text(encoding="utf-8"))
    rows = {r["stage"]: r for r in summary["rows"]}
    assert all(r["status"] == "ran" for r in rows.values()), rows
    for stage in ("ingest", "clean", "dedup"):
        r = rows[stage]
        assert r["records_in"] == r["records_out"] + r["rejected"] + r["duplicates"], r
    assert rows["clean"]["records_in"] == rows["ingest"]["records_out"] and rows["dedup"]["duplicates"] == 1
    assert rows["ingest"]["records_in"] == sum(corpus["units"].values())
    # the flow's ingest and clean outputs in the store: the same ledger and the same kept text as the commands
    store = root / "store"
    (ing,) = (store / "ingest").iterdir()
    (cl,) = (store / "clean").iterdir()
    ing_m = json.loads((ing / "manifest.json").read_text(encoding="utf-8"))
    cl_m = json.loads((cl / "manifest.json").read_text(encoding="utf-8"))
    files = lambda folder, m, role: [folder / f["path"] for f in m["files"] if f["role"] == role]  # noqa: E731
    check_ingest_ledger(corpus, _rows(files(ing, ing_m, "data")), _rows(files(ing, ing_m, "quarantine")),
                        ing_m["counters"], ing_m["stats"])
    check_clean_kept_text(_rows(files(cl, cl_m, "data")))
    assert (Path(summary["registered model"]) / "model" / "model.safetensors").is_file()
