"""ingest: raw files (txt, jsonl/json, html, any of them .gz) -> records, one cached unit per file.

``scan_raw`` fingerprints the raw folder (the "source" of the DAG) by content: path + sha256 of
every included file, with a stat cache so unchanged files are not re-hashed. Ingest then reads
each file as its own unit, keyed by (ingest config, path, file sha256): adding or editing one raw
file ingests only that file; the rest is linked from the unit cache.

HTML main text comes from trafilatura (``extract_html``: precision-favouring, no comments) and
falls back to a standard-library parser (skipping script/style/nav/header/footer) when trafilatura
finds no main text (a page that is all navigation, a fragment); the method is counted per file in
stats (``html_trafilatura`` / ``html_stdlib``). Language ID and quality filters run in clean.

JSON lines are training records (``input``/``target`` or ``text``) or preference records (``prompt``,
``chosen``, ``rejected``: ``json_to_pair``); both kinds may share a file. A unit writes its training
records to ``records.parquet`` (role "data") and, when it has any, its preference records to
``pairs.parquet`` (role "pairs", PAIR_SCHEMA), which the later stages carry beside the records.
"""
from __future__ import annotations

import codecs
import fnmatch
import gzip
import json
import io
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq

from corpus2model.schemas.records import (PAIR_TEXT_FIELDS, make_pair, make_record, pairs_table, quarantine_row,
                                           quarantine_table, records_table)
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
VERSION = "6"  # 4: per-occurrence ids + content_hash, UTF-8 line repair, exact source ids, bounded gzip
# 5: a cut JSONL .gz keeps its complete lines (tail quarantined), an unreadable file is quarantined
# 6: {prompt, chosen, rejected} lines become preference records (pairs.parquet, role "pairs") instead of
#    unknown_shape rejects; a line with some but not all of those fields is incomplete_pair
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


MAX_SKIPPED_LISTED = 50  # skipped files named in stats (all are counted)


def _walk_raw(raw_dir: Path, include: list[str]):
    """Yield (path, rel, None) for each included regular file under raw_dir and (None, rel, reason)
    for each file left out: a link whose target leaves the folder (``ln -s /etc/passwd x.txt``
    would make a system file a training record), a broken or looping link, a linked directory (its
    files would be read twice or from outside), something that is not a regular file (a FIFO would
    hang the read), a name outside ``ingest.include``."""
    root = raw_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                dirnames.remove(d)
                yield None, (here / d).relative_to(raw_dir).as_posix(), "directory_link"
        for name in sorted(filenames):
            p = here / name
            rel = p.relative_to(raw_dir).as_posix()
            if p.is_symlink():
                try:
                    target = p.resolve(strict=True)
                except RuntimeError:  # a symlink loop (Python < 3.13)
                    yield None, rel, "link_loop"
                    continue
                except OSError as e:
                    yield None, rel, "link_loop" if "loop" in str(e).lower() else "broken_link"
                    continue
                if not target.is_relative_to(root):
                    yield None, rel, "link_outside_root"
                    continue
            if not _included(rel, include):
                yield None, rel, "not_included"
                continue
            if not p.is_file():
                yield None, rel, "not_a_regular_file"
                continue
            yield p, rel, None


