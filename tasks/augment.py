"""augment: add paraphrased or noised copies of training inputs, capped per task type.

Methods (``augment.methods``, taking turns over the parents):

* ``backtranslate``: source -> pivot -> source through Hugging Face seq2seq models
  (tasks/text/backtranslate.py: batched generate, sentence splitting, a content-addressed translation
  cache in the run store, filters with named reasons). Pivots take turns over the back-translated
  parents. A candidate that fails a filter is never a record: it is counted in ``stats.bt_rejected``
  by reason and kept in ``report/backtranslate_rejected.parquet`` (role "report").
* ``synonym``: WordNet 3.0 synonym replacement (tasks/text/thesaurus.py, table bundled in data/thesaurus).
* ``word_swap`` / ``word_dropout``: EDA noise (baseline: no paraphrase, just word-level noise).

Only the input is changed: the target must stay a valid answer to it (for ``text`` records the
input is the document itself). Only original records (no ``metadata.parent_id``) whose
``task_type`` is in ``augment.task_types`` and whose input has at least ``augment.min_words``
words are parents. Per task type at most ``floor(ratio * originals of that type)`` records are
added (``max_ratio_by_task`` overrides ``max_ratio``), so augmentation cannot swamp the real data.
Which parents are used is decided by ``sha256(seed:id)`` order, and each edit's random stream is
seeded from (seed, parent id, method, round), so the output does not depend on input order,
process or run (back-translation with greedy/beam decoding is deterministic; sampled output is
fixed by the decoding seed and then kept by the cache).

An augmented record is ``<parent_id>#aug<k>`` with the parent's target and metadata plus
``parent_id`` and ``aug_method``; shard buckets it by ``parent_id``, so a copy always lands in
its parent's split. An edit that leaves the input unchanged (or repeats an earlier edit of the
same parent) is not emitted; the next parent is tried and the skip is counted in the stats (no
input record is dropped, so nothing is quarantined).

Back-translations are requested in windows: when the next job is a back-translation not yet made,
every back-translation among the next ``cap - made`` jobs (at least one batch) is translated in
one batched call, so the model runs on batches while the result stays the sequential one.
The parents of the augmented task types are held in memory (the other records stream through).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.schemas.records import records_table
from corpus2model.tasks.dedup import PartWriter, iter_record_batches
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext
from corpus2model.tasks.text.thesaurus import synonym_replace

STAGE = "augment"
# 2: synonym and backtranslate methods, per-task-type ratios, the report of rejected back-translations.
VERSION = "2"
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


def synonym(text: str, p: float, rng: random.Random) -> str:
    """WordNet synonym replacement (tasks/text/thesaurus.py) with per-word probability ``p``."""
    return synonym_replace(text, p, rng)


METHODS: dict[str, Callable[[str, float, random.Random], str]] = {
    "word_swap": word_swap,
    "word_dropout": word_dropout,
    "synonym": synonym,
}
BACKTRANSLATE = "backtranslate"  # batched through a Translator, not a per-text function

REPORT_SCHEMA = pa.schema([
    ("parent_id", pa.string()),
    ("task_type", pa.string()),
    ("method", pa.string()),
    ("pivot", pa.string()),
    ("reason", pa.string()),
    ("score", pa.float64()),
    ("detail", pa.string()),
    ("original", pa.string()),
    ("pivot_text", pa.string()),
    ("candidate", pa.string()),
])


def _rng(seed: int, parent_id: str, method: str, round_: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{parent_id}:{method}:{round_}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _parent_order(seed: int, record: dict) -> tuple:
    h = hashlib.sha256(f"{seed}:{record['id']}".encode("utf-8")).hexdigest()
    return (h, record["id"], record.get("input") or "", record.get("target") or "")


def filter_config(bt):
    """The back-translation filter thresholds of the augment.backtranslate section."""
    from corpus2model.tasks.text.backtranslate import FilterConfig

    return FilterConfig(min_length_ratio=bt.min_length_ratio, max_length_ratio=bt.max_length_ratio,
                        check_language=bt.check_language, language_min_chars=bt.language_min_chars,
                        too_close_chrf=bt.too_close_chrf, too_far_chrf=bt.too_far_chrf)


def make_translator(cfg, cache_dir: Path | None):
    """The Translator for ``cfg`` (the augment section), caching in ``cache_dir`` (None: no cache)."""
    from corpus2model.tasks.text.backtranslate import CACHE_FILE, TranslationCache, Translator

    bt = cfg.backtranslate
    return Translator(models=dict(bt.models), decoding=dict(bt.decoding), batch_size=bt.batch_size, device=bt.device,
                      cache=TranslationCache(cache_dir / CACHE_FILE) if cache_dir else None,
                      lang_codes=dict(bt.lang_codes), max_input_tokens=bt.max_input_tokens, threads=bt.threads,
                      allow_pickle=bt.allow_pickle)


class Candidates:
    """Counts originals per task type and keeps the records that may be parents."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.task_types = list(dict.fromkeys(cfg.task_types))
        self.originals: dict[str, int] = {}
        self.eligible: dict[str, list[dict]] = {t: [] for t in self.task_types}
        self.report: list[dict] = []  # rejected back-translations (REPORT_SCHEMA rows)

    def add(self, record: dict) -> None:
        md = record.get("metadata") or {}
        if md.get("parent_id"):  # an earlier augmentation: neither counted as real data nor re-noised
            return
        tt = md.get("task_type") or ""
        self.originals[tt] = self.originals.get(tt, 0) + 1
        if tt in self.eligible and record.get("id") and len((record.get("input") or "").split()) >= self.cfg.min_words:
            self.eligible[tt].append(record)

    def ratio(self, task_type: str) -> float:
        return self.cfg.max_ratio_by_task.get(task_type, self.cfg.max_ratio)

    def augment(self, translator=None) -> tuple[list[dict], dict]:
        """(augmented records, stats). Per task type: parents in sha256(seed:id) order, one edit
        each per round with methods round-robin (shifted by one each round), until the cap is reached. ``translator`` (a
        tasks.text.backtranslate.Translator) is required when ``backtranslate`` is a method."""
        cfg = self.cfg
        methods = list(cfg.methods)
        if BACKTRANSLATE in methods and translator is None:
            raise ValueError("augment.methods has 'backtranslate' but no translator was given (make_translator)")
        added: list[dict] = []
        self.report = []
        stats = {"no_change": 0, "repeated": 0, "methods": {m: 0 for m in dict.fromkeys(methods)}, "task_types": {}}
        if BACKTRANSLATE in methods:
            stats["bt_rejected"] = {}
            stats["pivots"] = {p: 0 for p in cfg.backtranslate.pivots}
        for tt in self.task_types:
            n_orig = self.originals.get(tt, 0)
            # The epsilon keeps 0.7 * 10 = 6.9999... from losing a record to float rounding.
            cap = math.floor(self.ratio(tt) * n_orig + 1e-9)
            parents = sorted(self.eligible[tt], key=lambda r: _parent_order(cfg.seed, r))
            made = self._augment_type(tt, parents, cap, methods, translator, added, stats) if parents and methods and cap else 0
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

    def _jobs(self, parents: list[dict], cap: int, methods: list[str]) -> Iterator[tuple[int, int, str, str | None]]:
        """(round, parent position, method, pivot) in evaluation order."""
        pivots = list(self.cfg.backtranslate.pivots)
        n_methods = len(methods)
        rounds = math.ceil(cap / len(parents)) + _SPARE_ROUNDS
        bt_done = [0] * len(parents)
        for round_ in range(rounds):
            for pos in range(len(parents)):
                # Neighbouring parents take different methods, and each round shifts them by one,
                # so a parent goes through every method (one whose synonym edit is a no-op still
                # gets a back-translation or a swap in the next round).
                method = methods[(pos + round_) % n_methods]
                pivot = None
                if method == BACKTRANSLATE:
                    # Pivots take turns over the back-translated parents (every pivot is used even
                    # when the cap is reached within the first round) and over a parent's rounds.
                    pivot = pivots[(pos // n_methods + bt_done[pos]) % len(pivots)]
                    bt_done[pos] += 1
                yield round_, pos, method, pivot

    def _augment_type(self, tt: str, parents: list[dict], cap: int, methods: list[str], translator,
                      added: list[dict], stats: dict) -> int:
        cfg = self.cfg
        bt_cfg = cfg.backtranslate
        filters = filter_config(bt_cfg) if BACKTRANSLATE in methods else None
        if filters is not None:
            from corpus2model.tasks.text.backtranslate import check_candidate
        per_parent: dict[str, int] = {}
        outputs: dict[int, set[str]] = {}
        translations: dict[tuple[int, str], tuple[str, str]] = {}
        bt_tried: set[tuple[int, str]] = set()
        jobs = self._jobs(parents, cap, methods)
        window: deque = deque()
        made = 0
        cur_round, progress = 0, False
        while made < cap:
            if not window:
                nxt = next(jobs, None)
                if nxt is None:
                    break
                window.append(nxt)
            round_, pos, method, pivot = window[0]
            if round_ != cur_round:
                if not progress:
                    break  # a whole round added nothing: the parents are exhausted
                cur_round, progress = round_, False
            if method == BACKTRANSLATE and (pos, pivot) not in translations and (pos, pivot) not in bt_tried:
                # Fill the window to the records still needed (at least one batch) and translate
                # every back-translation job in it at once.
                want = max(cap - made, translator.batch_size)
                while len(window) < want and (nxt := next(jobs, None)) is not None:
                    window.append(nxt)
                todo: dict[str, list[int]] = {}
                for _, p, m, pv in window:
                    if m == BACKTRANSLATE and (p, pv) not in translations and (p, pv) not in bt_tried and p not in todo.get(pv, []):
                        todo.setdefault(pv, []).append(p)
                for pv, positions in todo.items():
                    texts = [parents[p].get("input") or "" for p in positions]
                    for p, pair in zip(positions, translator.roundtrip(texts, bt_cfg.source_lang, pv)):
                        translations[(p, pv)] = pair
            window.popleft()
            parent = parents[pos]
            pid, text = parent["id"], parent.get("input") or ""
            if method == BACKTRANSLATE:
                if (pos, pivot) in bt_tried:  # same parent, same pivot: the same translation again
                    stats["repeated"] += 1
                    continue
                bt_tried.add((pos, pivot))
                pivot_text, new = translations.pop((pos, pivot))
                reason, score, detail = check_candidate(text, pivot_text, new, bt_cfg.source_lang, pivot, filters)
                if reason:
                    stats["bt_rejected"][reason] = stats["bt_rejected"].get(reason, 0) + 1
                    self.report.append({"parent_id": pid, "task_type": tt, "method": method, "pivot": pivot,
                                        "reason": reason, "score": score, "detail": detail, "original": text,
                                        "pivot_text": pivot_text, "candidate": new})
                    continue
            else:
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
            if pivot:
                stats["pivots"][pivot] += 1
            made += 1
            progress = True
        return made


def augment_records(records: Iterable[dict], cfg, translator=None) -> list[dict]:
    """The augmented records (only the added ones) for ``records``; ``cfg`` is the augment
    section (AugmentConfig); ``translator`` is needed when ``backtranslate`` is a method."""
    cands = Candidates(cfg)
    for rec in records:
        cands.add(rec)
    return cands.augment(translator)[0]


def key_extra(cfg) -> dict:
    """What the config only points at: the thesaurus table and the translation models' content
    (a rebuilt table or a retrained model in the same folder is new output)."""
    aug = cfg.augment
    extra = {}
    if "synonym" in aug.methods:
        from corpus2model.tasks.stage import sha256_file
        from corpus2model.tasks.text.thesaurus import TABLE

        extra["thesaurus"] = sha256_file(TABLE)
    if BACKTRANSLATE not in aug.methods:
        return extra
    from corpus2model.tasks.text.backtranslate import model_identity

    src = aug.backtranslate.source_lang
    directions = [f"{a}-{b}" for p in aug.backtranslate.pivots for a, b in ((src, p), (p, src))]
    missing = [d for d in directions if d not in aug.backtranslate.models]
    if missing:
        raise ValueError(f"augment.backtranslate.models has no model for {missing}; add them or drop 'backtranslate' from augment.methods")
    return {**extra, "bt_models": {d: model_identity(aug.backtranslate.models[d]) for d in directions}}


def translation_cache_dir(ctx: StageContext) -> Path:
    return ctx.store.root / "_cache" / "translations"


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (upstream,) = inputs
    aug = cfg.augment
    cands = Candidates(aug)
    writer = PartWriter(out_dir)
    n_in = 0
    for batch in iter_record_batches(upstream.files_with("data"), STAGE):
        writer.write(batch)  # originals pass through unchanged, in input order
        for rec in batch.to_pylist():
            n_in += 1
            cands.add(rec)
    translator = make_translator(aug, translation_cache_dir(ctx)) if BACKTRANSLATE in aug.methods else None
    try:
        added, stats = cands.augment(translator)
    finally:
        if translator is not None and translator.cache is not None:
            translator.cache.close()
    for i in range(0, len(added), 4096):
        writer.write(records_table(added[i:i + 4096]))
    files = writer.close()
    if translator is not None:
        from corpus2model.tasks.text.backtranslate import pick_device

        stats["translation"] = {**translator.stats.as_dict(), "device": pick_device(aug.backtranslate.device)}
        rel = "report/backtranslate_rejected.parquet"
        (out_dir / "report").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(cands.report, schema=REPORT_SCHEMA), out_dir / rel)
        files.append(FileEntry(rel, role="report", records=len(cands.report)))
        t = stats["translation"]
        ctx.info("augment: back-translation on %s: %d sentences translated, %d from the cache, %d candidates rejected %s",
                 t["device"], t["translated"], t["cache_hits"], len(cands.report), stats["bt_rejected"])
    counters = {"in": n_in, "added": len(added), "out": n_in + len(added), "rejected": {}, "duplicates": 0}
    stats["parts"] = len([f for f in files if f.role == "data"])
    ctx.info("augment: %d originals, %d augmented", n_in, len(added))
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
