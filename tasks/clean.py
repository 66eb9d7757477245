"""clean: repair and normalise record text, drop records that cannot be training data.

Every record passes through ``clean_text`` (separators to line breaks, mojibake repair with ftfy,
debris removal that keeps emoji ZWJ sequences and ZWJ/ZWNJ in joining scripts, Unicode
normalisation, whitespace normalised; each rule's repairs counted in ``stats.repairs``) and then
``clean_record``'s keep/drop decision; each drop is quarantined with its reason
(datatrove's filter shape: keep, or drop with a reason, and count it).

Work is cached per input part (ingest writes one part per raw file): the unit key is
(clean config, part sha256), so adding or editing one raw file cleans only that file's part and
links the others from ``<store>/_units/clean/``.

Order per record: Project Gutenberg header/footer strip (a transform, counted as
``gutenberg_stripped``), length rules (``too_long`` on the stripped raw fields, then ``clean_text``,
then ``empty_target`` / ``too_short``), then, for records whose ``metadata.task_type`` is in
``clean.quality_task_types``, language ID (``language:<code>`` when ``clean.allowed_languages`` is
set; ``metadata.lang`` is filled on kept records), the Gopher / C4 document filters of
``tasks.text.filters`` (reasons ``gopher_*``, ``c4_*``) and, when ``clean.lm_max_perplexity`` is set,
the LM-score filter of ``tasks.text.lmscore`` (``lm_perplexity``), each drop with its measured score.
PII (``clean.pii_mask``: e-mail, phone, IP, Luhn-valid card numbers) is masked in every record's
input and target after ``clean_text`` and before the filters (``tasks.text.pii``), counted per kind.

Per-filter statistics: ``filter_stats.json`` (documents dropped per filter and reason, PII
masked per kind, score quantiles) and ``filter_scores.png`` (a histogram of each filter's scores:
the measured value of every dropped document, and the perplexity of every scored document) are
report files of the stage, and published as Prefect artifacts.

Preference records (ingest's role "pairs" parts, PAIR_SCHEMA) are cleaned by ``clean_pair``, one unit
per part as records are: the same ``too_long`` / ``clean_text`` / PII rules on each of prompt, chosen and
rejected, then ``empty_prompt`` / ``empty_chosen`` / ``empty_rejected`` (a pair the preference_pairs
suite would stop the flow for), ``too_short`` on prompt+chosen, ``chosen_equals_rejected`` (cleaning can
make two answers equal; such a pair teaches nothing) and, when the pair's task_type is listed in
``clean.quality_task_types``, the quality filters on each field. Gutenberg stripping is for documents
and is not applied to pairs. Kept pairs go to ``pairs/<part>-pairs.parquet``, drops to quarantine.
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq

from corpus2model.tasks.common.parquet import open_parquet
from corpus2model.tasks.text.filters import filter_document, strip_gutenberg
from corpus2model.tasks.text.pii import mask_pii
from corpus2model.schemas.records import (PAIR_SCHEMA, PAIR_TEXT_FIELDS, QUARANTINE_SCHEMA, RECORD_SCHEMA, pairs_table,
                                           quarantine_row, quarantine_table, records_table)
from corpus2model.tasks.stage import (
    FileEntry,
    Manifest,
    StageContext,
    StageError,
    Store,
    Unit,
    cache_key,
    gather_units,
    sha256_file,
)

STAGE = "clean"
# 4: joiners kept in emoji and joining scripts, FF/VT/NEL/LS/PS become line breaks (NEL is "…" only in
#    mojibake text), repairs counted per rule, PII IPv4 needs an address context.
VERSION = "4"
SECTIONS = ("clean",)

BATCH_ROWS = 2048
# Scores kept per filter per part for the histograms (the first ones: bounded memory, and a part
# is a few MB, so this is every score in practice).
MAX_SCORES = 20_000
PII_KINDS = ("email", "phone", "ip", "card")
# The documented text repairs (clean_text); each counts the fields it changed.
REPAIRS = ("line_breaks", "mojibake", "debris", "normalization", "whitespace")

# Scripts whose spelling uses ZWJ/ZWNJ (Arabic incl. Persian/Urdu, Syriac, the Indic scripts from
# Devanagari to Sinhala, Vedic and Devanagari extensions, Arabic presentation forms). Written with
# escapes only: the expectation suites carry DEBRIS_PATTERN verbatim as plain ASCII YAML.
JOINER_SCRIPTS = r"\u0600-\u074f\u0750-\u077f\u0870-\u08ff\u0900-\u0dff\u1cd0-\u1cff\ua8e0-\ua8ff\ufb50-\ufdff\ufe70-\ufefc"
# Extended_Pictographic (emoji-data.txt, folded into ranges) with the skin-tone modifiers, which lie
# inside U+1F000-U+1FAFF.
EMOJI = (r"\xa9\xae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf\u23e9-\u23f3"
         r"\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf\u2934\u2935\u2b05-\u2b07"
         r"\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299\U0001f000-\U0001faff")
# Debris: C0/C1 controls except \t and \n, ZWSP, WORD JOINER, deprecated format characters, BOM,
# interlinear annotation marks and U+FFFC; a ZWNJ not next to a joining-script character; a ZWJ that
# is neither next to a joining-script character nor between two emoji (the left one may end in VS16,
# U+FE0F). One pattern for clean and for every expectation suite's debris check (a test keeps them equal).
# Each joiner alternative starts with its literal and looks back over it (a fixed width of 2): a
# lookbehind first would be tried at every position, 20x slower on plain text.
DEBRIS_PATTERN = (
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\u206a-\u206f\ufeff\ufff9-\ufffc]"
    rf"|\u200c(?<![{JOINER_SCRIPTS}]\u200c)(?![{JOINER_SCRIPTS}])"
    rf"|\u200d(?<![{JOINER_SCRIPTS}]\u200d)(?:(?<![{EMOJI}\ufe0f]\u200d)|(?![{EMOJI}]))(?![{JOINER_SCRIPTS}])"
)
DEBRIS = re.compile(DEBRIS_PATTERN)
# Any character DEBRIS could remove: most texts hold none, and this single class is a fast scan.
_DEBRIS_CANDIDATE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\u206a-\u206f\ufeff\ufff9-\ufffc]")
# Separators that are line breaks: CRLF, CR, VT (a manual line break in word-processor exports), FF
# (a page break), NEL, LINE SEPARATOR -> "\n"; PARAGRAPH SEPARATOR -> "\n\n" (a blank line, this
# corpus's paragraph break). NEL is left out when it is mojibake (see _nel_is_mojibake).
_LINE_BREAK = re.compile("\r\n|[\r\x0b\x0c\u2028\x85]")
_LINE_BREAK_NO_NEL = re.compile("\r\n|[\r\x0b\x0c\u2028]")
# U+0085 is the cp1252 "…" read as Latin-1 when the text holds other cp1252-as-Latin-1 C1 characters
# (curly quotes \x91-\x94, dashes \x96 \x97, € \x80 ...), or it is the second byte of a two-byte
# UTF-8 character read as Latin-1 ("Ã\x85" is "Å").
_NEL_MOJIBAKE = re.compile("[\x80-\x84\x86-\x9f]|[\xc2-\xdf]\x85")
_HSPACE = re.compile(r"[ \t]+")
_INDENT = re.compile(r"^[ \t]*")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def _fix_mojibake(text: str) -> str:
    import ftfy

    # Only ftfy's encoding repairs: normalisation is our own step (cfg.normalization, which may be
    # "none"), and curly quotes, ligatures, full-width letters and HTML entities are content, not
    # damage. Line breaks and control characters are our own documented rules too (ftfy would delete
    # a vertical tab and keep a form feed). ftfy's C1 fix stays on: a stray \x92 is almost always
    # cp1252's "'" decoded as latin-1.
    config = ftfy.TextFixerConfig(
        unescape_html=False,
        uncurl_quotes=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        fix_line_breaks=False,
        remove_control_chars=False,
        normalization=None,
        explain=False,
    )
    return ftfy.fix_text(text, config)


def line_breaks(text: str, nel: bool = True) -> str:
    """Turn every line/page separator into a line break; never delete one.

    CRLF, CR, VT, FF, NEL (U+0085, only when ``nel``) and LINE SEPARATOR (U+2028) become ``\\n``;
    PARAGRAPH SEPARATOR (U+2029) becomes ``\\n\\n``. ``"page one.\\fStart"`` -> ``"page one.\\nStart"``.
    """
    text = (_LINE_BREAK if nel else _LINE_BREAK_NO_NEL).sub("\n", text)
    return text.replace("\u2029", "\n\n")


def _nel_is_mojibake(text: str) -> bool:
    """True when a U+0085 in ``text`` is encoding damage rather than NEXT LINE: the text also holds
    another C1 character (cp1252 text read as Latin-1, where \\x85 is "…"), or the \\x85 follows a
    two-byte UTF-8 lead read as Latin-1 (Â-ß: "Ã\\x85" is "Å"). A lone \\x85 in otherwise clean
    text is a line break: a newline loses nothing, a "…" would add a character nobody wrote."""
    return "\x85" in text and _NEL_MOJIBAKE.search(text) is not None


def strip_debris(text: str) -> tuple[str, int]:
    """Remove debris characters (DEBRIS_PATTERN); returns (text, characters removed).

    A pure function of the text, each character judged by its neighbours in the input:
    a ZWJ (U+200D) is kept between two emoji ("👨\\u200d👩\\u200d👧", "🏳\\ufe0f\\u200d🌈",
    "🧑🏽\\u200d💻") and next to (before or after) a letter or mark of a joining script (Malayalam
    chillu "ന്\\u200d", Hindi "क्\\u200dष"); a ZWNJ (U+200C) is kept next to a joining-script character
    (Persian "می\\u200cخواهم"). Stray ones (between Latin letters, at an edge, between an emoji and a
    letter) are removed, as are C0/C1 controls other than ``\\t``/``\\n``, ZWSP, WORD JOINER, BOM,
    U+206A-U+206F, U+FFF9-U+FFFC.
    """
    if _DEBRIS_CANDIDATE.search(text) is None:
        return text, 0
    n = 0

    def drop(_m: re.Match) -> str:
        nonlocal n
        n += 1
        return ""

    return DEBRIS.sub(drop, text), n


def clean_text(text: str, cfg, repairs: dict | None = None) -> str:
    """Repair and normalise one text field; ``cfg`` is the clean section (CleanConfig).

    Steps, in order, each a documented rule counted in ``repairs`` (fields it changed, by rule name
    of REPAIRS) when given:
    ``line_breaks`` (``line_breaks``: CRLF/CR/VT/FF/NEL/LS to ``\\n``, PS to a blank line; NEL stays
    for ftfy when ``_nel_is_mojibake`` and cfg.fix_mojibake; with repair off nothing reads it as
    cp1252, so it is always a line break), ``mojibake`` (ftfy encoding repair, cfg.fix_mojibake;
    "Ã©" -> "é", "\\x92" -> "'", "\\x85" -> "…" in mojibake text, ANSI terminal escapes removed),
    ``debris`` (``strip_debris``: controls and stray zero-width characters; emoji ZWJ sequences and
    joiners in joining scripts stay), ``normalization`` (cfg.normalization), ``whitespace`` (runs of spaces/tabs
    to one space, leading indentation kept when cfg.keep_indentation, trailing spaces stripped per
    line, at most one blank line in a row, ends stripped).
    """
    def count(rule: str, before: str, after: str) -> str:
        if repairs is not None and after != before:
            repairs[rule] = repairs.get(rule, 0) + 1
        return after

    nel_mojibake = cfg.fix_mojibake and _nel_is_mojibake(text)
    text = count("line_breaks", text, line_breaks(text, nel=not nel_mojibake))
    if cfg.fix_mojibake:
        text = count("mojibake", text, _fix_mojibake(text))
    # Before normalisation: a stray zero-width joiner between a letter and its combining mark would
    # otherwise block composition.
    text = count("debris", text, strip_debris(text)[0])
    if cfg.normalization != "none":
        text = count("normalization", text, unicodedata.normalize(cfg.normalization, text))
    before = text
    if cfg.keep_indentation:
        lines = []
        for line in text.split("\n"):
            indent = _INDENT.match(line).group(0)
            lines.append(indent + _HSPACE.sub(" ", line[len(indent):]))
        text = "\n".join(lines)
    else:
        text = _HSPACE.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return count("whitespace", before, text.strip())


def clean_document(record: dict, cfg, stats: dict | None = None) -> tuple[dict | None, str | None, str, float | None]:
    """Return (cleaned record, None, "", None) or (None, reason, detail, score).

    ``stats`` (optional) collects transform counts (``gutenberg_stripped``, ``pii_<kind>``, and
    ``repair_<rule>``: fields each clean_text rule changed, for kept and dropped records alike),
    languages seen and filter scores (``scores``: {reason: [values]}).
    Length limits are checked before ``clean_text`` can shorten a field: a 40,000-char field is
    rejected as ``too_long``, never truncated into a different record. The Gutenberg strip comes
    first because it removes boilerplate, not content: a book is judged by its own length. The id
    is kept (ingest assigned it from the raw text; lineage must not change here).
    """
    inp, tgt = record.get("input") or "", record.get("target") or ""
    if cfg.strip_gutenberg:
        inp, s1 = strip_gutenberg(inp)
        tgt, s2 = strip_gutenberg(tgt)
        if (s1 or s2) and stats is not None:
            stats["gutenberg_stripped"] = stats.get("gutenberg_stripped", 0) + 1
    for name, value in (("input", inp), ("target", tgt)):
        if len(value) > cfg.max_chars:
            return None, "too_long", f"{name} has {len(value)} chars > clean.max_chars {cfg.max_chars}", float(len(value))
    repairs: dict[str, int] = {}
    inp, tgt = clean_text(inp, cfg, repairs), clean_text(tgt, cfg, repairs)
    if stats is not None:
        for rule, n in repairs.items():
            stats[f"repair_{rule}"] = stats.get(f"repair_{rule}", 0) + n
    if cfg.pii_mask:
        inp, c_in = mask_pii(inp, cfg.pii_mask)
        tgt, c_tgt = mask_pii(tgt, cfg.pii_mask)
        if stats is not None:
            for kind, n in (*c_in.items(), *c_tgt.items()):
                stats[f"pii_{kind}"] = stats.get(f"pii_{kind}", 0) + n
    if len(tgt) < cfg.min_target_chars:
        return None, "empty_target", f"target has {len(tgt)} chars after cleaning < clean.min_target_chars {cfg.min_target_chars}", float(len(tgt))
    if len(inp) + len(tgt) < cfg.min_chars:
        return None, "too_short", f"input+target have {len(inp) + len(tgt)} chars after cleaning < clean.min_chars {cfg.min_chars}", float(len(inp) + len(tgt))
    md = record.get("metadata") or {}
    if cfg.quality_filters and md.get("task_type") in cfg.quality_task_types:
        text = f"{inp}\n\n{tgt}" if inp else tgt
        (keep, reason, score), lang = filter_document(text, cfg)
        if keep and cfg.lm_max_perplexity is not None:
            from corpus2model.tasks.text.lmscore import lm_filter

            keep, reason, score = lm_filter(text, cfg, lang)
            if stats is not None and score is not None:
                _add_score(stats, "lm_perplexity", score)  # every scored document, kept or not
        elif not keep and stats is not None and score is not None:
            _add_score(stats, reason, score)
        if stats is not None and lang:
            langs = stats.setdefault("languages", {})
            langs[lang] = langs.get(lang, 0) + 1
        if not keep:
            return None, reason, f"{reason} = {score} (tasks/text/filters.py thresholds; lang {lang})", score
        if lang and not md.get("lang"):
            md = {**md, "lang": lang}
    return {**record, "input": inp, "target": tgt, "metadata": md}, None, "", None


def clean_pair(record: dict, cfg, stats: dict | None = None) -> tuple[dict | None, str | None, str, float | None]:
    """A preference record through clean's rules (``clean_document``'s shape: (cleaned pair, None, "", None)
    or (None, reason, detail, score)): ``too_long`` on each raw field, ``clean_text`` and PII masking on
    each, then the empty/short/identical checks and, for a task_type in clean.quality_task_types, the
    quality filters on each field (a pair is as good as its worst text). The id is kept."""
    texts = {k: record.get(k) or "" for k in PAIR_TEXT_FIELDS}
    for name, value in texts.items():
        if len(value) > cfg.max_chars:
            return None, "too_long", f"{name} has {len(value)} chars > clean.max_chars {cfg.max_chars}", float(len(value))
    repairs: dict[str, int] = {}
    texts = {k: clean_text(v, cfg, repairs) for k, v in texts.items()}
    if stats is not None:
        for rule, n in repairs.items():
            stats[f"repair_{rule}"] = stats.get(f"repair_{rule}", 0) + n
    if cfg.pii_mask:
        for k in PAIR_TEXT_FIELDS:
            texts[k], counts = mask_pii(texts[k], cfg.pii_mask)
            if stats is not None:
                for kind, n in counts.items():
                    stats[f"pii_{kind}"] = stats.get(f"pii_{kind}", 0) + n
    for k in PAIR_TEXT_FIELDS:
        # A prompt needs a character; an answer clean.min_target_chars (at least one: the suite's minimum).
        minimum = 1 if k == "prompt" else max(1, cfg.min_target_chars)
        if len(texts[k]) < minimum:
            return None, f"empty_{k}", f"{k} has {len(texts[k])} chars after cleaning < {minimum}", float(len(texts[k]))
    n = len(texts["prompt"]) + len(texts["chosen"])
    if n < cfg.min_chars:
        return None, "too_short", f"prompt+chosen have {n} chars after cleaning < clean.min_chars {cfg.min_chars}", float(n)
    if texts["chosen"] == texts["rejected"]:
        return None, "chosen_equals_rejected", "chosen and rejected are the same text after cleaning: no preference", None
    md = record.get("metadata") or {}
    if cfg.quality_filters and md.get("task_type") in cfg.quality_task_types:
        for k in PAIR_TEXT_FIELDS:
            (keep, reason, score), lang = filter_document(texts[k], cfg)
            if keep and cfg.lm_max_perplexity is not None:
                from corpus2model.tasks.text.lmscore import lm_filter

                keep, reason, score = lm_filter(texts[k], cfg, lang)
            if not keep:
                if stats is not None and score is not None:
                    _add_score(stats, reason, score)
                return None, reason, f"{k}: {reason} = {score} (tasks/text/filters.py thresholds; lang {lang})", score
            if k == "prompt" and lang:
                if stats is not None:
                    langs = stats.setdefault("languages", {})
                    langs[lang] = langs.get(lang, 0) + 1
                if not md.get("lang"):
                    md = {**md, "lang": lang}
    return {**record, **texts, "metadata": md}, None, "", None


def _add_score(stats: dict, name: str, value: float) -> None:
    values = stats.setdefault("scores", {}).setdefault(name, [])
    if len(values) < MAX_SCORES:
        values.append(value)


def clean_record(record: dict, cfg) -> tuple[dict | None, str | None, str]:
    """``clean_document`` without the score: (cleaned record, None, "") or (None, reason, detail)."""
    return clean_document(record, cfg)[:3]


# ---------------------------------------------------------------------------------------------
# one unit = one input part
# ---------------------------------------------------------------------------------------------
def _check_schema(path: Path, pairs: bool = False) -> pq.ParquetFile:
    pf = open_parquet(path)
    schema = pf.schema_arrow
    expected, what, name = (PAIR_SCHEMA, "preference records", "PAIR_SCHEMA") if pairs else \
        (RECORD_SCHEMA, "training records", "RECORD_SCHEMA")
    if not schema.equals(expected, check_metadata=False):
        raise StageError(
            f"clean: {path} does not hold {what} (schema {schema}); "
            f"expected schemas.records.{name}: rerun the upstream stage that wrote it"
        )
    return pf


def clean_part(src: Path, dst: Path, quarantine: Path, cfg, pairs: bool = False) -> dict:
    """Clean one Parquet part into ``dst`` (always written) and ``quarantine`` (only with drops);
    ``pairs``: a part of preference records (``clean_pair``) instead of training records.

    Streams in batches so a large part never sits in memory whole. Returns the unit's counters
    and the raw files its records came from.
    """
    pf = _check_schema(src, pairs)
    schema, fields, clean_one, table_of = ((PAIR_SCHEMA, PAIR_TEXT_FIELDS, clean_pair, pairs_table) if pairs else
                                           (RECORD_SCHEMA, ("input", "target"), clean_document, records_table))
    counters = {"in": 0, "out": 0, "rejected": {}, "duplicates": 0}
    stats: dict = {}
    chars_in = chars_out = 0
    sources: set[str] = set()
    qwriter = None
    with pq.ParquetWriter(dst, schema) as writer:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            kept, rejects = [], []
            for rec in batch.to_pylist():
                counters["in"] += 1
                chars_in += sum(len(rec.get(f) or "") for f in fields)
                sp = (rec.get("metadata") or {}).get("source_path")
                if sp:
                    sources.add(sp)
                out, reason, detail, score = clean_one(rec, cfg, stats)
                if out is None:
                    rejects.append(quarantine_row(STAGE, reason, detail=detail, score=score, record=rec))
                    counters["rejected"][reason] = counters["rejected"].get(reason, 0) + 1
                else:
                    kept.append(out)
                    chars_out += sum(len(out[f]) for f in fields)
            if kept:
                writer.write_table(table_of(kept))
                counters["out"] += len(kept)
            if rejects:
                if qwriter is None:
                    qwriter = pq.ParquetWriter(quarantine, QUARANTINE_SCHEMA)
                qwriter.write_table(quarantine_table(rejects))
    if qwriter is not None:
        qwriter.close()
    return {"counters": counters, "chars_in": chars_in, "chars_out": chars_out, "source_paths": sorted(sources),
            "gutenberg_stripped": stats.get("gutenberg_stripped", 0), "languages": stats.get("languages", {}),
            "scores": stats.get("scores", {}), **{f"pii_{k}": stats.get(f"pii_{k}", 0) for k in PII_KINDS},
            **{f"repair_{r}": stats.get(f"repair_{r}", 0) for r in REPAIRS}}


def _clean_unit(args) -> dict:
    store_root, unit_key, src, rel, cfg, *kind = args
    pairs = kind == ["pairs"]
    store = Store(store_root)

    def write(tmp: Path) -> dict:
        name = "pairs.parquet" if pairs else "records.parquet"
        info = clean_part(Path(src), tmp / name, tmp / "quarantine.parquet", cfg, pairs)
        c = info["counters"]
        files = [FileEntry(name, role="pairs" if pairs else "data", records=c["out"])]
        if pairs:
            info["pairs"] = c["out"]
        n_rejected = sum(c["rejected"].values())
        if n_rejected:
            files.append(FileEntry("quarantine.parquet", role="quarantine", records=n_rejected))
        # A part without provenance (built by hand, not by ingest) is named by its own path.
        return {**info, "files": files, "source_paths": info["source_paths"] or [rel]}

    return store.unit_write(STAGE, unit_key, write)


def _sum_unit_infos(units: list[Unit], ctx: StageContext) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Documents per detected language and filter scores over all units (gather_units sums
    numbers only; every unit is in the store by now, so its stored info is read back)."""
    total: dict[str, int] = {}
    scores: dict[str, list[float]] = {}
    for u in units:  # equal parts count once per part, as the counters do
        info = ctx.store.unit_lookup(STAGE, u.key) or {}
        for lang, n in (info.get("languages") or {}).items():
            total[lang] = total.get(lang, 0) + n
        for name, values in (info.get("scores") or {}).items():
            scores.setdefault(name, []).extend(values)
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))), dict(sorted(scores.items()))