def scan_raw(raw_dir: Path, include: list[str], store: Store) -> Manifest:
    """List included files with sha256 and size; re-hash only files whose (size, mtime) changed.

    Files left out are counted by reason in ``stats["skipped"]`` (the first few named in
    ``stats["skipped_files"]``); they are not part of the key: only what is read is."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise StageError(f"raw folder {raw_dir} does not exist: set paths.raw in the config to a folder of input files")
    cache_path = store.root / "_hashcache.json"
    try:
        stat_cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        stat_cache = {}
    files, new_cache = [], {}
    skipped: dict[str, int] = {}
    skipped_files: list[list[str]] = []
    listed = []
    for p, rel, why in _walk_raw(raw_dir, include):
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            if len(skipped_files) < MAX_SKIPPED_LISTED:
                skipped_files.append([rel, why])
            continue
        st = p.stat()
        listed.append((p, rel, st, f"{st.st_size}:{st.st_mtime_ns}"))

    def sha_of(item):
        p, _, _, stamp = item
        cached = stat_cache.get(str(p))
        if cached and cached[0] == stamp:
            return cached[1], None
        try:
            return sha256_file(p), None
        except OSError as e:  # unreadable (permissions, I/O error): its unit quarantines it; hashed again next scan
            return None, e

    # hashlib and file reads release the GIL: new files are hashed on every core (a first scan of
    # a 2 GB corpus took 0.8 s on one), in listing order.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        hashed = list(pool.map(sha_of, listed))
    for (p, rel, st, stamp), (sha, err) in zip(listed, hashed):
        if err is not None:
            files.append(FileEntry(path=rel, bytes=st.st_size, sha256=f"unreadable-{err.errno}", role="raw"))
            continue
        new_cache[str(p)] = [stamp, sha]
        files.append(FileEntry(path=rel, bytes=st.st_size, sha256=sha, role="raw"))
    if not files:
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))} skipped)" if skipped else ""
        raise StageError(f"no input files in {raw_dir} matching {include}{why}: add files or change ingest.include")
    write_json_atomic(cache_path, new_cache, indent=None)
    listing = canonical_json([[f.path, f.sha256] for f in files])
    key = cache_key("source", "1", {}, [listing])
    return Manifest(
        stage="source",
        stage_version="1",
        key=key,
        files=files,
        counters={},
        stats={"files": len(files), "bytes": sum(f.bytes for f in files), "skipped": skipped, "skipped_files": skipped_files},
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


_NON_ASCII = re.compile(rb"[\x80-\xff]")


def _decode_utf8_lines(data: bytes, repairs: list[str]) -> str | None:
    """A UTF-8 file with a few bad lines: decode it line by line, repair only the bad lines.

    Returns None unless the valid lines prove the file is UTF-8 (at least as many lines with
    genuine multi-byte UTF-8 characters as bad lines): a legacy file whose every accented line
    fails goes to detection instead. A bad line with no valid UTF-8 character is a legacy line
    and is decoded as cp1252 (Windows Western, the usual stray); a line mixing valid UTF-8 with
    stray bytes gets U+FFFD for the stray bytes only. Each repair is noted in ``repairs``
    ("line 21: cp1252", "line 7: 1 invalid byte replaced")."""
    lines = data.split(b"\n")
    good_non_ascii, bad = 0, []
    for i, raw in enumerate(lines):
        if not _NON_ASCII.search(raw):
            continue
        try:
            raw.decode("utf-8")
            good_non_ascii += 1
        except UnicodeDecodeError:
            bad.append(i)
    if not bad or good_non_ascii < len(bad):
        return None
    out = [None] * len(lines)
    for i in bad:
        mixed = lines[i].decode("utf-8", "surrogateescape")
        stray = sum(1 for ch in mixed if "\udc80" <= ch <= "\udcff")
        genuine = sum(1 for ch in mixed if ord(ch) > 0x7F and not "\udc80" <= ch <= "\udcff")
        if not genuine:
            try:
                out[i] = lines[i].decode("cp1252")
                repairs.append(f"line {i + 1}: cp1252")
                continue
            except UnicodeDecodeError:
                pass
        out[i] = lines[i].decode("utf-8", "replace")
        repairs.append(f"line {i + 1}: {stray} invalid byte{'s' if stray != 1 else ''} replaced")
    return "\n".join(o if o is not None else raw.decode("utf-8") for o, raw in zip(out, lines))


def decode_bytes(data: bytes, *, html: bool = False, min_confidence: float = 0.5,
                 repairs: list[str] | None = None) -> tuple[str, str]:
    """Decode with a BOM, then a declared HTML charset, then strict UTF-8, then UTF-8 with the few
    bad lines repaired (``_decode_utf8_lines``; each repair appended to ``repairs``), then
    charset-normalizer.

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
    notes: list[str] = []
    text = _decode_utf8_lines(data, notes)
    if text is not None:
        if repairs is not None:
            repairs.extend(notes)
        return text, "utf-8"
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


