"""ingest: raw files (txt, jsonl/json, html, any of them .gz) -> records, one cached unit per file.

``scan_raw`` fingerprints the raw folder (the "source" of the DAG) by content: path + sha256 of
every included file, with a stat cache so unchanged files are not re-hashed. Ingest then reads
each file as its own unit, keyed by (ingest config, path, file sha256): adding or editing one raw
file ingests only that file; the rest is linked from the unit cache.

HTML main text comes from trafilatura (``extract_html``: precision-favouring, no comments) and
falls back to a standard-library parser (skipping script/style/nav/header/footer) when trafilatura
finds no main text (a page that is all navigation, a fragment); the method is counted per file in
stats (``html_trafilatura`` / ``html_stdlib``). Language ID and quality filters run in clean.
"""
from __future__ import annotations

import codecs
import fnmatch
import gzip
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq

from corpus2model.schemas.records import make_record, quarantine_row, quarantine_table, records_table
from corpus2model.tasks.stage import (
    FileEntry,
    Manifest,
    StageContext,
    StageError,
    Store,
    Unit,
    cache_key,
    canonical_json,
    gather_units,
    sha256_file,
    write_json_atomic,
)

STAGE = "ingest"
VERSION = "3"  # 3: trafilatura main-text extraction for HTML
SECTIONS = ("ingest",)

TEXT_EXT = {".txt", ".text", ".md"}
HTML_EXT = {".html", ".htm", ".xhtml"}
JSON_EXT = {".jsonl", ".json", ".ndjson"}


# ---------------------------------------------------------------------------------------------
# the source: a content fingerprint of the raw folder
# ---------------------------------------------------------------------------------------------
def _included(rel: str, patterns: list[str]) -> bool:
    # fnmatch's "*" crosses "/", so "**/*.txt" needs a top-level twin "*.txt".
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) for p in patterns)


def scan_raw(raw_dir: Path, include: list[str], store: Store) -> Manifest:
    """List included files with sha256 and size; re-hash only files whose (size, mtime) changed."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise StageError(f"raw folder {raw_dir} does not exist: set paths.raw in the config to a folder of input files")
    cache_path = store.root / "_hashcache.json"
    try:
        stat_cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        stat_cache = {}
    files, new_cache = [], {}
    for p in sorted(raw_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(raw_dir).as_posix()
        if not _included(rel, include):
            continue
        st = p.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        cached = stat_cache.get(str(p))
        sha = cached[1] if cached and cached[0] == stamp else sha256_file(p)
        new_cache[str(p)] = [stamp, sha]
        files.append(FileEntry(path=rel, bytes=st.st_size, sha256=sha, role="raw"))
    if not files:
        raise StageError(f"no input files in {raw_dir} matching {include}: add files or change ingest.include")
    write_json_atomic(cache_path, new_cache, indent=None)
    listing = canonical_json([[f.path, f.sha256] for f in files])
    key = cache_key("source", "1", {}, [listing])
    return Manifest(
        stage="source",
        stage_version="1",
        key=key,
        files=files,
        counters={},
        stats={"files": len(files), "bytes": sum(f.bytes for f in files)},
        path=str(raw_dir.resolve()),
    )


# ---------------------------------------------------------------------------------------------
# pure functions: bytes -> text -> records
# ---------------------------------------------------------------------------------------------
_BOMS = [
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
]
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-:.]+)""", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class DecodeError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_bytes(data: bytes, *, html: bool = False, min_confidence: float = 0.5) -> tuple[str, str]:
    """Decode with a BOM, then a declared HTML charset, then strict UTF-8, then charset-normalizer.

    Returns (text, codec). Raises DecodeError("binary"|"undecodable", detail) instead of guessing.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data.decode(codec), codec
    if b"\x00" in data:
        raise DecodeError("binary", "NUL bytes without a UTF-16/32 byte order mark")
    if html:
        m = _META_CHARSET.search(data[:4096])
        if m:
            declared = m.group(1).decode("ascii").lower()
            try:
                return data.decode(declared), codecs.lookup(declared).name
            except (LookupError, UnicodeDecodeError):
                pass  # a wrong declaration is common: fall through to detection
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise DecodeError("undecodable", "no encoding decodes these bytes")
    text = str(best)
    coherence = getattr(best, "coherence", 1.0)
    controls = len(_CONTROL.findall(text)) / max(1, len(text))
    if controls > 0.05 or (len(text) >= 32 and 1.0 - best.chaos < min_confidence):
        raise DecodeError("binary", f"best guess {best.encoding} looks like noise (chaos {best.chaos:.2f}, coherence {coherence:.2f})")
    return text, best.encoding


class _MainText(HTMLParser):
    SKIP = {"script", "style", "nav", "header", "footer", "noscript", "head", "template", "aside"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "section", "article", "dd", "dt", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip_depth:
            self.skip_depth -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Fallback main-text extraction: drop non-content elements, keep block structure as lines."""
    p = _MainText()
    p.feed(html)
    p.close()
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(p.parts).split("\n")]
    return "\n".join(line for line in lines if line)


