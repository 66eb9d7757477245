"""augment: add noised copies of training inputs, capped per task type.

EDA-style noise on the input side only (the target must stay a valid answer to it):
``word_swap`` swaps adjacent words, ``word_dropout`` drops words. Only original records (no
``metadata.parent_id``) whose ``task_type`` is in ``augment.task_types`` and whose input has at
least ``augment.min_words`` words are parents. Per task type at most
``floor(max_ratio * originals of that type)`` records are added, so augmentation cannot swamp
the real data. Which parents are used is decided by ``sha256(seed:id)`` order, and each edit's
random stream is seeded from (seed, parent id, method, round), so the output does not depend on
input order, process or run.

An augmented record is ``<parent_id>#aug<k>`` with the parent's target and metadata plus
``parent_id`` and ``aug_method``. An edit that leaves the input unchanged (or repeats an earlier
edit of the same parent) is not emitted; the next parent is tried and the skip is counted in the
stats (no input record is dropped, so nothing is quarantined).

Baseline, replaced by the back-translation issue: word-level noise only, no paraphrase model.
The parents of the augmented task types are held in memory (the other records stream through).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path
from typing import Callable, Iterable

from schemas.records import records_table
from tasks.dedup import PartWriter, iter_record_batches
from tasks.stage import Manifest, StageContext

STAGE = "augment"
VERSION = "1"
SECTIONS = ("augment",)

_WS_SPLIT = re.compile(r"(\s+)")
# Rounds beyond the ones a full cap needs: room for parents whose edits came out unchanged,
# while a corpus of mostly unchangeable inputs cannot loop parents x cap times.
_SPARE_ROUNDS = 3


def _tokens(text: str) -> tuple[str, list[str], str]:
    """(leading whitespace, [word, sep, word, ..., word], trailing whitespace)."""
    core = text.strip()
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()):] if core else ""
    return lead, (_WS_SPLIT.split(core) if core else []), trail


def word_swap(text: str, p: float, rng: random.Random) -> str:
    """Swap adjacent words: at each position, with probability ``p``, the word and its right
    neighbour trade places (a swapped pair is not swapped again). Whitespace stays where it was."""
    lead, parts, trail = _tokens(text)
    words = parts[0::2]
    i = 0
    while i < len(words) - 1:
        if rng.random() < p:
            words[i], words[i + 1] = words[i + 1], words[i]
            i += 2
        else:
            i += 1
    parts[0::2] = words
    return lead + "".join(parts) + trail


def _wider(a: str, b: str) -> str:
    # When words between two separators vanish, keep the separator that carries the line break.
    return b if b.count("\n") > a.count("\n") else a


def word_dropout(text: str, p: float, rng: random.Random) -> str:
    """Drop each word with probability ``p``; never all of them (one survivor is drawn from the
    same stream). Where words vanish, the surrounding separators merge into the one with more
    line breaks, so paragraphs survive."""
    lead, parts, trail = _tokens(text)
    words, seps = parts[0::2], parts[1::2]
    if not words:
        return text
    keep = [rng.random() >= p for _ in words]
    if not any(keep):
        keep[rng.randrange(len(words))] = True
    out: list[str] = []
    gap = ""
    for i, word in enumerate(words):
        if keep[i]:
            if out:
                out.append(gap)
            out.append(word)
            gap = ""
        if i < len(seps):
            gap = _wider(gap, seps[i]) if gap else seps[i]
    return lead + "".join(out) + trail


METHODS: dict[str, Callable[[str, float, random.Random], str]] = {
    "word_swap": word_swap,
    "word_dropout": word_dropout,
}


def _rng(seed: int, parent_id: str, method: str, round_: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{parent_id}:{method}:{round_}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _parent_order(seed: int, record: dict) -> tuple:
    h = hashlib.sha256(f"{seed}:{record['id']}".encode("utf-8")).hexdigest()
    return (h, record["id"], record.get("input") or "", record.get("target") or "")


class Candidates:
    """Counts originals per task type and keeps the records that may be parents."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.task_types = list(dict.fromkeys(cfg.task_types))
        self.originals: dict[str, int] = {}
        self.eligible: dict[str, list[dict]] = {t: [] for t in self.task_types}

    def add(self, record: dict) -> None:
        md = record.get("metadata") or {}
        if md.get("parent_id"):  # an earlier augmentation: neither counted as real data nor re-noised
            return
        tt = md.get("task_type") or ""
        self.originals[tt] = self.originals.get(tt, 0) + 1
        if tt in self.eligible and record.get("id") and len((record.get("input") or "").split()) >= self.cfg.min_words:
            self.eligible[tt].append(record)

    def augment(self) -> tuple[list[dict], dict]:
        """(augmented records, stats). Per task type: parents in sha256(seed:id) order, one edit
        each per round with methods round-robin, until the cap is reached."""
        cfg = self.cfg
        methods = list(cfg.methods)
        added: list[dict] = []
        per_parent: dict[str, int] = {}
        stats = {"no_change": 0, "repeated": 0, "methods": {m: 0 for m in dict.fromkeys(methods)}, "task_types": {}}
        for tt in self.task_types:
            n_orig = self.originals.get(tt, 0)
            # The epsilon keeps 0.7 * 10 = 6.9999... from losing a record to float rounding.
            cap = math.floor(cfg.max_ratio * n_orig + 1e-9)
            parents = sorted(self.eligible[tt], key=lambda r: _parent_order(cfg.seed, r))
            made = 0
            outputs: dict[int, set[str]] = {}
            if parents and methods:
                rounds = math.ceil(cap / len(parents)) + _SPARE_ROUNDS
                for round_ in range(rounds):
                    progress = False
                    for pos, parent in enumerate(parents):
                        if made >= cap:
                            break
                        method = methods[(round_ * len(parents) + pos) % len(methods)]
                        pid, text = parent["id"], parent.get("input") or ""
                        new = METHODS[method](text, cfg.probability, _rng(cfg.seed, pid, method, round_))
                        seen = outputs.setdefault(pos, set())
                        if new == text:
                            stats["no_change"] += 1
                            continue
                        if new in seen:
                            stats["repeated"] += 1
                            continue
                        seen.add(new)
                        k = per_parent[pid] = per_parent.get(pid, 0) + 1
                        md = {**(parent.get("metadata") or {}), "parent_id": pid, "aug_method": method}
                        added.append({"id": f"{pid}#aug{k}", "input": new, "target": parent.get("target"), "metadata": md})
                        stats["methods"][method] += 1
                        made += 1
                        progress = True
                    if made >= cap or not progress:
                        break
            stats["task_types"][tt] = {
                "originals": n_orig,
                "eligible": len(parents),
                "cap": cap,
                "augmented": made,
                "ratio": round(made / n_orig, 4) if n_orig else 0.0,
            }
        for tt, n in sorted(self.originals.items()):
            stats["task_types"].setdefault(tt, {"originals": n, "eligible": 0, "cap": 0, "augmented": 0, "ratio": 0.0})
        return added, stats


def augment_records(records: Iterable[dict], cfg) -> list[dict]:
    """The augmented records (only the added ones) for ``records``; ``cfg`` is the augment
    section (AugmentConfig)."""
    cands = Candidates(cfg)
    for rec in records:
        cands.add(rec)
    return cands.augment()[0]


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (upstream,) = inputs
    cands = Candidates(cfg.augment)
    writer = PartWriter(out_dir)
    n_in = 0
    for batch in iter_record_batches(upstream.files_with("data"), STAGE):
        writer.write(batch)  # originals pass through unchanged, in input order
        for rec in batch.to_pylist():
            n_in += 1
            cands.add(rec)
    added, stats = cands.augment()
    for i in range(0, len(added), 4096):
        writer.write(records_table(added[i:i + 4096]))
    files = writer.close()
    counters = {"in": n_in, "added": len(added), "out": n_in + len(added), "rejected": {}, "duplicates": 0}
    stats["parts"] = len(files)
    ctx.info("augment: %d originals, %d augmented", n_in, len(added))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