class JsonNumber:
    """A JSON number (or NaN/Infinity) as its source literal. ``float("1e400")`` is inf and a
    20-digit id read as a double loses digits (two ids collapse into one), so numbers are kept as
    the text the file wrote; an id that is a number keeps exactly that text."""

    __slots__ = ("text", "constant")

    def __init__(self, text: str, constant: bool = False):
        self.text, self.constant = text, constant

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


_DECODER = json.JSONDecoder(parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=lambda t: JsonNumber(t, True))
_JSON_TYPES = {str: "string", bool: "boolean", type(None): "null", list: "array", dict: "object", JsonNumber: "number",
               int: "number", float: "number"}


def json_type(v) -> str:
    """The JSON name of a parsed value's type (for error details)."""
    return _JSON_TYPES.get(type(v), type(v).__name__)


def load_json(raw: bytes | str):
    """One JSON text -> (value, None) or (None, (reason, detail)); never raises on content.

    Numbers come back as ``JsonNumber`` (exact literal); a nesting deeper than Python's
    recursion limit is ``too_deep``, not a traceback."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", str(e))
    try:
        return _DECODER.decode(text), None
    except json.JSONDecodeError as e:
        return None, ("invalid_json", str(e))
    except RecursionError:
        return None, ("too_deep", "JSON nested deeper than the parser's recursion limit; flatten the record")


def source_id_text(v) -> tuple[str | None, tuple[str, str] | None]:
    """The source's id as text: a string as it is, a number as its literal; (None, why) for an
    id that names nothing (NaN, Infinity, true, an object or array): its text would be made up."""
    if v is None or isinstance(v, str):
        return v, None
    if isinstance(v, JsonNumber) and not v.constant:
        return v.text, None
    if isinstance(v, int) and not isinstance(v, bool):  # exact (orjson parses ints up to 64 bits exactly)
        return str(v), None
    shown = v.text if isinstance(v, JsonNumber) else json_type(v)
    return None, ("invalid_id", f"id must be a string or a number, got {shown}; give the record a string id")


def _lone_surrogate(fields: dict) -> tuple[str, str] | None:
    """A lone UTF-16 surrogate (an escaped ``"\\ud800"``) is not text and cannot be written as
    UTF-8: name the field and position so the line can be fixed."""
    for name, v in fields.items():
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return "invalid_unicode", f"{name} has a lone surrogate {v[e.start]!a} at character {e.start}; fix the escape"
    return None


def json_to_record(obj, *, rel: str, sha: str, line: int, encoding: str, cfg) -> tuple[dict | None, tuple[str, str] | None]:
    """Map one JSON value to a record, or return (None, (reason, detail))."""
    if not isinstance(obj, dict):
        return None, ("wrong_type", f"a record must be a JSON object, got {json_type(obj)}")
    md_in, why = _metadata_object(obj)
    if why is not None:
        return None, why
    if "target" in obj or "input" in obj:
        inp, tgt = obj.get("input", ""), obj.get("target")
        if not isinstance(inp, str):
            return None, ("wrong_type", f"input must be a string, got {json_type(inp)}")
        if not isinstance(tgt, str):
            return None, ("wrong_type", f"target must be a string, got {json_type(tgt)}")
        default_type = "sft"
    elif "text" in obj:
        inp, tgt = "", obj["text"]
        if not isinstance(tgt, str):
            return None, ("wrong_type", f"text must be a string, got {json_type(tgt)}")
        default_type = cfg.default_task_type
    else:
        if PAIR_KEYS & obj.keys():  # a reader of training records only (c2m validate, c2m dedup on JSONL)
            return None, _pair_reject(obj) or ("preference_pair", "a preference record (prompt/chosen/rejected): "
                                               "this reader takes training records; the pipeline's ingest keeps it as a pair")
        return None, ("unknown_shape", f"expected keys input/target or text (or prompt/chosen/rejected), got {sorted(obj)[:8]}")
    meta, why = _provenance(obj, md_in, {"input": inp, "target": tgt}, default_type, rel=rel, sha=sha, line=line,
                            encoding=encoding, cfg=cfg)
    if why is not None:
        return None, why
    return make_record(inp, tgt, **meta), None


def _metadata_object(obj: dict) -> tuple[dict | None, tuple[str, str] | None]:
    """A record's ``metadata``: an object, absent or null (then empty); anything else is wrong_type."""
    md_in = obj.get("metadata", {})
    if md_in is None:
        md_in = {}
    if not isinstance(md_in, dict):
        return None, ("wrong_type", f"metadata must be an object, got {json_type(md_in)}")
    return md_in, None


