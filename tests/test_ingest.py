"""ingest: encodings, formats, quarantine with reasons, per-file units."""
from __future__ import annotations

import codecs
import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from corpus2model.tasks import ingest
from corpus2model.tasks.ingest import DecodeError, decode_bytes, extract_html, html_to_text, parse_file, scan_raw
from corpus2model.tasks.stage import run_stage
from helpers import SHARED


@pytest.mark.parametrize("codec,bom", [("utf-8-sig", b""), ("utf-16", b""), ("utf-8", b"")])
def test_decode_boms_and_utf8(codec, bom):
    text = "Grüße aus Köln — 東京"
    data = text.encode(codec)
    assert decode_bytes(data)[0] == text


def test_decode_legacy_and_html_declaration():
    assert decode_bytes("Ein schöner Tag in der Straße, nicht wahr?".encode("cp1252"))[0].endswith("wahr?")
    html = '<html><head><meta charset="iso-8859-1"></head><body><p>Größe</p></body></html>'.encode("iso-8859-1")
    text, enc = decode_bytes(html, html=True)
    assert "Größe" in text and codecs.lookup(enc).name == "iso8859-1"
    with pytest.raises(DecodeError) as e:
        decode_bytes(b"\x00\x01\x02binary\x00")
    assert e.value.reason == "binary"


def test_html_main_text_drops_navigation():
    html = "<html><head><title>t</title><script>var x=1</script></head><body><nav>Home | About</nav>" \
           "<h1>Title</h1><p>First   paragraph.</p><footer>cookie banner</footer></body></html>"
    assert html_to_text(html) == "Title\nFirst paragraph."


def test_trafilatura_main_text_on_a_real_manual_page():
    path = SHARED / "raw_text_corpus" / "raw" / "html" / "page_00330f8c.html"  # httpd manual, Turkish
    if not path.is_file():
        pytest.skip(f"{path} not found")
    html, _ = decode_bytes(path.read_bytes(), html=True)
    text, method = extract_html(html)
    assert method == "trafilatura"
    assert "yapılandırma bölümü taşıyıcılarınının" in text  # the article body
    # The page chrome the stdlib fallback keeps is gone: top menu, breadcrumb, language bar.
    fallback = html_to_text(html)
    for chrome in ("Modüller | Yönergeler | SSS", "Apache > HTTP Sunucusu > Belgeleme", "Mevcut Diller:"):
        assert chrome in fallback and chrome not in text


def test_html_fallback_when_trafilatura_finds_nothing(make_cfg):
    html = b"<html><body><ul><li>Home</li><li>About us</li></ul></body></html>"  # a menu, no main text
    stats: dict = {}
    records, rejects, _ = parse_file(html, "tiny.html", "sha", make_cfg().ingest, stats)
    assert rejects == [] and records[0]["target"] == "Home\nAbout us"
    assert stats == {"html_stdlib": 1}


def test_jsonl_bad_lines_are_quarantined_with_reasons(make_cfg):
    cfg = make_cfg().ingest
    lines = [
        json.dumps({"id": "a", "input": "q", "target": "answer", "metadata": {"task_type": "math_qa"}}),
        "{not json",
        json.dumps({"id": 3, "input": None, "target": "x"}),
        json.dumps({"id": "b", "input": "q", "target": ["list"]}),
        json.dumps({"text": "a plain document"}),
        json.dumps({"foo": 1}),
        "   ",
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"id": "c", "input": "caf\xe9", "target": "t"}\n'
    records, rejects, n_in = parse_file(data, "x.jsonl", "sha", cfg)
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons == ["blank_line", "invalid_json", "invalid_utf8", "unknown_shape", "wrong_type", "wrong_type"]
    assert len(records) == 2 and n_in == len(records) + len(rejects) == 8
    sft = records[0]
    assert sft["metadata"]["task_type"] == "math_qa" and sft["metadata"]["source_id"] == "a"
    assert sft["metadata"]["source_line"] == 1 and records[1]["metadata"]["task_type"] == "text"
    assert all(r["source_path"] == "x.jsonl" for r in rejects)


def test_gzip_inputs_and_corrupt_gzip(make_cfg):
    cfg = make_cfg().ingest
    data = gzip.compress(b'{"input": "2+2?", "target": "4"}\n')
    records, rejects, _ = parse_file(data, "a.jsonl.gz", "sha", cfg)
    assert len(records) == 1 and not rejects
    records, rejects, _ = parse_file(b"\x1f\x8bnot really", "b.txt.gz", "sha", cfg)
    assert not records and rejects[0]["reason"] == "corrupt_gzip"


def test_stage_adds_one_file_ingests_only_it(make_cfg, ctx, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in sorted((SHARED / "raw_text_corpus" / "raw" / "web").iterdir())[:12]:
        shutil.copy(p, raw / p.name)
    cfg = make_cfg()
    m1 = run_stage(ingest, [scan_raw(raw, cfg.ingest.include, ctx.store)], cfg, ctx)
    assert m1.stats["units_computed"] == 12 and m1.counters["in"] == 12
    assert run_stage(ingest, [scan_raw(raw, cfg.ingest.include, ctx.store)], cfg, ctx).stats["cache"] == "hit"
    (raw / "new.txt").write_text("A brand new document about something worth reading.\n")
    m2 = run_stage(ingest, [scan_raw(raw, cfg.ingest.include, ctx.store)], cfg, ctx)
    assert m2.key != m1.key
    assert m2.stats["units_computed"] == 1 and m2.stats["units_reused"] == 12 and m2.stats["computed_files"] == ["new.txt"]
    rows = [r for p in m2.files_with("data") for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 13 and all(r["metadata"]["source_sha256"] for r in rows)


def test_scan_raw_errors_are_actionable(make_cfg, ctx, tmp_path):
    from corpus2model.tasks.stage import StageError

    with pytest.raises(StageError, match="paths.raw"):
        scan_raw(tmp_path / "nope", ["*.txt"], ctx.store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="ingest.include"):
        scan_raw(tmp_path / "empty", ["*.txt"], ctx.store)


def test_empty_lines_are_counted_but_the_final_newline_is_not(make_cfg):
    records, rejects, n_in = parse_file(b'{"text": "a b c"}\n\n{"text": "d e f"}\n', "e.jsonl", "sha", make_cfg().ingest)
    assert len(records) == 2 and [r["reason"] for r in rejects] == ["blank_line"] and rejects[0]["source_line"] == 2
    assert n_in == 3
