"""Record shapes every stage agrees on, defined once (pyarrow for files, helpers for dicts).

One record shape flows through the data stages: a raw text/HTML document is a record whose
``input`` is empty and whose ``target`` is the document text (``task_type`` "text": the model is
trained on all of it); a JSONL SFT pair keeps its ``input``/``target``. Provenance lives in
``metadata`` so lineage reaches back to the raw file and its sha256.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: ids are per occurrence; metadata.content_hash holds the content identity

METADATA_FIELDS = [
    ("task_type", pa.string()),
    ("domain", pa.string()),
    ("source", pa.string()),  # dataset / origin name, e.g. "openai/grade-school-math:..."
    ("source_id", pa.string()),  # the id the source gave the record, if any
    ("source_path", pa.string()),  # raw file, relative to the raw folder
    ("source_sha256", pa.string()),
    ("source_line", pa.int64()),  # 1-based line for JSONL sources
    ("encoding", pa.string()),
    # How undecodable raw bytes were repaired ("line 21: cp1252; line 40: 1 invalid byte replaced").
    ("decode_repairs", pa.string()),
    ("lang", pa.string()),
    ("parent_id", pa.string()),  # augmented records: the original's id
    ("aug_method", pa.string()),
    # The normalised-content identity (``content_hash``) of the text as the record was made; the
    # id names one occurrence, this field says which occurrences carry the same text.
    ("content_hash", pa.string()),
]
METADATA_TYPE = pa.struct(METADATA_FIELDS)

RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input", pa.string()),
        ("target", pa.string()),
        ("metadata", METADATA_TYPE),
    ]
)

# A preference record (../shared/DESIGN.md): one prompt, the response people preferred and the one they
# did not. It flows through the data stages beside training records as its own kind: clean applies its
# rules to each of the three texts, dedup compares prompt+chosen, validate uses the preference_pairs
# suite, and shard writes it to its own Parquet files (role "pairs") that DPO and the reward model read.
PAIR_TEXT_FIELDS = ("prompt", "chosen", "rejected")
PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("metadata", METADATA_TYPE),
    ]
)

# Every dropped record lands here with why it was dropped; nothing disappears silently.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("score", pa.float64()),
        ("id", pa.string()),
        ("source_path", pa.string()),
        ("source_line", pa.int64()),
        ("record", pa.string()),  # the record (JSON) or the raw bytes/line as text, truncated
    ]
)

# Dedup's removed records: each names the record it duplicates (its id and where it came from).
REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("duplicate_of", pa.string()),
        ("kind", pa.string()),
        ("source_path", pa.string()),
        ("source_line", pa.int64()),
        ("kept_source_path", pa.string()),
        ("kept_source_line", pa.int64()),
    ]
)

MAX_QUARANTINED_TEXT = 4096

_WS = re.compile(r"\s+")


def normalize_for_hash(text: str) -> str:
    """The text identity used for ids and exact dedup: NFKC, casefolded, whitespace collapsed.

    ``" ".join(s.split())`` is ``re.sub(r"\s+", " ", s).strip()`` (both split on
    ``str.isspace`` characters) at a third of the cost; ASCII text is already NFKC."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def texts_hash(*texts: str) -> str:
    """sha256 of the normalized texts joined by US (16 hex chars = 64 bits): the content identity of
    any record kind."""
    h = hashlib.sha256()
    for i, text in enumerate(texts):
        if i:
            h.update(b"\x1f")
        h.update(normalize_for_hash(text).encode("utf-8"))
    return h.hexdigest()[:16]


def content_hash(input_text: str, target_text: str) -> str:
    """The text identity of a record: the normalized input + US + target. Exact copies share it; dedup
    and contamination compare records by it."""
    return texts_hash(input_text, target_text)


def occurrence_id(source_path: str, source_line: int | None) -> str:
    """The id of one occurrence: a hash of where it was read (raw path + line; a whole-file
    document has no line). Two copies of one text in two places get two ids, so a removed
    duplicate can name the record it duplicates. The source's own id stays in
    ``metadata.source_id``: sources repeat theirs (the demo's dirty file reuses ids for different
    records), so it cannot be the unique key."""
    return occurrence_ids(source_path, [source_line])[0]