def _provenance(obj: dict, md_in: dict, texts: dict[str, str], default_type: str, *, rel: str, sha: str, line: int,
                encoding: str, cfg) -> tuple[dict | None, tuple[str, str] | None]:
    """The metadata every record kind gets (schemas.records make_record / make_pair keywords): task type,
    domain, source and its id, where it was read; or (None, (reason, detail)) for a wrong-typed metadata
    field, an unusable id, or a lone surrogate in any text."""
    why = _metadata_types(md_in)
    if why is not None:
        return None, why
    src_id, why = source_id_text(obj.get("id"))
    if why is not None:
        return None, why
    lang = _str_or_none(md_in.get("lang") or obj.get("lang"))
    why = _lone_surrogate({"id": src_id, **texts, "metadata.task_type": md_in.get("task_type"),
                           "metadata.domain": md_in.get("domain"), "metadata.source": md_in.get("source"), "lang": lang})
    if why is not None:
        return None, why
    return {"task_type": md_in.get("task_type") or default_type, "domain": md_in.get("domain") or cfg.default_domain,
            "source": _str_or_none(md_in.get("source")) or rel, "source_id": src_id, "source_path": rel,
            "source_sha256": sha, "source_line": line, "encoding": encoding, "lang": lang}, None


PAIR_KEYS = frozenset(PAIR_TEXT_FIELDS)
PAIR_TASK_TYPE = "preference"  # metadata.task_type of a preference record that names none


def _metadata_types(md_in: dict) -> tuple[str, str] | None:
    for name in ("task_type", "domain", "source"):
        if name in md_in and not isinstance(md_in[name], str):
            return "wrong_type", f"metadata.{name} must be a string, got {json_type(md_in[name])}"
    return None


def is_pair_shape(obj) -> bool:
    """A JSON object that is a preference record (or tries to be one): it has a prompt/chosen/rejected
    key and none of a training record's (input/target/text; those win, as they always did)."""
    return isinstance(obj, dict) and bool(PAIR_KEYS & obj.keys()) and not {"input", "target", "text"} & obj.keys()


def _pair_reject(obj: dict) -> tuple[str, str] | None:
    """Why ``obj`` cannot be a preference record: a pair field missing (incomplete_pair) or not a string."""
    missing = [k for k in PAIR_TEXT_FIELDS if k not in obj]
    if missing:
        have = [k for k in PAIR_TEXT_FIELDS if k in obj]
        return "incomplete_pair", (f"has {', '.join(have)} but not {', '.join(missing)}: a preference record needs "
                                   f"prompt, chosen and rejected (strings); add the missing field(s) or drop the line")
    for k in PAIR_TEXT_FIELDS:
        if not isinstance(obj[k], str):
            return "wrong_type", f"{k} must be a string, got {json_type(obj[k])}"
    return None


def json_to_pair(obj, *, rel: str, sha: str, line: int, encoding: str, cfg) -> tuple[dict | None, tuple[str, str] | None]:
    """Map one JSON object with prompt/chosen/rejected to a preference record (schemas.records.make_pair, the
    same provenance metadata a training record gets), or return (None, (reason, detail)). Empty texts pass
    here: clean drops them with their reason, as it does for training records."""
    if not isinstance(obj, dict):
        return None, ("wrong_type", f"a record must be a JSON object, got {json_type(obj)}")
    why = _pair_reject(obj)
    if why is not None:
        return None, why
    md_in, why = _metadata_object(obj)
    if why is not None:
        return None, why
    meta, why = _provenance(obj, md_in, {k: obj[k] for k in PAIR_TEXT_FIELDS}, PAIR_TASK_TYPE, rel=rel, sha=sha,
                            line=line, encoding=encoding, cfg=cfg)
    if why is not None:
        return None, why
    return make_pair(obj["prompt"], obj["chosen"], obj["rejected"], **meta), None


