"""Forgetting: how much worse a continued model got on what its parent knew.

When the finetune output continued from a registry version (``finetune.init: production`` or ``path``,
tasks/model/continual.py), it carries that parent's held-out test records (``parent/test_records.jsonl``:
the first ``evaluate.max_records`` records of the parent's test split, stored with the version by the
registry). The evaluate stage's ``base`` row *is* the parent then (finetune's base/ holds its weights), so
the table already has the parent and the new model on the new test split; this adds, on the parent's
test split:

* ``old_test_perplexity`` for the ``base`` (parent) and ``tuned`` (new model) rows, and
* ``forgetting`` on the ``tuned`` row = tuned's old-test perplexity / the parent's old-test perplexity - 1.

0 means the new model predicts the parent's test data exactly as well as the parent did, 0.25 means 25 %
higher perplexity there (forgotten), below 0 means it got better at it too (backward transfer). The deploy
gate can bound it (``registry.gate.max_forgetting``). Perplexity is evaluate's (exp of the mean NLL per
target token, each record scored on its own), with this run's prompt template and tokenizer (a warm start
requires the parent's tokenizer, tasks/model/continual.py check_tokenizer).

Takes the scoring function from the evaluate stage (``perplexity_of(variant, records)``), which owns model
loading and scoring: this module only picks the records and does the arithmetic.
"""
from __future__ import annotations

import json
import math
from typing import Callable

from corpus2model.tasks.model.continual import PARENT_DIR, TEST_RECORDS
from corpus2model.tasks.stage import Manifest, StageError

PARENT_ROW, NEW_ROW = "base", "tuned"


def parent_test_records(ft: Manifest, limit: int) -> list[dict] | None:
    """The parent's test records the finetune output carries (first ``limit``), or None without them."""
    path = ft.dir / PARENT_DIR / TEST_RECORDS
    if not path.is_file():
        return None
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise StageError(f"{path} line {i + 1} is not JSON ({e}); rerun the finetune stage") from None
    return out[:limit]


def forgetting(new_ppl: float | None, parent_ppl: float | None) -> float | None:
    """new / parent - 1 on the parent's test split; None when either is missing or not finite."""
    if new_ppl is None or parent_ppl is None or not (math.isfinite(new_ppl) and math.isfinite(parent_ppl)) \
            or parent_ppl <= 0:
        return None
    return new_ppl / parent_ppl - 1.0


def add_rows(rows: list[dict], ft: Manifest, limit: int,
             perplexity_of: Callable[[str, list[dict]], float]) -> list[str]:
    """Fill ``old_test_perplexity`` (base = parent, tuned) and ``forgetting`` (tuned) into ``rows`` in place
    when ``ft`` continued from a parent with test records; returns notes for the table."""
    parent = ft.stats.get("parent")
    if not parent:
        return []
    records = parent_test_records(ft, limit)
    name = parent.get("version") or parent.get("path")
    if not records:
        return [f"parent {name} stores no test records: forgetting is n/a"]
    by = {r["variant"]: r for r in rows}
    for variant in (PARENT_ROW, NEW_ROW):
        if variant in by:
            ppl = perplexity_of(variant, records)
            by[variant]["old_test_perplexity"] = round(ppl, 4) if ppl is not None and math.isfinite(ppl) else None
    if NEW_ROW in by and PARENT_ROW in by:
        f = forgetting(by[NEW_ROW].get("old_test_perplexity"), by[PARENT_ROW].get("old_test_perplexity"))
        by[NEW_ROW]["forgetting"] = round(f, 4) if f is not None else None
    return [f"base is the parent {name}; old_test_perplexity is on its {len(records)} test records, forgetting = "
            f"tuned / base there - 1"]
