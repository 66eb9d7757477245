"""PII masking for the clean stage: e-mail addresses, phone numbers, IP addresses and payment card
numbers are replaced by placeholders (<EMAIL>, <PHONE>, <IP>, <CARD>) in every text field.

A transform, not a filter: the record stays, its personal data does not reach training. Each
pattern is written to prefer a miss over masking ordinary text: years, dates, version numbers,
prices and section numbers are not phone numbers; a 16-digit run is a card only when it passes
the Luhn check (so order numbers and ISBNs stay); an IPv4 needs four octets of at most 255 and an
address context (``_ipv4``: "version 1.2.3.4", "OID 1.3.6.1" and "section 1.2.3.4" are dotted numbers,
"connect to 192.168.1.20", "IP 10.0.0.1" and "8.8.8.8:53" are addresses); an IPv6 needs hex groups
with colons and is validated by ``ipaddress``.

``mask_pii(text, kinds) -> (masked text, {kind: count})``. Kinds run in the order card, email,
ip, phone: a card number is a digit run a phone pattern would also see, and an e-mail's domain
may look like an IP.
"""
from __future__ import annotations

import ipaddress
import re

KINDS = ("card", "email", "ip", "phone")
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "card": "<CARD>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# 13-19 digits, optionally in groups separated by single spaces or hyphens (4-4-4-4, 4-6-5).
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
# A sentence-ending period may follow ("IP 10.0.0.1."); a fifth ".<digit>" part may not.
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
# What makes a dotted quad an address (``_ipv4``): a port or CIDR prefix right after it, a URL or
# user@ right before it, or a networking word in the words around it on its line; a numbering word
# right before it ("version", "v", "OID", "section", "§", ...) makes it a number whatever else is near.
_IP_SUFFIX = re.compile(r"(?::\d{1,5}|/\d{1,2})(?!\d)")
_IP_PREFIX = re.compile(r"(?://|@)$")
_NET_WORD = re.compile(
    r"\b(?:ips?|ipv4|ip-?address(?:es)?|address(?:es)?|addr|inet|hosts?|hostname|servers?|connect\w*|"
    r"ping(?:ed|ing)?|gateway|router|dns|nameservers?|resolv\w*|proxy|subnet|netmask|firewall|vpn|"
    r"clients?|peers?|remote|origin|src|dst|listen\w*|bind|ssh|telnet|ftp|curl|wget|nslookup|traceroute|"
    r"port|login|logged|blocked|banned|whitelist\w*|allowlist\w*|localhost|lan|wan)\b",
    re.I,
)
_NUMBERING_WORD = re.compile(
    r"(?:\b(?:v|ver|version|versions|release|build|oid|section|sections|sec|chapter|ch|clause|article|art|"
    r"rule|step|figure|fig|table|item|paragraph|para|no|nr)\.?|§)\s*$",
    re.I,
)
_IP_WINDOW = 40  # characters looked at on each side (same line)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# A phone number: an international "+<country> ..." form, or a North-American/European grouped
# form with an area code in parentheses or separated by - . or space. Needs >= 9 digits in all.
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958, +1-202-555-0143
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"  # (202) 555-0143, (030) 1234 5678
    r"|\d{3}[-.]\d{3}[-.]\d{4}"  # 202-555-0143, 202.555.0143
    r")(?![\w])"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (what every payment card number satisfies)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", m.group(0))
    # A run of one repeated digit ("0000 0000 0000 0000") passes Luhn but is a placeholder itself.
    if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
        return PLACEHOLDER["card"]
    return None


def _ipv6(m: re.Match) -> str | None:
    s = m.group(0)
    # At least three non-empty groups and a digit: "a::b" and "std::map" in code are valid IPv6
    # text but not addresses ("::1" is given up with them).
    if sum(1 for g in s.split(":") if g) < 3 or not any(c.isdigit() for c in s):
        return None
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return None
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", s):  # a clock time is valid IPv6 text but not an address
        return None
    return PLACEHOLDER["ip"]


def _ipv4(m: re.Match) -> str | None:
    """Mask a dotted quad only in an address context (see _IP_SUFFIX, _IP_PREFIX, _NET_WORD): four
    numbers of at most 255 are also version, OID and section numbers, and masking those alters text
    that holds no personal data."""
    text, start, end = m.string, m.start(), m.end()
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    before = text[max(line_start, start - _IP_WINDOW):start]
    if _NUMBERING_WORD.search(before):
        return None
    after = text[end:min(line_end, end + _IP_WINDOW)]
    if _IP_SUFFIX.match(after) or _IP_PREFIX.search(before) or _NET_WORD.search(before) or _NET_WORD.search(after):
        return PLACEHOLDER["ip"]
    return None


def _phone(m: re.Match) -> str | None:
    return PLACEHOLDER["phone"] if sum(c.isdigit() for c in m.group(0)) >= 9 else None


_RULES = {
    "card": [(_CARD, _card)],
    "email": [(_EMAIL, lambda m: PLACEHOLDER["email"])],
    "ip": [(_IPV4, _ipv4), (_IPV6, _ipv6)],
    "phone": [(_PHONE, _phone)],
}
# Cheap pre-checks: most documents hold no "@", no run of digits, no "::"-like text.
_HAS_DIGIT = re.compile(r"\d")


def mask_pii(text: str, kinds) -> tuple[str, dict[str, int]]:
    """Replace each PII match of the listed ``kinds`` by its placeholder; returns (text, counts)."""
    counts: dict[str, int] = {}
    if not text or not kinds:
        return text, counts
    has_digit = _HAS_DIGIT.search(text) is not None
    for kind in KINDS:
        if kind not in kinds:
            continue
        if kind == "email" and "@" not in text:
            continue
        if kind in ("card", "phone") and not has_digit:
            continue
        if kind == "ip" and not has_digit and "::" not in text:
            continue
        for pattern, repl in _RULES[kind]:
            n = 0

            def sub(m, repl=repl):
                nonlocal n
                out = repl(m)
                if out is None:
                    return m.group(0)
                n += 1
                return out

            text = pattern.sub(sub, text)
            if n:
                counts[kind] = counts.get(kind, 0) + n
    return text, counts