try:  # ISA-L inflates ~1.8x faster than zlib on this corpus kind; zlib (same results) when absent
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - the data extra installs isal
    _fast_zlib = zlib


def inflate_one_member(data: bytes, limit: int) -> bytes | None:
    """The inflated bytes of ``data`` when it is exactly one complete gzip member (CRC and length
    checked by the inflater) of at most ``limit`` bytes, in one call; None for anything else
    (several members, a cut or corrupt stream, too large), which ``gunzip_bounded`` and
    ``_gzip_prefix`` then read to decide the reject. The common case, at ISA-L speed."""
    try:
        d = _fast_zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(data, limit + 1)
    except Exception:  # zlib.error / isal's IsalError: the careful path below names the problem
        return None
    return out if d.eof and not d.unused_data and len(out) <= limit else None


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Inflate gzip bytes, stopping past ``limit`` inflated bytes (a 200 KB bomb would otherwise
    take 200 MiB before the size check): returns at most ``limit + 1`` bytes, so a caller sees
    ``len(out) > limit`` and rejects the file. Raises OSError/EOFError/zlib.error when corrupt."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        return f.read(limit + 1)


LINE_EXT = {".jsonl", ".ndjson"}  # one record a line: a cut file still has whole records before the cut


def _gzip_prefix(data: bytes, limit: int) -> bytes:
    """What a gzip stream that ends early inflates to, at most ``limit + 1`` bytes. zlib directly:
    GzipFile drops the output of its last input buffer when it hits the cut."""
    out, rest = bytearray(), data
    while rest and len(out) <= limit:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += d.decompress(rest, limit + 1 - len(out))
            if not d.eof:
                if not d.unconsumed_tail:
                    out += d.flush()
                break
        except zlib.error:
            break
        rest = d.unused_data.lstrip(b"\0")  # the next member of a multi-member file (zero padding is allowed)
    return bytes(out[: limit + 1])


def read_raw(data: bytes, rel: str, max_bytes: int) -> tuple[bytes | None, str, dict | None]:
    """A raw file's bytes -> (content, name without .gz, None) or (None, name, quarantine row)
    for a corrupt gzip or content over ``max_bytes``. Shared by ingest and ``c2m dedup``.

    A JSONL .gz cut short (an interrupted download) gives (its complete lines, name, a
    ``truncated_gzip`` row holding the cut last line): the caller keeps both."""
    name = rel.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        try:
            one = inflate_one_member(data, max_bytes)
            data = one if one is not None else gunzip_bounded(data, max_bytes)
        except EOFError as e:
            prefix = _gzip_prefix(data, max_bytes) if os.path.splitext(name)[1] in LINE_EXT else b""
            whole = prefix[: prefix.rfind(b"\n") + 1]
            if not whole or len(prefix) > max_bytes:
                return None, name, quarantine_row(STAGE, "corrupt_gzip", detail=str(e), source_path=rel)
            tail, lines = prefix[len(whole):], whole.count(b"\n")
            return whole, name, quarantine_row(
                STAGE, "truncated_gzip", source_path=rel, source_line=lines + 1, record=tail[:512],
                detail=f"gzip stream ends early ({e}): the {lines} complete lines before the cut are kept; "
                       f"this row holds the cut line ({len(tail)} bytes); fetch the file again for the rest")
        except (OSError, zlib.error) as e:
            return None, name, quarantine_row(STAGE, "corrupt_gzip", detail=str(e), source_path=rel)
        if len(data) > max_bytes:
            return None, name, quarantine_row(STAGE, "file_too_large", detail=f"inflates to more than {max_bytes} bytes > ingest.max_file_bytes",
                                              source_path=rel)
    elif len(data) > max_bytes:
        return None, name, quarantine_row(STAGE, "file_too_large", detail=f"{len(data)} bytes > ingest.max_file_bytes", source_path=rel)
    return data, name, None


