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


@pytest.mark.parametrize("text", [
    "Upgrade to version 1.2.3.4 today.",
    "Built from v1.2.3.4 and Release v 10.0.0.1.",
    "The OID 1.3.6.1 names the internet subtree.",
    "See 1.2.3.4 for details.",  # a section number: no address context at all
    "Section 1.2.3.4 of the server manual covers it.",  # a numbering word wins over "server"
    "As § 10.1.2.3 says.",
])
def test_dotted_numbers_without_address_context_are_not_ips(text):
    assert mask_pii(text, ALL) == (text, {})


@pytest.mark.parametrize("text,expected", [
    ("connect to 192.168.1.20 now", "connect to <IP> now"),
    ("IP 10.0.0.1", "IP <IP>"),
    ("host 8.8.8.8:53", "host <IP>:53"),
    ("dig @8.8.4.4 example.org", "dig @<IP> example.org"),
    ("open http://203.0.113.9/admin", "open http://<IP>/admin"),
    ("Failed password for root from 203.0.113.5 port 22", "Failed password for root from <IP> port 22"),
    ("route 10.0.0.0/8 via the gateway", "route <IP>/8 via the gateway"),
    ("My IP address is 203.0.113.5.", "My IP address is <IP>."),  # a sentence's period may follow
])
def test_addresses_in_context_are_masked(text, expected):
    assert mask_pii(text, ALL) == (expected, {"ip": 1})
