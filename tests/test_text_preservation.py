"""Text preservation: hostile-but-valid text goes through clean byte-identical, the documented rules
(separators to line breaks, debris removal) give exactly the expected text, and the expectation
suites accept what clean keeps (a file of clean instructions with emoji passes `c2m validate`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from corpus2model.flows.cli import main
from corpus2model.schemas.config import CleanConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks.clean import DEBRIS_PATTERN, clean_document, strip_debris

CFG = CleanConfig()
SUITES = Path(__file__).resolve().parents[1] / "schemas" / "suites"

# Each text is already NFC, single-spaced and stripped: no documented rule applies, so clean must
# return it unchanged, byte for byte.
KEPT = {
    "emoji_family": "Family: \U0001F468\u200d\U0001F469\u200d\U0001F467 and \U0001F469\u200d\U0001F469\u200d\U0001F466\u200d\U0001F466 at home.",
    "emoji_flags": "Flags: \U0001F3F3\ufe0f\u200d\U0001F308 \U0001F3F3\ufe0f\u200d\u26a7\ufe0f \U0001F1E9\U0001F1EA \U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
    "emoji_skin_tone": "Coders: \U0001F9D1\U0001F3FD\u200d\U0001F4BB \U0001F44D\U0001F3FF \U0001F469\U0001F3FB\u200d\u2695\ufe0f \u2764\ufe0f\u200d\U0001F525",
    "persian_zwnj": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u06a9\u062a\u0627\u0628\u200c\u0647\u0627 \u0631\u0627 \u0628\u062e\u0648\u0627\u0646\u0645.",
    "malayalam_chillu": "\u0d05\u0d35\u0d28\u0d4d\u200d \u0d2a\u0d4b\u0d2f\u0d3f; \u0d15\u0d7a \u0d0e\u0d28\u0d4d\u0d28\u0d4d\u200d.",
    "hindi_zwj": "\u0915\u094d\u200d\u0937 \u0914\u0930 \u0915\u094d\u200c\u0937 \u0905\u0932\u0917 \u0926\u093f\u0916\u0924\u0947 \u0939\u0948\u0902\u0964",
    "sinhala_zwj": "\u0dc1\u0dca\u200d\u0dbb\u0dd3 \u0dbd\u0d82\u0d9a\u0dcf\u0dc0",
    "cjk": "\u6f22\u5b57\u3068\u304b\u306a\u3001\u4e2d\u6587\u6807\u70b9\uff1f\ud55c\uad6d\uc5b4 \uff21\uff22\uff23",
    "rtl_marks": "\u05e9\u05dc\u05d5\u05dd \u200fworld\u200e \u202b\u05e2\u05d1\u05e8\u05d9\u05ea\u202c \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "combining_nfc": "Caf\u00e9 na\u00efve \u1ebf \u01d7 q\u0307 \u0e01\u0e33",
    "math": "\u2200x \u2208 \u211d: x\u00b2 \u2265 0, \u2211\u1d62 a\u1d62 \u2264 \u221e, \u222b f dx \u2248 \u03c0/4 \u2260 \u2205",
    "url": "See https://example.org/a_b?q=1&r=%20#frag and mailto:x (not an address).",
    "version_numbers": "Upgrade to version 1.2.3.4; OID 1.3.6.1 is in section 1.2.3.4.",
    "quotes_ligatures": "\u201cCurly\u201d \u2018quotes\u2019 \ufb01ne \u2014 dash \u2026 ellipsis",
}
CODE = "def f(x):\n\tif x:\n\t\treturn [i  for i in x]\n    # four-space indent\n    return None"


@pytest.mark.parametrize("name", sorted(KEPT))
def test_valid_text_passes_clean_byte_identical(name):
    text = KEPT[name]
    stats: dict = {}
    out, reason, _, _ = clean_document(make_record(text, text, task_type="instruction"), CFG, stats)
    assert reason is None
    assert out["input"].encode("utf-8") == text.encode("utf-8")
    assert out["target"].encode("utf-8") == text.encode("utf-8")
    assert not any(k.startswith("repair_") for k in stats), stats  # nothing repaired, nothing counted


def test_code_indentation_is_kept_byte_identical_when_configured():
    cfg = CleanConfig(keep_indentation=True)
    out, reason, _, _ = clean_document(make_record("Fix this:", CODE, task_type="instruction"), cfg)
    assert reason is None
    # Leading tabs and spaces stay; the inner double space is a documented whitespace collapse.
    assert out["target"] == CODE.replace("i  for", "i for")


@pytest.mark.parametrize("raw,expected,rule", [
    ("page one.\x0cStart of page two.", "page one.\nStart of page two.", "line_breaks"),  # FF
    ("line one\x0bline two", "line one\nline two", "line_breaks"),  # VT: a manual line break
    ("next\x85line", "next\nline", "line_breaks"),  # NEL in clean text: a line break, never "…"
    ("one\u2028two", "one\ntwo", "line_breaks"),  # LINE SEPARATOR
    ("para one\u2029para two", "para one\n\npara two", "line_breaks"),  # PARAGRAPH SEPARATOR: blank line
    ("don\x92t stop\x85", "don\u2019t stop\u2026", "mojibake"),  # NEL amid cp1252 C1s is mis-decoded "…"
    ("\u00c3\x85ngstr\u00c3\u00b6m", "\u00c5ngstr\u00f6m", "mojibake"),  # \x85 as a UTF-8 continuation byte
    ("stray\u200djoiner in Latin", "strayjoiner in Latin", "debris"),
    ("\u200dlead and trail\u200c", "lead and trail", "debris"),
    ("emoji\u200d\U0001F600 then letter", "emoji\U0001F600 then letter", "debris"),  # emoji on one side only
    ("zero\u200bwidth\u2060space\ufeff", "zerowidthspace", "debris"),
])
def test_documented_rules_give_exact_text(raw, expected, rule):
    stats: dict = {}
    out, reason, _, _ = clean_document(make_record("Question about text?", raw, task_type="instruction"), CFG, stats)
    assert reason is None
    assert out["target"] == expected
    assert stats.get(f"repair_{rule}") == 1, stats


@pytest.mark.parametrize("text,kept", [
    ("\U0001F468\u200d\U0001F469", True),  # between two emoji
    ("\U0001F3F3\ufe0f\u200d\U0001F308", True),  # VS16 ends the left emoji
    ("\U0001F44D\U0001F3FD\u200d\u2642", True),  # skin-tone modifier, then a BMP pictograph
    ("\u0d28\u0d4d\u200d ", True),  # Malayalam chillu: script on the left only
    (" \u200d\u0937", True),  # script on the right only
    ("\u06cc\u200c\u062e", True),  # Persian ZWNJ
    ("\u0915\u094d\u200c\u0937", True),  # Devanagari ZWNJ
    ("a\u200db", False),  # Latin
    ("a\u200cb", False),
    ("\U0001F468\u200da", False),  # emoji on one side, Latin on the other
    ("a\u200d\U0001F469", False),
    ("\u200d", False),  # alone
    ("\U0001F468\u200c\U0001F469", False),  # ZWNJ is never part of an emoji sequence
    ("\u4e2d\u200d\u6587", False),  # CJK does not use joiners
])
def test_joiner_rule(text, kept):
    out, n = strip_debris(text)
    assert (out == text) is kept and n == (0 if kept else 1)


def test_strip_debris_is_pure_and_counts():
    text = "a\u200db \U0001F468\u200d\U0001F469 \u0645\u06cc\u200c\u062e \x00"
    assert strip_debris(text) == ("ab \U0001F468\u200d\U0001F469 \u0645\u06cc\u200c\u062e ", 2)
    assert strip_debris(text) == strip_debris(text)


def _debris_regexes() -> list[tuple[str, str]]:
    found = []
    for path in sorted(SUITES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        entries = data["expectations"] if isinstance(data, dict) else data
        for e in entries:
            rx = (e.get("kwargs") or {}).get("regex", "")
            if e["expectation"] == "expect_column_values_to_not_match_regex" and "\\x00" in rx:
                found.append((path.name, rx))
    return found


def test_every_suite_debris_check_is_cleans_rule():
    found = _debris_regexes()
    assert {name for name, _ in found} >= {"training_records.yaml", "cleaned_records.yaml", "raw_documents.yaml"}
    for name, rx in found:
        assert rx == DEBRIS_PATTERN, name
    debris = re.compile(found[0][1])
    for text in KEPT.values():
        assert debris.search(text) is None, text
    assert debris.search("a\u200db") and debris.search("x\x07")


def test_instructions_with_emoji_pass_c2m_validate(tmp_path):
    rows = [{"id": f"emoji-{i}", "input": f"Reply to message {i} with an emoji: {text}",
             "target": f"Sure {KEPT['emoji_family']} {text}", "metadata": {"task_type": "instruction"}}
            for i, text in enumerate(KEPT.values())]
    path = tmp_path / "emoji.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code = main(["validate", str(path), "--suite", "training_records", "--out", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert code == 0, json.dumps(report, ensure_ascii=False)[:2000]
