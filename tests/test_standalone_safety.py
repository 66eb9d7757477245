"""Issue 18 for ``c2m ingest|clean|dedup|validate``: never delete the user's files, never read the
tool's own outputs as input, never leave an old manifest beside new parts, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from corpus2model.flows import standalone
from corpus2model.flows.cli import main
from corpus2model.flows.standalone import INCOMPLETE, clean_folder, dedup_folder, ingest_folder
from corpus2model.tasks.stage import StageError, sha256_file, verify

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog near the river bank today. " * 3


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "in"
    _jsonl(d / "a.jsonl", [{"id": "a1", "text": TEXT + "one"}, "{broken", {"id": "a2", "text": TEXT + "two"}])
    return d


def _cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``c2m ...``; SystemExit messages count as stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
        captured = capsys.readouterr()
        return code, captured.out, captured.err + ("" if isinstance(e.code, int) else str(e.code))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- item 1: OUT_DIR is never emptied without asking ---------------------------------------------
def test_out_dir_equal_to_or_inside_in_dir_is_refused_and_nothing_deleted(make_cfg, tmp_path):
    u = tmp_path / "u"
    user_file = _jsonl(u / "parts" / "a.jsonl", [{"text": TEXT}])
    with pytest.raises(StageError, match="IN_DIR itself"):
        ingest_folder(u, u, make_cfg())
    with pytest.raises(StageError, match="inside IN_DIR"):
        ingest_folder(u, u / "out", make_cfg())
    with pytest.raises(StageError, match="is inside OUT_DIR"):
        ingest_folder(u / "parts", u, make_cfg())
    assert user_file.read_text(encoding="utf-8").startswith('{"text"') and sorted(p.name for p in u.rglob("*")) == ["a.jsonl", "parts"]


def test_non_empty_out_dir_needs_overwrite_unless_it_is_our_own_output(make_cfg, raw, tmp_path):
    out = tmp_path / "out"
    mine = _jsonl(out / "parts" / "keep.jsonl", [{"text": "mine"}])
    (out / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(StageError, match="not empty.*did not write.*--overwrite"):
        ingest_folder(raw, out, make_cfg())
    assert mine.is_file() and json.loads((out / "manifest.json").read_text()) == {"mine": True}
    # an earlier output of the same command is replaced; of another command it is refused
    ours = tmp_path / "ours"
    ingest_folder(raw, ours, make_cfg())
    assert ingest_folder(raw, ours, make_cfg()).counters["in"] == 3
    with pytest.raises(StageError, match="output of c2m ingest"):
        dedup_folder(raw, ours, make_cfg())
    # --overwrite replaces our names only; a file we do not write stays
    (out / "notes.txt").write_text("keep me")
    m = ingest_folder(raw, out, make_cfg(), overwrite=True)
    assert not mine.exists() and (out / "notes.txt").read_text() == "keep me"
    assert verify(out)[0] and m.counters == {"in": 3, "out": 2, "rejected": {"invalid_json": 1}, "duplicates": 0}


def test_cli_out_dir_is_a_file_and_in_dir_is_a_file(capsys, raw, tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    code, _, err = _cli(capsys, "ingest", raw, f)
    assert code == 1 and "OUT_DIR" in _one_line_error(err) and "is a file" in err
    code, _, err = _cli(capsys, "clean", raw / "a.jsonl", tmp_path / "o")
    assert code == 1 and "is a file: give the folder that holds it" in _one_line_error(err)
    code, _, err = _cli(capsys, "dedup", tmp_path / "nothere", tmp_path / "o")
    line = _one_line_error(err)
    assert code == 1 and "does not exist" in line and "paths.raw" not in line


# -- item 2: the input kind is decided explicitly; our outputs are never input --------------------
def test_ingest_rerun_counts_are_stable_and_never_read_own_outputs(make_cfg, raw, tmp_path):
    out = tmp_path / "out"
    counts = [ingest_folder(raw, out, make_cfg()).counters["in"] for _ in range(3)]
    assert counts == [3, 3, 3]


def test_parquet_beside_raw_files_is_refused(make_cfg, raw, tmp_path):
    ingest_folder(raw, tmp_path / "ing", make_cfg())
    part = next((tmp_path / "ing" / "parts").glob("*.parquet"))
    (raw / "p.parquet").write_bytes(part.read_bytes())
    with pytest.raises(StageError, match="both record Parquet .* and raw files"):
        clean_folder(raw, tmp_path / "cl", make_cfg())


def test_earlier_output_inside_raw_folder_is_refused(make_cfg, raw, tmp_path):
    ingest_folder(raw, tmp_path / "ing", make_cfg())
    (tmp_path / "ing").rename(raw / "old")
    with pytest.raises(StageError, match="earlier c2m output"):
        ingest_folder(raw, tmp_path / "again", make_cfg())


def test_grown_folder_is_read_again_and_earlier_output_is_an_input_kind(make_cfg, raw, tmp_path):
    out = tmp_path / "cl"
    m1 = clean_folder(raw, out, make_cfg())
    _jsonl(raw / "new.jsonl", [{"id": "n1", "text": TEXT + "three"}, "{also broken"])
    m2 = clean_folder(raw, out, make_cfg())
    st = m2.stats["standalone"]
    assert st["input"] == "raw" and st["stages"]["ingest"]["counters"]["in"] == 5 == m1.stats["standalone"]["stages"]["ingest"]["counters"]["in"] + 2
    # both files' unreadable lines are in OUT_DIR/quarantine (ingest's, under quarantine/ingest/)
    q = [r for p in m2.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
    assert sorted((r["source_path"], r["reason"]) for r in q if r["stage"] == "ingest") == [
        ("a.jsonl", "invalid_json"), ("new.jsonl", "invalid_json")]
    assert all(p.relative_to(out).parts[:2] == ("quarantine", "ingest") for p in m2.files_with("quarantine")
               if pq.read_table(p).column("stage")[0].as_py() == "ingest")
    # the clean output is itself an input kind: dedup reads its parts, verified, nothing else
    d = dedup_folder(out, tmp_path / "dd", make_cfg())
    assert d.stats["standalone"]["input"] == "output" and d.counters["in"] == m2.counters["out"]
    # an earlier output that was edited after it was written is refused
    part = m2.files_with("data")[0]
    part.unlink()
    with pytest.raises(StageError, match="does not match its manifest"):
        dedup_folder(out, tmp_path / "dd2", make_cfg())


def test_cli_prints_every_stage_accounting(capsys, raw, tmp_path):
    code, out, _ = _cli(capsys, "clean", raw, tmp_path / "o", "--workers", "1")
    assert code == 0
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith(("ingest:", "clean:"))}
    assert "in 3 out 2 rejected 1 duplicates 0" in lines["ingest"] and lines["clean"].startswith("clean: in 2 ")


# -- item 10: the output is swapped in; an interrupted run never looks finished ------------------
def test_manifest_lists_sizes_and_sha256_on_the_jsonl_dedup_path(make_cfg, raw, tmp_path):
    out = tmp_path / "dd"
    m = dedup_folder(raw, out, make_cfg())
    assert m.stats["path"] == "jsonl-direct"
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert {f["path"].split("/")[0] for f in listed} >= {"parts", "quarantine", "removed.jsonl", "stats.json"}
    for f in listed:
        assert f["bytes"] == (out / f["path"]).stat().st_size and f["sha256"] == sha256_file(out / f["path"])


def test_interrupted_swap_leaves_no_manifest_and_a_rerun_finishes(make_cfg, raw, tmp_path, monkeypatch):
    out = tmp_path / "dd"
    dedup_folder(raw, out, make_cfg())
    _jsonl(raw / "b.jsonl", [{"id": "b1", "text": TEXT + "one"}])
    real = standalone.os.rename

    def rename(src, dst):  # Ctrl-C just as the new parts are moved in
        if str(dst).endswith("parts") and "old" not in str(dst):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(standalone.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        dedup_folder(raw, out, make_cfg())
    monkeypatch.setattr(standalone.os, "rename", real)
    assert not (out / "manifest.json").exists() and not (out / "removed.jsonl").exists() and (out / INCOMPLETE).exists()
    assert not verify(out)[0]
    with pytest.raises(StageError, match="interrupted"):
        clean_folder(out, tmp_path / "cl", make_cfg())
    m = dedup_folder(raw, out, make_cfg())  # the same command may finish it
    assert not (out / INCOMPLETE).exists() and verify(out)[0] and m.counters["duplicates"] == 1
    assert not list(out.glob(".c2m-tmp-*"))


# -- item 13: one-line errors -----------------------------------------------------------------
def test_cli_bad_set_values_are_one_line_errors(capsys, raw, tmp_path):
    for args in (["--config", ROOT / "configs" / "demo.yaml", "--set", "name.x=1"], ["--set", "name.x=1"],
                 ["--set", "clean.min_chars=[1"], ["--set", "clean.x=1"]):
        code, _, err = _cli(capsys, "clean", raw, tmp_path / "o", *args)
        assert code != 0 and _one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_cli_validate_binary_suite_is_one_line_error(capsys, raw, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_bytes(bytes(range(256)) * 4)
    code, _, err = _cli(capsys, "validate", raw / "a.jsonl", "--suite", suite, "--out", tmp_path / "v")
    assert code == 2 and str(suite) in _one_line_error(err)


def test_cli_store_that_cannot_be_written_names_the_store(capsys, raw, tmp_path, monkeypatch):
    blocker = tmp_path / "store-file"
    blocker.write_text("x")
    code, _, err = _cli(capsys, "ingest", raw, tmp_path / "o", "--store", blocker)
    assert code == 1 and "--store" in _one_line_error(err)
    # a read-only store (root ignores chmod, so the filesystem's answer is simulated)
    import errno

    from corpus2model.tasks import stage

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(stage, "write_json_atomic", read_only)
    monkeypatch.setattr("corpus2model.tasks.ingest.write_json_atomic", read_only)
    code, _, err = _cli(capsys, "ingest", raw, tmp_path / "o2", "--store", tmp_path / "ro")
    line = _one_line_error(err)
    assert code == 1 and "cannot write to the store" in line and "Read-only" in line and "paths.store" in line


def test_cli_ctrl_c_is_one_line_and_keeps_the_old_output(capsys, raw, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert _cli(capsys, "ingest", raw, out, "--workers", "1")[0] == 0
    before = (out / "manifest.json").read_bytes()

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("corpus2model.tasks.stage.run_stage", interrupt)
    _jsonl(raw / "b.jsonl", [{"text": TEXT}])
    code, _, err = _cli(capsys, "ingest", raw, out, "--workers", "1")
    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err and "left as it was" in err
    assert (out / "manifest.json").read_bytes() == before and verify(out)[0]


# -- item 13: an unreadable input file is quarantined, not a traceback --------------------------
def test_unreadable_input_file_is_quarantined_with_its_reason(make_cfg, raw, tmp_path, monkeypatch):
    import corpus2model.tasks.ingest as ingest_mod

    locked = _jsonl(raw / "locked.jsonl", [{"text": TEXT}])
    real_sha, real_read = ingest_mod.sha256_file, Path.read_bytes

    def sha(p, *a, **k):  # root ignores chmod 000: the filesystem's answer is simulated
        if Path(p).name == locked.name:
            raise PermissionError(13, "Permission denied", str(p))
        return real_sha(p, *a, **k)

    def read_bytes(self):
        if self.name == locked.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(ingest_mod, "sha256_file", sha)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for fn, out in ((ingest_folder, "ing"), (dedup_folder, "dd")):
        m = fn(raw, tmp_path / out, make_cfg())
        c = m.counters
        assert c["in"] == 4 and c["out"] == 2 and c["rejected"] == {"invalid_json": 1, "unreadable_file": 1}
        rows = [r for p in m.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
        assert [(r["source_path"], r["reason"]) for r in rows if r["reason"] == "unreadable_file"] == [("locked.jsonl", "unreadable_file")]


# -- item 14: a cut .jsonl.gz keeps its complete lines ------------------------------------------
def test_truncated_jsonl_gz_keeps_complete_lines_and_quarantines_the_tail(make_cfg, tmp_path):
    import gzip
    import random
    import zlib

    rnd = random.Random(0)
    lines = [json.dumps({"id": f"r{i}", "text": " ".join(rnd.choice(TEXT.split()) + str(rnd.random()) for _ in range(30))})
             for i in range(400)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    cut = whole[: len(whole) // 2]
    complete = zlib.decompressobj(31).decompress(cut).count(b"\n")
    assert 0 < complete < 400
    ind = tmp_path / "in"
    ind.mkdir()
    (ind / "cut.jsonl.gz").write_bytes(cut)
    for fn, out in ((ingest_folder, "ing"), (dedup_folder, "dd")):
        m = fn(ind, tmp_path / out, make_cfg())
        assert m.counters["out"] == complete and m.counters["rejected"] == {"truncated_gzip": 1}
        assert m.counters["in"] == complete + 1
        (row,) = [r for p in m.files_with("quarantine") for r in pq.read_table(p).to_pylist()]
        assert row["source_line"] == complete + 1 and "complete lines" in row["detail"]
