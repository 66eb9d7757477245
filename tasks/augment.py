"""augment: add paraphrased or noised copies of training inputs, capped per task type.

Methods (``augment.methods``, taking turns over the parents):

* ``backtranslate``: source -> pivot -> source through Hugging Face seq2seq models
  (tasks/text/backtranslate.py: batched generate, sentence splitting, a content-addressed translation
  cache in the run store, filters with named reasons). Pivots take turns over the back-translated
  parents. A candidate that fails a filter is never a record: it is counted in ``stats.bt_rejected``
  by reason and kept in ``report/backtranslate_rejected.parquet`` (role "report").
* ``synonym``: WordNet 3.0 synonym replacement (tasks/text/thesaurus.py, table bundled in data/thesaurus)
  that keeps the meaning: a lemma is replaced at every occurrence or none, never when it occurs in
  the target, is a number, a name or a function word, and only by a mutual synonym that the LM
  reference vocabulary knows.
* ``word_swap`` / ``word_dropout``: EDA noise (baseline: no paraphrase, just word-level noise). For
  task types with a target (schemas.config.TARGETED_TASK_TYPES) only when listed in
  ``augment.noise_task_types`` (the config refuses them otherwise): an ungrammatical prompt paired
  with the original answer teaches nothing useful.

Quality gate (issue 15): every word-level rewrite is scored by the LM-score model
(tasks/text/lmscore.py); one whose perplexity exceeds its parent's by more than
``augment.max_perplexity_ratio`` is not a record. Like a failed back-translation it is a rejected
*candidate*, not a rejected input record, so the stage counters are untouched: it is counted in
``stats.rejected_by_reason`` (with ``stats.candidates`` / ``stats.accepted``) and written with
reason and score to ``quarantine/augment_rejected.parquet``. ``report/augment_samples.html`` (and a
Prefect markdown artifact) shows parent -> rewrite pairs side by side.

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
input record is dropped; only rejected candidates, see the quality gate, are quarantined).

Back-translations are requested in windows: when the next job is a back-translation not yet made,
every back-translation among the next ``cap - made`` jobs (at least one batch) is translated in
one batched call, so the model runs on batches while the result stays the sequential one.
The parents of the augmented task types are held in memory (the other records stream through).

Preference records (role "pairs") are not augmented: they pass through unchanged (``_pass_pairs``),
counted in the counters and in ``stats.pairs_passed``.
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

from corpus2model.schemas.config import NOISE_METHODS, TARGETED_TASK_TYPES
from corpus2model.schemas.records import records_table
from corpus2model.tasks.dedup import PartWriter, iter_record_batches
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, link_or_copy
from corpus2model.tasks.text.thesaurus import synonym_replace

STAGE = "augment"
# 2: synonym and backtranslate methods, per-task-type ratios, the report of rejected back-translations.
# 3: meaning-keeping synonyms (consistent, target/name/number/stopword safe, mutual senses), noise
#    methods only where opted in, the perplexity gate and its quarantine, the samples report.
VERSION = "3"
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


def synonym(text: str, p: float, rng: random.Random, protect: str = "", vocab=None) -> str:
    """WordNet synonym replacement (tasks/text/thesaurus.py) with per-lemma probability ``p``;
    words of ``protect`` (the target) are never touched, synonyms must be in ``vocab`` when given."""
    return synonym_replace(text, p, rng, protect=protect, vocab=vocab)


METHODS: dict[str, Callable[[str, float, random.Random], str]] = {
    "word_swap": word_swap,
    "word_dropout": word_dropout,
    "synonym": synonym,
}
BACKTRANSLATE = "backtranslate"  # batched through a Translator, not a per-text function

GATE_REASON = "aug_perplexity_ratio"

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
        self.rejected: list[dict] = []  # every rejected candidate, back-translations included (quarantine)
        self.samples: dict[str, list[dict]] = {}  # method -> accepted parent/rewrite pairs for the report
        self._lm: dict | None = None
        self._parent_ppl: dict[str, float | None] = {}

    def lm(self) -> dict:
        """The LM-score model (tasks/text/lmscore.py), loaded once: the gate and the synonym vocabulary."""
        if self._lm is None:
            from corpus2model.tasks.text.lmscore import load_model

            self._lm = load_model()
        return self._lm

    def methods_for(self, task_type: str) -> list[str]:
        """The configured methods usable on ``task_type``: noise methods only for task types
        without a target or opted in (the config already refuses the rest; this keeps a directly
        built config honest too)."""
        cfg = self.cfg
        return [m for m in dict.fromkeys(cfg.methods)
                if m not in NOISE_METHODS or task_type not in TARGETED_TASK_TYPES or task_type in cfg.noise_task_types]

    def perplexity_ratio(self, parent_id: str, text: str, new: str) -> tuple[float, str]:
        """(perplexity of ``new`` / perplexity of its parent ``text``, "ppl parent -> rewrite")."""
        from corpus2model.tasks.text.lmscore import perplexity

        if parent_id not in self._parent_ppl:
            self._parent_ppl[parent_id] = perplexity(self.lm(), text)
        before, after = self._parent_ppl[parent_id], perplexity(self.lm(), new)
        if not before or not after:  # no tokens: nothing to judge
            return 1.0, "no tokens"
        return after / before, f"ppl {before:.1f} -> {after:.1f}"

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
        self.rejected, self.samples = [], {}
        stats = {"no_change": 0, "repeated": 0, "methods": {m: 0 for m in dict.fromkeys(methods)}, "task_types": {},
                 "candidates": 0, "accepted": 0, "rejected_by_reason": {}}
        if BACKTRANSLATE in methods:
            stats["bt_rejected"] = {}
            stats["pivots"] = {p: 0 for p in cfg.backtranslate.pivots}
        for tt in self.task_types:
            n_orig = self.originals.get(tt, 0)
            # The epsilon keeps 0.7 * 10 = 6.9999... from losing a record to float rounding.
            cap = math.floor(self.ratio(tt) * n_orig + 1e-9)
            parents = sorted(self.eligible[tt], key=lambda r: _parent_order(cfg.seed, r))
            tt_methods = self.methods_for(tt)
            made = self._augment_type(tt, parents, cap, tt_methods, translator, added, stats) if parents and tt_methods and cap else 0
            stats["task_types"][tt] = {
                "originals": n_orig,
                "eligible": len(parents),
                "cap": cap,
                "augmented": made,
                "ratio": round(made / n_orig, 4) if n_orig else 0.0,
            }
        for tt, n in sorted(self.originals.items()):
            stats["task_types"].setdefault(tt, {"originals": n, "eligible": 0, "cap": 0, "augmented": 0, "ratio": 0.0})
        stats["accepted"] = len(added)
        stats["candidates"] = len(added) + sum(stats["rejected_by_reason"].values())
        return added, stats

    def _reject(self, stats: dict, row: dict) -> None:
        stats["rejected_by_reason"][row["reason"]] = stats["rejected_by_reason"].get(row["reason"], 0) + 1
        self.rejected.append(row)

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
                    row = {"parent_id": pid, "task_type": tt, "method": method, "pivot": pivot,
                           "reason": reason, "score": score, "detail": detail, "original": text,
                           "pivot_text": pivot_text, "candidate": new}
                    self.report.append(row)
                    self._reject(stats, row)
                    continue
            elif method == "synonym":
                new = synonym(text, cfg.probability, _rng(cfg.seed, pid, method, round_),
                              protect=parent.get("target") or "", vocab=self.lm()["vocab"])
            else:
                new = METHODS[method](text, cfg.probability, _rng(cfg.seed, pid, method, round_))
            seen = outputs.setdefault(pos, set())
            if new == text:
                stats["no_change"] += 1
                continue
            if new in seen:
                stats["repeated"] += 1
                continue
            seen.add(new)  # a rejected rewrite is not tried again either
            ratio = None
            if method != BACKTRANSLATE and cfg.max_perplexity_ratio is not None:
                ratio, ppl_detail = self.perplexity_ratio(pid, text, new)
                if ratio > cfg.max_perplexity_ratio:
                    self._reject(stats, {"parent_id": pid, "task_type": tt, "method": method, "pivot": None,
                                         "reason": GATE_REASON, "score": round(ratio, 4),
                                         "detail": f"{ppl_detail} > x{cfg.max_perplexity_ratio}", "original": text,
                                         "pivot_text": None, "candidate": new})
                    continue
            k = per_parent[pid] = per_parent.get(pid, 0) + 1
            md = {**(parent.get("metadata") or {}), "parent_id": pid, "aug_method": method}
            added.append({"id": f"{pid}#aug{k}", "input": new, "target": parent.get("target"), "metadata": md})
            shown = self.samples.setdefault(method, [])
            if len(shown) < cfg.report_samples:
                shown.append({"id": f"{pid}#aug{k}", "task_type": tt, "method": method, "parent": text, "rewrite": new,
                              "ratio": None if ratio is None else round(ratio, 3)})
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
    if "synonym" in aug.methods or (aug.max_perplexity_ratio is not None and set(aug.methods) - {BACKTRANSLATE}):
        # The LM reference text decides the gate and the synonym vocabulary: a new reference is new output.
        from corpus2model.tasks.stage import sha256_file
        from corpus2model.tasks.text.lmscore import REFERENCE

        refs = sorted(REFERENCE.glob("*.txt")) if REFERENCE.is_dir() else [REFERENCE]
        extra["lm_reference"] = {f.name: sha256_file(f) for f in refs}
    if BACKTRANSLATE not in aug.methods:
        return extra
    from corpus2model.tasks.text.backtranslate import model_identity

    src = aug.backtranslate.source_lang
    directions = [f"{a}-{b}" for p in aug.backtranslate.pivots for a, b in ((src, p), (p, src))]
    missing = [d for d in directions if d not in aug.backtranslate.models]
    if missing:
        raise ValueError(f"augment.backtranslate.models has no model for {missing}; add them or drop 'backtranslate' from augment.methods")
    return {**extra, "bt_models": {d: model_identity(aug.backtranslate.models[d]) for d in directions}}


def _pick_samples(cands: Candidates, n: int) -> list[dict]:
    """Up to ``n`` accepted pairs, taking turns over the methods so each one is seen."""
    lists = [list(v) for _, v in sorted(cands.samples.items())]
    out: list[dict] = []
    while len(out) < n and any(lists):
        for lst in lists:
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def _diff_html(before: str, after: str, cls: str) -> str:
    """``after`` with the words that differ from ``before`` marked (a word-level diff)."""
    import difflib
    import html

    a, b = before.split(), after.split()
    out = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        chunk = html.escape(" ".join(b[j1:j2]))
        if chunk:
            out.append(chunk if op == "equal" else f'<mark class="{cls}">{chunk}</mark>')
    return " ".join(out)


def samples_html(samples: list[dict], rejected: list[dict], stats: dict) -> str:
    """The augment report: parent -> rewrite side by side (changed words marked), then a few
    rejected candidates with reason and score, so a data engineer can read what was added."""
    import html

    esc = html.escape

    def rows(items, kind):
        body = []
        for it in items:
            cand = it.get("rewrite") if kind == "ok" else it.get("candidate")
            parent = it.get("parent") if kind == "ok" else it.get("original")
            label = (f"{esc(it['method'])}<br><small>{esc(it['id'])}</small><br><small>ppl x{it['ratio']}</small>" if kind == "ok"
                     else f"{esc(it['method'])}<br><small>{esc(it['parent_id'])}</small><br><small>{esc(it['reason'])} "
                          f"({it['score']})</small>")
            body.append(f"<tr><td>{label}</td><td>{_diff_html(cand or '', parent or '', 'old')}</td>"
                        f"<td>{_diff_html(parent or '', cand or '', kind)}</td></tr>")
        return "\n".join(body)

    head = "<tr><th>method</th><th>parent</th><th>rewrite</th></tr>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>augment samples</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;width:100%}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
        "mark.old{background:#fdd}mark.ok{background:#dfd}mark.bad{background:#fcc}</style></head><body>"
        f"<h2>augment: {stats['accepted']} accepted of {stats['candidates']} candidates</h2>"
        f"<p>methods {esc(str(stats['methods']))}; rejected by reason {esc(str(stats['rejected_by_reason']))}</p>"
        f"<h3>Accepted rewrites ({len(samples)} shown)</h3><table>{head}\n{rows(samples, 'ok')}</table>"
        f"<h3>Rejected candidates ({min(len(rejected), 10)} of {len(rejected)} shown)</h3><table>{head}\n"
        f"{rows(rejected[:10], 'bad')}</table></body></html>\n")


def samples_markdown(samples: list[dict], stats: dict) -> str:
    def cell(t: str) -> str:
        t = t.replace("|", "\\|").replace("\n", " ")
        return t if len(t) <= 240 else t[:237] + "..."

    lines = [f"**augment**: {stats['accepted']} accepted of {stats['candidates']} candidates; rejected "
             f"{stats['rejected_by_reason'] or 'none'}", "", "| method | parent | rewrite | ppl ratio |", "|---|---|---|---|"]
    lines += [f"| {s['method']} | {cell(s['parent'])} | {cell(s['rewrite'])} | {s['ratio']} |" for s in samples]
    return "\n".join(lines) + "\n"


def translation_cache_dir(ctx: StageContext) -> Path:
    return ctx.store.root / "_cache" / "translations"


def _pass_pairs(upstream: Manifest, out_dir: Path, files: list[FileEntry]) -> int:
    """Preference records (role "pairs") pass through unchanged, hard-linked: a rewrite of the prompt or
    of one answer could flip which answer is better, and DPO learns from exactly that difference."""
    n = 0
    for i, e in enumerate(upstream.entries("pairs")):
        src = upstream.dir / e.path
        rel = f"pairs/{i:05d}-{Path(e.path).name}"
        link_or_copy(src, out_dir / rel)
        k = e.records if e.records is not None else pq.ParquetFile(src).metadata.num_rows
        files.append(FileEntry(rel, role="pairs", records=k))
        n += k
    return n


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
    # Rejected candidates were never input records (the counters do not hold them): quarantined
    # here with reason and score so a person can see what the gate and the filters threw away.
    rel = "quarantine/augment_rejected.parquet"
    (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(cands.rejected, schema=REPORT_SCHEMA), out_dir / rel)
    files.append(FileEntry(rel, role="quarantine", records=len(cands.rejected)))
    samples = _pick_samples(cands, aug.report_samples)
    rel = "report/augment_samples.html"
    (out_dir / "report").mkdir(parents=True, exist_ok=True)
    (out_dir / rel).write_text(samples_html(samples, cands.rejected, stats), encoding="utf-8")
    files.append(FileEntry(rel, role="html"))
    from corpus2model.tasks.common.artifacts import publish_markdown

    publish_markdown("augment-samples", samples_markdown(samples, stats), "augment: parent -> rewrite samples")
    n_pairs = _pass_pairs(upstream, out_dir, files)
    counters = {"in": n_in + n_pairs, "added": len(added), "out": n_in + n_pairs + len(added), "rejected": {}, "duplicates": 0}
    stats["parts"] = len([f for f in files if f.role == "data"])
    stats["pairs_passed"] = n_pairs
    ctx.info("augment: %d originals, %d augmented (%d candidates, rejected %s)", n_in, len(added), stats["candidates"],
             stats["rejected_by_reason"])
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
