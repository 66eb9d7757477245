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

SCHEMA_VERSION = "1"

METADATA_FIELDS = [
    ("task_type", pa.string()),
    ("domain", pa.string()),
    ("source", pa.string()),  # dataset / origin name, e.g. "openai/grade-school-math:..."
    ("source_id", pa.string()),  # the id the source gave the record, if any
    ("source_path", pa.string()),  # raw file, relative to the raw folder
    ("source_sha256", pa.string()),
    ("source_line", pa.int64()),  # 1-based line for JSONL sources
    ("encoding", pa.string()),
    ("lang", pa.string()),
    ("parent_id", pa.string()),  # augmented records: the original's id
    ("aug_method", pa.string()),
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

# Dedup's removed records: each names the record it duplicates.
REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("duplicate_of", pa.string()),
        ("kind", pa.string()),
        ("source_path", pa.string()),
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


def record_id(input_text: str, target_text: str) -> str:
    """Stable id: content hash of the normalized record text (16 hex chars = 64 bits)."""
    h = hashlib.sha256()
    h.update(normalize_for_hash(input_text).encode("utf-8"))
    h.update(b"\x1f")
    h.update(normalize_for_hash(target_text).encode("utf-8"))
    return h.hexdigest()[:16]


def empty_metadata(**values) -> dict:
    md = {name: None for name, _ in METADATA_FIELDS}
    unknown = set(values) - set(md)
    if unknown:
        raise KeyError(f"unknown metadata fields {sorted(unknown)}; known: {sorted(md)}")
    md.update(values)
    return md


def make_record(input_text: str, target_text: str, **metadata) -> dict:
    return {
        "id": record_id(input_text, target_text),
        "input": input_text,
        "target": target_text,
        "metadata": empty_metadata(**metadata),
    }


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
        id = id or record.get("id")
        source_path = source_path or md.get("source_path")
        source_line = source_line if source_line is not None else md.get("source_line")
        text = json.dumps(record, ensure_ascii=False, default=str)
    elif isinstance(record, bytes):
        text = record.decode("utf-8", errors="backslashreplace")
    else:
        text = record or ""
    return {
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "score": score,
        "id": id,
        "source_path": source_path,
        "source_line": source_line,
        "record": text[:MAX_QUARANTINED_TEXT],
    }


def records_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
