"""Reading a JSON Lines file a user points at (DPO pairs, dedup evaluation sets, `c2m validate` pairs):
one object per line, blank lines skipped, ``.gz`` inflated, and a bad line named by path and line number
with what the file should hold, never a bare JSONDecodeError. Raw corpora go through tasks/ingest.py
instead, which quarantines a bad line rather than stopping."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from corpus2model.tasks.stage import StageError


def iter_json_objects(path: str | Path, expected: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line of ``path``; ``expected`` ends the error
    message (e.g. "preference pairs are one JSON object a line with prompt/chosen/rejected")."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    for n, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}:{n}: not valid JSON ({e}); {expected}") from None
        if not isinstance(obj, dict):
            raise StageError(f"{path}:{n}: not a JSON object; {expected}")
        yield n, obj