def read_raw_file(path: Path, rel: str, max_bytes: int) -> tuple[bytes | None, str, dict | None]:
    """``read_raw`` on a file (content inflated), refusing an oversized plain file before reading it."""
    size = Path(path).stat().st_size
    if not rel.lower().endswith(".gz") and size > max_bytes:
        return None, rel.lower(), quarantine_row(STAGE, "file_too_large", detail=f"{size} bytes > ingest.max_file_bytes", source_path=rel)
    try:
        data = Path(path).read_bytes()
    except OSError as e:  # permissions, an I/O error: this file is quarantined, the run goes on
        return None, rel.lower(), quarantine_row(STAGE, "unreadable_file", detail=f"{e.strerror or e}; make it readable and rerun",
                                                 source_path=rel)
    return read_raw(data, rel, max_bytes)


def parse_file(data: bytes, rel: str, sha: str, cfg, stats: dict | None = None,
               pairs: list[dict] | None = None) -> tuple[list[dict], list[dict], int]:
    """One raw file -> (records, quarantine rows, units read). Never raises on bad content.

    ``stats`` (optional) receives ``html_<method>: 1`` for an HTML file (see ``extract_html``) and
    ``decode_repairs: n`` for lines repaired while decoding (see ``decode_bytes``). Preference records
    (JSON lines with prompt/chosen/rejected) are appended to ``pairs`` when it is given (they count
    among the units read); without it they are quarantined as ``preference_pair`` (a reader of
    training records only)."""
    data, name, reject = read_raw(data, rel, cfg.max_file_bytes)
    if data is None:
        return [], [reject], 1
    ext = os.path.splitext(name)[1]

    if ext in JSON_EXT:
        records, rejects, n_in = _parse_json_lines(data, rel, sha, cfg, whole=(ext == ".json"), pairs=pairs)
        if reject is not None:  # a cut .jsonl.gz: its complete lines above, its cut tail here
            return records, rejects + [reject], n_in + 1
        return records, rejects, n_in

    repairs: list[str] = []
    try:
        text, encoding = decode_bytes(data, html=ext in HTML_EXT, min_confidence=cfg.min_encoding_confidence, repairs=repairs)
    except DecodeError as e:
        return [], [quarantine_row(STAGE, e.reason, detail=e.detail, source_path=rel, record=data[:256])], 1
    if ext in HTML_EXT:
        text, method = extract_html(text)
        if stats is not None:
            stats[f"html_{method}"] = stats.get(f"html_{method}", 0) + 1
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    record = make_record(
        "", text, task_type=cfg.default_task_type, domain=cfg.default_domain, source=rel.split("/")[0],
        source_path=rel, source_sha256=sha, encoding=encoding, decode_repairs="; ".join(repairs) or None,
    )
    if repairs and stats is not None:
        stats["decode_repairs"] = stats.get("decode_repairs", 0) + len(repairs)
    return [record], [], 1


def _parse_json_lines(data: bytes, rel: str, sha: str, cfg, whole: bool,
                      pairs: list[dict] | None = None) -> tuple[list[dict], list[dict], int]:
    records, rejects, n_pairs = [], [], 0
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[3:], "utf-8-sig"
    if whole:
        obj, why = load_json(data)
        if why is not None:
            reason = "invalid_json" if why[0] == "invalid_utf8" else why[0]
            return [], [quarantine_row(STAGE, reason, detail=why[1], source_path=rel, record=data[:512])], 1
        items = obj if isinstance(obj, list) else [obj]
        lines = [(i + 1, item, None) for i, item in enumerate(items)]
    else:
        lines = []
        physical = data.split(b"\n")
        if physical and physical[-1] == b"":
            physical.pop()  # the final newline ends the last line; it does not start an empty one
        for i, raw in enumerate(physical, start=1):
            if not raw.strip():  # an empty line is a defect worth counting, not silence
                rejects.append(quarantine_row(STAGE, "blank_line", source_path=rel, source_line=i))
                continue
            obj, why = load_json(raw)
            if why is not None:
                rejects.append(quarantine_row(STAGE, why[0], detail=why[1], source_path=rel, source_line=i, record=raw))
            else:
                lines.append((i, obj, raw))
    for line_no, obj, raw in lines:
        pair = pairs is not None and is_pair_shape(obj)
        convert = json_to_pair if pair else json_to_record
        rec, why = convert(obj, rel=rel, sha=sha, line=line_no, encoding=encoding, cfg=cfg)
        if rec is None:
            # the line as the file wrote it (a re-dump could fail on what made it bad: depth, surrogates)
            shown = raw if raw is not None else (obj if isinstance(obj, dict) else json_type(obj))
            rejects.append(quarantine_row(STAGE, why[0], detail=why[1], source_path=rel, source_line=line_no, record=shown))
        elif pair:
            pairs.append(rec)
            n_pairs += 1
        else:
            records.append(rec)
    return records, rejects, len(records) + len(rejects) + n_pairs