def _quantiles(values: list[float]) -> dict:
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"n": len(v), "min": v[0], "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": v[-1]}


def filter_report(rejected: dict[str, int], pii: dict[str, int], scores: dict[str, list[float]], docs_in: int) -> dict:
    """The per-filter statistics of one clean run (filter_stats.json)."""
    filters: dict[str, dict] = {}
    for reason, n in rejected.items():
        family = reason.split(":")[0] if reason.startswith("language:") else reason.split("_")[0]
        filters.setdefault(family, {"dropped": 0, "reasons": {}})
        filters[family]["dropped"] += n
        filters[family]["reasons"][reason] = n
    return {"documents_in": docs_in, "filters": dict(sorted(filters.items())), "pii_masked": pii,
            "scores": {name: _quantiles(v) for name, v in scores.items() if v}}


def plot_scores(scores: dict[str, list[float]], path: Path) -> None:
    """One histogram per filter reason (its scores), in a grid; a placeholder text when no filter
    produced a score (nothing dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in scores.items() if v]
    cols = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        values = scores[name]
        ax.set_visible(True)
        log = name == "lm_perplexity" and min(values) > 0
        data = [__import__("math").log10(v) for v in values] if log else values
        ax.hist(data, bins=min(40, max(5, len(set(data)))), color="#4c72b0")
        ax.set_title(f"{name} (n={len(values)})", fontsize=9)
        ax.set_xlabel("log10 perplexity" if log else "score", fontsize=8)
    if not names:
        axes.flat[0].set_visible(True)
        axes.flat[0].text(0.5, 0.5, "no filter scores (nothing dropped)", ha="center", va="center")
        axes.flat[0].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def _publish(report: dict, png: Path) -> None:
    from corpus2model.tasks.common.artifacts import publish_image, publish_table

    # One column set for every row (a table artifact is rendered from the first row's keys).
    rows = [{"filter": fam, "reason": reason, "dropped": n, "masked": 0, **{k: q.get(k) for k in ("p10", "p50", "p90")}}
            for fam, f in report["filters"].items() for reason, n in f["reasons"].items()
            for q in [report["scores"].get(reason, {})]]
    rows += [{"filter": "pii", "reason": k, "dropped": 0, "masked": n, "p10": None, "p50": None, "p90": None}
             for k, n in report["pii_masked"].items()]
    publish_table("clean-filters", rows, f"clean: documents dropped per filter and reason of {report['documents_in']}")
    publish_image("clean-filter-scores", str(png), "histogram of each filter's scores")


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    (upstream,) = inputs
    section = cfg.clean.hashed()
    units, stems = [], set()
    # Training-record parts ("data") and preference-record parts ("pairs") are units alike; a pairs
    # unit's key and stem say so (its quarantine file must not take a records unit's name).
    for entry in [*upstream.entries("data"), *upstream.entries("pairs")]:
        src = upstream.dir / entry.path
        if not src.is_file():
            raise StageError(f"clean: upstream {upstream.stage} output {upstream.path} lists {entry.path} but it is missing; rerun {upstream.stage}")
        pairs = entry.role == "pairs"
        key = cache_key(STAGE, VERSION, section, [entry.sha256 or sha256_file(src), *(["pairs"] if pairs else [])])
        stem = Path(entry.path).stem + ("-pairs" if pairs else "")
        if stem in stems:  # parts in different sub-folders with one name: keep both
            stem = f"{stem}-{len(units):06d}"
        stems.add(stem)
        args = (str(ctx.store.root), key, str(src), entry.path, cfg.clean, *(["pairs"] if pairs else []))
        units.append(Unit(key=key, stem=stem, label=entry.path, args=args, bytes=entry.bytes))
    pii_fields = tuple(f"pii_{k}" for k in PII_KINDS)
    repair_fields = tuple(f"repair_{r}" for r in REPAIRS)
    files, counters, stats = gather_units(STAGE, units, _clean_unit, ctx, out_dir, cfg.clean.workers,
                                          ("chars_in", "chars_out", "gutenberg_stripped", "pairs", *pii_fields, *repair_fields))
    stats["rejected"] = dict(sorted(counters["rejected"].items()))
    # Per-filter drop counts (reasons from tasks/text/filters.py) next to the length rules' counts.
    stats["filtered"] = {r: n for r, n in stats["rejected"].items() if r.startswith(("gopher_", "c4_", "language:", "lm_"))}
    stats["pii_masked"] = {k: stats.pop(f"pii_{k}") for k in PII_KINDS}
    # Text fields each documented clean_text rule changed (DESIGN: a kept record changes only by a
    # documented rule, and the repair is counted).
    stats["repairs"] = {r: stats.pop(f"repair_{r}") for r in REPAIRS}
    stats["languages"], scores = _sum_unit_infos(units, ctx)
    report = filter_report(stats["rejected"], stats["pii_masked"], scores, counters["in"])
    (out_dir / "filter_stats.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    plot_scores(scores, out_dir / "filter_scores.png")
    files += [FileEntry("filter_stats.json", role="report"), FileEntry("filter_scores.png", role="report")]
    _publish(report, (ctx.final_dir or out_dir) / "filter_scores.png")
    ctx.info("clean: %d records in, %d out, %d units computed", counters["in"], counters["out"], stats["units_computed"])
    return Manifest(stage=STAGE, files=files, counters=counters, stats=stats)