def occurrence_ids(source_path: str, source_lines) -> list[str]:
    """``occurrence_id`` for many lines of one file: the path is hashed once and each id hashes only
    its line number (nothing for None) on a copy of that state (a whole JSONL file's ids at a fifth
    of the cost)."""
    prefix = hashlib.sha256(source_path.encode("utf-8", "surrogatepass"))
    prefix.update(b"\x1f")
    out = []
    for line in source_lines:
        h = prefix.copy()
        if line is not None:
            h.update(str(int(line)).encode("ascii"))
        out.append(h.hexdigest()[:16])
    return out


def empty_metadata(**values) -> dict:
    md = {name: None for name, _ in METADATA_FIELDS}
    unknown = set(values) - set(md)
    if unknown:
        raise KeyError(f"unknown metadata fields {sorted(unknown)}; known: {sorted(md)}")
    md.update(values)
    return md


def _identified(fields: dict, chash: str, metadata: dict) -> dict:
    """``fields`` with the occurrence id (``occurrence_id`` of source_path + source_line) and the metadata
    (``content_hash`` set to ``chash`` unless given); without a source_path (records made in code) the id
    is the content hash, as there is no place to name."""
    metadata.setdefault("content_hash", chash)
    path = metadata.get("source_path")
    return {"id": chash if path is None else occurrence_id(path, metadata.get("source_line")), **fields,
            "metadata": empty_metadata(**metadata)}


def make_record(input_text: str, target_text: str, **metadata) -> dict:
    """A training record with its occurrence id and ``metadata.content_hash`` (``_identified``)."""
    return _identified({"input": input_text, "target": target_text}, content_hash(input_text, target_text), metadata)


def is_pair(record: dict) -> bool:
    """A preference record (prompt/chosen/rejected) rather than a training record (input/target)."""
    return "chosen" in record and "rejected" in record and "target" not in record


def pair_content_hash(prompt: str, chosen: str, rejected: str) -> str:
    """The text identity of a preference record, as content_hash: the normalised prompt + chosen
    (what dedup compares: the same preferred answer to the same prompt is one pair) + rejected."""
    return texts_hash(prompt, chosen, rejected)


def make_pair(prompt: str, chosen: str, rejected: str, **metadata) -> dict:
    """A preference record, with ids made as make_record makes them (``_identified``)."""
    return _identified({"prompt": prompt, "chosen": chosen, "rejected": rejected},
                       pair_content_hash(prompt, chosen, rejected), metadata)


def quarantine_row(
    stage: str,
    reason: str,
    *,
    detail: str = "",
    score: float | None = None,
    record: dict | str | bytes | None = None,
    id: str | None = None,
    source_path: str | None = None,
    source_line: int | None = None,
) -> dict:
    """One quarantine row; the record itself is kept (truncated) so a person can see what was dropped."""
    if isinstance(record, dict):
        md = record.get("metadata") or {}
        md = md if isinstance(md, dict) else {}
        id = id or _str_or_none(record.get("id"))
        source_path = source_path or _str_or_none(md.get("source_path"))
        source_line = source_line if source_line is not None else md.get("source_line")
        try:
            text = json.dumps(record, ensure_ascii=False, default=str)
        except (RecursionError, ValueError):  # too deep to print: the top level is enough to see it
            text = repr(sorted(record))
    elif isinstance(record, bytes):
        text = record.decode("utf-8", errors="backslashreplace")
    else:
        text = record or ""
    return {
        "stage": stage,
        "reason": reason,
        "detail": _utf8_safe(detail),
        "score": score,
        "id": _utf8_safe(id),
        "source_path": _utf8_safe(source_path),
        "source_line": source_line,
        "record": _utf8_safe(text[:MAX_QUARANTINED_TEXT]),
    }


def _str_or_none(v):
    return v if isinstance(v, str) else None


def _utf8_safe(text: str | None) -> str | None:
    """Text Parquet can store: a lone surrogate (an escaped ``"\\ud800"`` in JSON) becomes its
    backslash escape, so the quarantine row that reports it can be written."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def records_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def pairs_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