# ---------------------------------------------------------------------------------------------
# one unit = one raw file
# ---------------------------------------------------------------------------------------------
def _ingest_unit(args) -> dict:
    store_root, unit_key, raw_path, rel, sha, cfg = args
    store = Store(store_root)

    def write(tmp: Path) -> dict:
        stats: dict = {}
        pairs: list[dict] = []
        size = Path(raw_path).stat().st_size
        if not rel.lower().endswith(".gz") and size > cfg.max_file_bytes:  # refused before it is read into memory
            records, rejects, n_in = [], [quarantine_row(STAGE, "file_too_large", detail=f"{size} bytes > ingest.max_file_bytes",
                                                         source_path=rel)], 1
        else:
            try:
                data = Path(raw_path).read_bytes()
            except OSError as e:  # permissions, an I/O error: this file is quarantined, the run goes on
                data = None
                records, rejects, n_in = [], [quarantine_row(STAGE, "unreadable_file", detail=f"{e.strerror or e}; make it "
                                                             f"readable and rerun", source_path=rel)], 1
            if data is not None:
                records, rejects, n_in = parse_file(data, rel, sha, cfg, stats, pairs=pairs)
        pq.write_table(records_table(records), tmp / "records.parquet")
        files = [FileEntry("records.parquet", role="data", records=len(records))]
        if pairs:  # only files that hold preference records get a pairs part (schemas.records.PAIR_SCHEMA)
            pq.write_table(pairs_table(pairs), tmp / "pairs.parquet")
            files.append(FileEntry("pairs.parquet", role="pairs", records=len(pairs)))
        if rejects:
            pq.write_table(quarantine_table(rejects), tmp / "quarantine.parquet")
            files.append(FileEntry("quarantine.parquet", role="quarantine", records=len(rejects)))
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"files": files, "counters": {"in": n_in, "out": len(records) + len(pairs), "rejected": reasons,
                                             "duplicates": 0}, "source_path": rel, "pairs": len(pairs), **stats}

    return store.unit_write(STAGE, unit_key, write)


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (source,) = inputs
    raw_dir = Path(source.path)
    section = cfg.ingest.hashed()
    units = []
    for i, f in enumerate(source.files):
        key = cache_key(STAGE, VERSION, section, [f.path, f.sha256])
        args = (str(ctx.store.root), key, str(raw_dir / f.path), f.path, f.sha256, cfg.ingest)
        units.append(Unit(key=key, stem=f"{i:06d}-{f.sha256[:12]}", label=f.path, args=args, bytes=f.bytes))
    files, counters, stats = gather_units(STAGE, units, _ingest_unit, ctx, out_dir, cfg.ingest.workers,
                                          ("html_trafilatura", "html_stdlib", "decode_repairs", "pairs"))
    # Files the scan left out (links leaving the folder, names outside ingest.include, ...): not
    # records, so not in the counters, but counted with their reasons where the run is reported.
    skipped = source.stats.get("skipped") or {}
    if skipped:
        stats["skipped"] = skipped
        stats["skipped_files"] = source.stats.get("skipped_files", [])
        ctx.info("ingest: skipped %s", ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