def extract_html(html: str) -> tuple[str, str]:
    """Main text of an HTML page and the method that found it: ("...", "trafilatura") or, when
    trafilatura returns nothing, the stdlib extractor's ("...", "stdlib").

    favor_precision: boilerplate (menus, "see also" blocks, cookie banners) costs more in a
    training corpus than a lost paragraph. Comments are off (user comments are not the page's
    text); tables stay (manual pages keep their option tables as rows of text). deduplicate is
    off: trafilatura's cache is per process, so its output would depend on which pages the same
    worker saw before, and the cache key promises the same text for the same bytes.
    """
    import trafilatura

    try:
        text = trafilatura.extract(html, favor_precision=True, include_comments=False, include_tables=True,
                                   include_images=False, deduplicate=False, with_metadata=False)
    except (ValueError, TypeError):  # lxml rejects some inputs (e.g. an XML declaration with an encoding)
        text = None
    if text and text.strip():
        return text, "trafilatura"
    return html_to_text(html), "stdlib"


def _str_or_none(v):
    return v if isinstance(v, str) else None


def json_to_record(obj, *, rel: str, sha: str, line: int, encoding: str, cfg) -> tuple[dict | None, tuple[str, str] | None]:
    """Map one JSON value to a record, or return (None, (reason, detail))."""
    if not isinstance(obj, dict):
        return None, ("wrong_type", f"a record must be a JSON object, got {type(obj).__name__}")
    md_in = obj.get("metadata", {})
    if md_in is None:
        md_in = {}
    if not isinstance(md_in, dict):
        return None, ("wrong_type", f"metadata must be an object, got {type(md_in).__name__}")
    if "target" in obj or "input" in obj:
        inp, tgt = obj.get("input", ""), obj.get("target")
        if not isinstance(inp, str):
            return None, ("wrong_type", f"input must be a string, got {type(inp).__name__}")
        if not isinstance(tgt, str):
            return None, ("wrong_type", f"target must be a string, got {type(tgt).__name__}")
        default_type = "sft"
    elif "text" in obj:
        inp, tgt = "", obj["text"]
        if not isinstance(tgt, str):
            return None, ("wrong_type", f"text must be a string, got {type(tgt).__name__}")
        default_type = cfg.default_task_type
    else:
        return None, ("unknown_shape", f"expected keys input/target or text, got {sorted(obj)[:8]}")
    for name in ("task_type", "domain", "source"):
        if name in md_in and not isinstance(md_in[name], str):
            return None, ("wrong_type", f"metadata.{name} must be a string, got {type(md_in[name]).__name__}")
    src_id = obj.get("id")
    record = make_record(
        inp,
        tgt,
        task_type=md_in.get("task_type") or default_type,
        domain=md_in.get("domain") or cfg.default_domain,
        source=_str_or_none(md_in.get("source")) or rel,
        source_id=None if src_id is None else str(src_id),
        source_path=rel,
        source_sha256=sha,
        source_line=line,
        encoding=encoding,
        lang=_str_or_none(md_in.get("lang") or obj.get("lang")),
    )
    return record, None


