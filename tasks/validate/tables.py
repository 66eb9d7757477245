"""The tables Great Expectations checks, built from what the stages hold.

Records (RECORD_SCHEMA) become a DataFrame with ``metadata`` flattened into ``metadata_<field>``
columns plus columns no stage stores but suites check (``source_record``, ``aug_parent_missing``,
and the ``raw_*`` columns read back from the raw JSON files: what ingest normalised away).
Preference pairs become id/prompt/chosen/rejected/metadata_<key> plus ``chosen_equals_rejected``.
pandas is imported inside the functions (heavy; only validation needs it).
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from corpus2model.schemas.records import METADATA_FIELDS
from corpus2model.tasks.ingest import JSON_EXT  # the raw extensions ingest parses as JSON
from corpus2model.tasks.stage import StageError


def records_frame(data) -> "pd.DataFrame":  # noqa: F821
    """Records (a RECORD_SCHEMA pyarrow Table or a DataFrame with a ``metadata`` column of dicts)
    -> a DataFrame with ``metadata`` flattened into ``metadata_<field>`` columns, rows 0..n-1."""
    import pandas as pd

    if isinstance(data, pa.Table):
        cols = {name: data.column(name).to_pandas() for name in ("id", "input", "target") if name in data.column_names}
        if "metadata" in data.column_names:
            md = data.column("metadata").combine_chunks()
            for i, f in enumerate(md.type):
                cols[f"metadata_{f.name}"] = md.field(i).to_pandas()
        df = pd.DataFrame(cols)
    elif isinstance(data, pd.DataFrame):
        df = data.reset_index(drop=True)
        if "metadata" in df.columns:
            md = pd.DataFrame([m if isinstance(m, dict) else {} for m in df["metadata"]], index=df.index)
            md.columns = [f"metadata_{c}" for c in md.columns]
            df = pd.concat([df.drop(columns=["metadata"]), md], axis=1)
    else:
        raise TypeError(f"validate_table needs a pyarrow Table or a pandas DataFrame, got {type(data).__name__}")
    # Every known metadata field exists (all-null if absent) so suites can name it on any input.
    for name, _ in METADATA_FIELDS:
        if f"metadata_{name}" not in df.columns:
            df[f"metadata_{name}"] = None
    df = df.reset_index(drop=True)
    _derive_record_columns(df)
    return df


RAW_COLUMNS = ("raw_id_type", "raw_metadata_absent", "raw_metadata_missing_fields", "raw_extra_keys")
REQUIRED_SFT_METADATA = ("task_type", "domain", "source")
_SFT_KEYS = {"id", "input", "target", "metadata", "lang"}
_TEXT_KEYS = {"id", "text", "metadata", "lang"}


def _derive_record_columns(df) -> None:
    """Columns no stage stores but suites check: ``source_record`` (one original record per source id
    and file; record ids are content hashes and cannot show it), ``aug_parent_missing`` (an augmented
    record whose original is not in the table) and the raw_* columns (null unless filled from raw files)."""
    original = df["metadata_parent_id"].isna() & df["metadata_aug_method"].isna()
    has_sid = df["metadata_source_id"].notna() & original
    df["source_record"] = None
    if has_sid.any():
        df.loc[has_sid, "source_record"] = (
            df.loc[has_sid, "metadata_source_path"].fillna("?").astype(str) + "#" + df.loc[has_sid, "metadata_source_id"].astype(str)
        )
    ids = set(df["id"].dropna())
    augmented = df["metadata_aug_method"].notna()
    parents = df["metadata_parent_id"]
    missing = augmented & (parents.isna() | ~parents.isin(ids))
    df["aug_parent_missing"] = None
    if missing.any():
        df.loc[missing, "aug_parent_missing"] = parents[missing].fillna("(null)")
    for name in RAW_COLUMNS:
        if name not in df.columns:
            df[name] = None


def raw_shape(obj) -> dict:
    """What a raw JSON record says that ingest does not keep: the id's JSON type, a missing metadata
    object or required field (ingest fills defaults), and keys it does not map (ingest drops them)."""
    if not isinstance(obj, dict):
        return {}
    sft = "input" in obj or "target" in obj
    out: dict[str, Any] = {"raw_id_type": _json_type(obj["id"]) if "id" in obj else None}
    md = obj.get("metadata")
    if sft and "metadata" not in obj:
        out["raw_metadata_absent"] = "metadata"
    elif sft and isinstance(md, dict):
        gone = [f for f in REQUIRED_SFT_METADATA if f not in md]
        out["raw_metadata_missing_fields"] = ",".join(gone) or None
    extra = sorted(set(obj) - (_SFT_KEYS if sft else _TEXT_KEYS))
    out["raw_extra_keys"] = ",".join(extra) or None
    return out


def _json_type(v) -> str:
    return {str: "str", bool: "bool", int: "int", float: "float", list: "list", dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def raw_shapes(data: bytes, rel: str) -> dict[int, dict]:
    """source_line -> raw_shape for one raw JSON/JSONL file (optionally .gz), numbered the way ingest
    numbers them (physical 1-based lines; items of a .json array). Unreadable lines are skipped:
    ingest already quarantined them with their reason. Non-JSON files give {}."""
    name = rel.lower()
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except EOFError:  # a cut .jsonl.gz: ingest keeps its complete lines, so their shapes count too
            try:
                data = zlib.decompressobj(31).decompress(data)
            except zlib.error:
                return {}
        except (OSError, zlib.error):
            return {}
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    if ext not in JSON_EXT:
        return {}
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: dict[int, dict] = {}
    if ext == ".json":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # too_deep: quarantined by ingest
            return {}
        for i, item in enumerate(obj if isinstance(obj, list) else [obj], start=1):
            out[i] = raw_shape(item)
        return out
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out[i] = raw_shape(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # too_deep: quarantined by ingest
            continue
    return out


def raw_columns(table: pa.Table, read_raw) -> dict[str, list]:
    """The raw_* columns for records, row-aligned: ``read_raw(source_path) -> bytes | None`` reads
    each raw file once (None: not available, e.g. a record Parquet validated on its own)."""
    if "metadata" not in table.column_names or table.num_rows == 0:
        return {}
    md = table.column("metadata").combine_chunks()
    paths = md.field("source_path").to_pylist()
    lines = md.field("source_line").to_pylist()
    shapes: dict[str, dict[int, dict]] = {}
    for rel in sorted({p for p in paths if p}):
        data = read_raw(rel)
        shapes[rel] = raw_shapes(data, rel) if data is not None else {}
    cols: dict[str, list] = {name: [] for name in RAW_COLUMNS}
    for rel, line in zip(paths, lines):
        shape = shapes.get(rel, {}).get(line, {}) if rel and line is not None else {}
        for name in RAW_COLUMNS:
            cols[name].append(shape.get(name))
    return cols


def file_reader(root: Path):
    """``read_raw`` for raw_columns: files below ``root`` by their source_path, None when absent."""
    root = Path(root)

    def read(rel: str) -> bytes | None:
        p = root / rel
        return p.read_bytes() if p.is_file() else None

    return read


PAIR_TEXT = ("prompt", "chosen", "rejected")


def pairs_frame(data) -> "pd.DataFrame":  # noqa: F821
    """Preference pairs (a pyarrow Table, DataFrame, list of dicts or a JSONL path) -> the frame the
    preference_pairs suite sees: id, prompt, chosen, rejected, metadata_<key>, chosen_equals_rejected."""
    import pandas as pd

    if isinstance(data, (str, Path)):
        data = read_pairs(data)
    if isinstance(data, pa.Table):
        data = data.to_pylist()
    if isinstance(data, pd.DataFrame):
        data = data.to_dict("records")
    if not isinstance(data, list):
        raise TypeError(f"preference pairs must be a path, pyarrow Table, DataFrame or list of dicts, got {type(data).__name__}")
    rows = []
    for obj in data:
        row = {k: obj.get(k) for k in ("id", *PAIR_TEXT)}
        for k, v in (obj.get("metadata") or {}).items():
            row[f"metadata_{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["id", *PAIR_TEXT])
    for k in ("id", *PAIR_TEXT):
        if k not in df.columns:
            df[k] = None
    df["chosen_equals_rejected"] = [c is not None and c == r for c, r in zip(df["chosen"], df["rejected"])]
    return df


def read_pairs(path: str | Path) -> list[dict]:
    """A preference-pairs JSONL (optionally .gz); a line that is not a JSON object is a clear error."""
    from corpus2model.tasks.common.jsonl import iter_json_objects

    return [obj for _, obj in iter_json_objects(path, "preference pairs are one JSON object a line with "
                                                      "prompt/chosen/rejected")]
