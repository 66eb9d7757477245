"""PII masking (tasks/text/pii.py): each kind masked, look-alikes left alone, counts per kind, and the
clean stage applying it to input and target of every task type."""
from __future__ import annotations

import pytest

from corpus2model.schemas.config import CleanConfig
from corpus2model.schemas.records import make_record
from corpus2model.tasks.clean import clean_document
from corpus2model.tasks.text.pii import luhn_ok, mask_pii

ALL = ("email", "phone", "ip", "card")


def test_luhn():
    assert luhn_ok("4111111111111111")  # Visa test number
    assert luhn_ok("5500000000000004")  # Mastercard test number
    assert luhn_ok("378282246310005")  # Amex test number (15 digits)
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("1234567812345678")


@pytest.mark.parametrize("text,expected,counts", [
    ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today.", {"email": 1}),
    ("Call +1-202-555-0143 or (202) 555-0143.", "Call <PHONE> or <PHONE>.", {"phone": 2}),
    ("Ruf an: +49 30 1234567.", "Ruf an: <PHONE>.", {"phone": 1}),
    ("Pay with 4111 1111 1111 1111 now", "Pay with <CARD> now", {"card": 1}),
    ("card 5500-0000-0000-0004.", "card <CARD>.", {"card": 1}),
    ("host 192.168.1.10 and 2001:db8::8a2e:370:7334 up", "host <IP> and <IP> up", {"ip": 2}),
])
def test_each_kind_is_masked(text, expected, counts):
    assert mask_pii(text, ALL) == (expected, counts)


@pytest.mark.parametrize("text", [
    "Order 4111 1111 1111 1112 failed Luhn.",  # 16 digits, invalid checksum: not a card
    "In 1999 the price rose from 12.50 to 13.75 dollars.",
    "See section 3.2.1 and version 1.2.3.4.5 of the manual.",
    "ISBN 978-3-16-148410-0, printed 2021-03-04.",
    "The meeting starts at 12:30:00 sharp.",
    "Use std::vector and a::b in C++.",
    "An address like 256.1.1.1 is not valid.",
    "Population: 1,234,567 people in 2020.",
    "Mail me at home, not @ work.",
])
def test_look_alikes_are_left_alone(text):
    assert mask_pii(text, ALL) == (text, {})


def test_kinds_are_configurable():
    text = "Mail a@example.com from 10.0.0.1"
    assert mask_pii(text, ("email",)) == ("Mail <EMAIL> from 10.0.0.1", {"email": 1})
    assert mask_pii(text, ()) == (text, {})


def test_clean_masks_input_and_target_of_every_task_type():
    rec = make_record("My e-mail is bob@example.org, call 202-555-0143.", "Card 4111111111111111 noted.",
                      task_type="instruction")
    stats: dict = {}
    out, reason, _, _ = clean_document(rec, CleanConfig(), stats)
    assert reason is None
    assert out["input"] == "My e-mail is <EMAIL>, call <PHONE>."
    assert out["target"] == "Card <CARD> noted."
    assert out["id"] == rec["id"]  # lineage: the id stays the raw record's
    assert {k: v for k, v in stats.items() if k.startswith("pii_")} == {"pii_email": 1, "pii_phone": 1, "pii_card": 1}
    off, _, _, _ = clean_document(rec, CleanConfig(pii_mask=[]))
    assert "bob@example.org" in off["input"]