def parse_file(data: bytes, rel: str, sha: str, cfg, stats: dict | None = None) -> tuple[list[dict], list[dict], int]:
    """One raw file -> (records, quarantine rows, units read). Never raises on bad content.

    ``stats`` (optional) receives ``html_<method>: 1`` for an HTML file (see ``extract_html``)."""
    name = rel.lower()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            return [], [quarantine_row(STAGE, "corrupt_gzip", detail=str(e), source_path=rel)], 1
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    if len(data) > cfg.max_file_bytes:
        return [], [quarantine_row(STAGE, "file_too_large", detail=f"{len(data)} bytes > ingest.max_file_bytes", source_path=rel)], 1

    if ext in JSON_EXT:
        return _parse_json_lines(data, rel, sha, cfg, whole=(ext == ".json"))

    try:
        text, encoding = decode_bytes(data, html=ext in HTML_EXT, min_confidence=cfg.min_encoding_confidence)
    except DecodeError as e:
        return [], [quarantine_row(STAGE, e.reason, detail=e.detail, source_path=rel, record=data[:256])], 1
    if ext in HTML_EXT:
        text, method = extract_html(text)
        if stats is not None:
            stats[f"html_{method}"] = stats.get(f"html_{method}", 0) + 1
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    record = make_record(
        "", text, task_type=cfg.default_task_type, domain=cfg.default_domain, source=rel.split("/")[0],
        source_path=rel, source_sha256=sha, encoding=encoding,
    )
    return [record], [], 1


def _parse_json_lines(data: bytes, rel: str, sha: str, cfg, whole: bool) -> tuple[list[dict], list[dict], int]:
    records, rejects = [], []
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[3:], "utf-8-sig"
    if whole:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return [], [quarantine_row(STAGE, "invalid_json", detail=str(e), source_path=rel, record=data[:512])], 1
        items = obj if isinstance(obj, list) else [obj]
        lines = [(i + 1, item) for i, item in enumerate(items)]
    else:
        lines = []
        physical = data.split(b"\n")
        if physical and physical[-1] == b"":
            physical.pop()  # the final newline ends the last line; it does not start an empty one
        for i, raw in enumerate(physical, start=1):
            if not raw.strip():  # an empty line is a defect worth counting, not silence
                rejects.append(quarantine_row(STAGE, "blank_line", source_path=rel, source_line=i))
                continue
            try:
                lines.append((i, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as e:
                rejects.append(quarantine_row(STAGE, "invalid_utf8", detail=str(e), source_path=rel, source_line=i, record=raw))
            except json.JSONDecodeError as e:
                rejects.append(quarantine_row(STAGE, "invalid_json", detail=str(e), source_path=rel, source_line=i, record=raw))
    for line_no, obj in lines:
        rec, why = json_to_record(obj, rel=rel, sha=sha, line=line_no, encoding=encoding, cfg=cfg)
        if rec is None:
            rejects.append(quarantine_row(STAGE, why[0], detail=why[1], source_path=rel, source_line=line_no, record=obj if isinstance(obj, dict) else json.dumps(obj)))
        else:
            records.append(rec)
    return records, rejects, len(records) + len(rejects)


# ---------------------------------------------------------------------------------------------
# one unit = one raw file
# ---------------------------------------------------------------------------------------------
def _ingest_unit(args) -> dict:
    store_root, unit_key, raw_path, rel, sha, cfg = args
    store = Store(store_root)

    def write(tmp: Path) -> dict:
        stats: dict = {}
        records, rejects, n_in = parse_file(Path(raw_path).read_bytes(), rel, sha, cfg, stats)
        pq.write_table(records_table(records), tmp / "records.parquet")
        files = [FileEntry("records.parquet", role="data", records=len(records))]
        if rejects:
            pq.write_table(quarantine_table(rejects), tmp / "quarantine.parquet")
            files.append(FileEntry("quarantine.parquet", role="quarantine", records=len(rejects)))
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"files": files, "counters": {"in": n_in, "out": len(records), "rejected": reasons, "duplicates": 0},
                "source_path": rel, **stats}

    return store.unit_write(STAGE, unit_key, write)


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (source,) = inputs
    raw_dir = Path(source.path)
    section = cfg.ingest.hashed()
    units = []
    for i, f in enumerate(source.files):
        key = cache_key(STAGE, VERSION, section, [f.path, f.sha256])
        args = (str(ctx.store.root), key, str(raw_dir / f.path), f.path, f.sha256, cfg.ingest)
        units.append(Unit(key=key, stem=f"{i:06d}-{f.sha256[:12]}", label=f.path, args=args))
    files, counters, stats = gather_units(STAGE, units, _ingest_unit, ctx, out_dir, cfg.ingest.workers,
                                          ("html_trafilatura", "html_stdlib"))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
