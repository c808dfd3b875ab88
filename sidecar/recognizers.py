"""Recognizers: objects that find one kind of personal data each, after Presidio's analyzer.

Each recognizer has a ``name`` (its key in :data:`RECOGNIZERS`), the ``entities`` (labels) it reports and
``find(text)``, which returns :class:`~sidecar.results.Span` objects sorted by start, with Python string
offsets. The checksum ones wrap :mod:`sidecar.checksums` (source ``"checksum"``); the pattern ones
(source ``"pattern"``) are regular expressions plus a little validation in Python.

The sidecar runs these over attacker-controlled bodies of several MiB, so every expression is linear
time: each one is tried only where a cheap anchor is (``@``, ``://``, ``+``, ``:hex:``, or a digit that
starts a number, checked by a one-character lookbehind), and every repeat that could be split two ways
is possessive, so a near miss fails without backtracking. A newline ends every entity, as a text's own
edges do, which lets :func:`find_each` scan thousands of short texts joined into one string.

Speed, measured by hand with :func:`find_all` (best of five) on 1 MiB of English-like prose that holds
about 300 PII values (emails, phones, SSNs, IPs, URLs with passwords, cards, IBANs) and some plain
numbers, dates and versions, on the 2-core development machine (Python 3.11): all seven recognizers
together about 20 MB/s, the five pattern ones alone about 30 MB/s; each one alone runs at about 90 MB/s
(those found from digits) up to 2 GB/s (url_credentials, found from "://").
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import accumulate
from typing import Protocol, runtime_checkable

from sidecar.checksums import CREDIT_CARD, IBAN_CODE, _apart, _find_cards, _find_ibans
from sidecar.folding import fold
from sidecar.results import Span

EMAIL_ADDRESS = "EMAIL_ADDRESS"
PHONE_NUMBER = "PHONE_NUMBER"
US_SSN = "US_SSN"
IP_ADDRESS = "IP_ADDRESS"
CREDENTIAL = "CREDENTIAL"
PATTERN = "pattern"
CHECKSUM = "checksum"


@runtime_checkable
class Recognizer(Protocol):
    """Finds the entities it names in a text; stateless, so one instance serves every request."""

    name: str
    entities: frozenset[str]

    def find(self, text: str) -> list[Span]: ...


def _span_key(span: Span) -> tuple[int, int, str]:
    return span.start, span.end, span.label


def _drop_contained(spans: list[Span]) -> list[Span]:
    """Sorted by start then end, without spans that lie inside another (two shapes found one number)."""
    spans.sort(key=lambda s: (s.start, -s.end))
    kept: list[Span] = []
    reach = -1
    for span in spans:
        if span.end > reach:
            kept.append(span)
            reach = span.end
    kept.sort(key=_span_key)
    return kept


def _is_word_char(text: str, i: int) -> bool:
    """Whether ``text[i]`` exists and is a ``\\w`` character (letter, digit or underscore, any script)."""
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


# --- checksum recognizers ------------------------------------------------------------------------------


class CreditCardRecognizer:
    """Payment card numbers with a known brand's prefix and length and a valid Luhn digit."""

    name = "credit_card"
    entities = frozenset({CREDIT_CARD})

    def find(self, text: str) -> list[Span]:
        return sorted(_find_cards(_apart(fold(text))), key=_span_key)


class IbanRecognizer:
    """IBANs of a registered country's length whose ISO 13616 mod-97 check holds."""

    name = "iban"
    entities = frozenset({IBAN_CODE})

    def find(self, text: str) -> list[Span]:
        return sorted(_find_ibans(fold(text)), key=_span_key)


# --- email ---------------------------------------------------------------------------------------------

# Found from the "@" (the engine jumps between them with a fast literal search): a domain of dot-separated
# labels. Each label is possessive and the labels are split by a literal dot, so there is one way to match.
_AT_DOMAIN = re.compile(r"@([\w-]++(?:\.[\w-]++)++)")
# The local part, matched forwards on the reversed text from the character before the "@": regular
# expressions cannot search backwards, and a lookbehind cannot have a variable width.
_LOCAL_REVERSED = re.compile(r"[\w.%+-]++")
_URL_USERINFO_TAIL = re.compile(r"://[^\s/?#@]*+")
_URL_LOOKBACK = 256


class EmailRecognizer:
    """``local@domain.tld`` addresses; the domain needs a dot and a top-level label of 2+ letters."""

    name = "email"
    entities = frozenset({EMAIL_ADDRESS})
    score = 1.0

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        reversed_text = ""
        for m in _AT_DOMAIN.finditer(text):
            end = _domain_end(m.group(1), m.start(1))
            if end is None:
                continue
            if not reversed_text:
                reversed_text = text[::-1]
            start = _local_start(text, reversed_text, m.start())
            if start is not None and not _in_url_userinfo(text, start):
                spans.append(Span(EMAIL_ADDRESS, start, end, self.score, PATTERN))
        return spans


def _domain_end(domain: str, at: int) -> int | None:
    """Where a plausible domain starting at `at` ends (trailing hyphens and underscores dropped), or None."""
    domain = domain.rstrip("-_")
    labels = domain.split(".")
    tld = labels[-1]
    if len(labels) < 2 or len(tld) < 2 or not tld.isalpha():
        return None
    if any(not label or len(label) > 63 or label[0] in "-_" or label[-1] in "-_" for label in labels):
        return None
    return at + len(domain)


def _local_start(text: str, reversed_text: str, at: int) -> int | None:
    """Where the local part before the "@" at `at` begins (leading dots dropped), or None if it is empty."""
    m = _LOCAL_REVERSED.match(reversed_text, len(text) - at)
    if m is None:
        return None
    start = at - (m.end() - m.start())
    while start < at and text[start] == ".":
        start += 1
    return start if start < at else None


def _in_url_userinfo(text: str, start: int) -> bool:
    """Whether `start` lies in a URL's ``user:password`` part (``scheme://user:pw@host``), which is the
    URL credentials recognizer's to report: ``pw@host`` is not an address."""
    i = text.rfind("://", max(0, start - _URL_LOOKBACK), start)
    if i < 0:
        return False
    m = _URL_USERINFO_TAIL.match(text, i, start)
    return m is not None and m.end() == start


# --- phone numbers -------------------------------------------------------------------------------------

# North-American numbers. The match starts on "(" or a digit (the engine skips ahead on that class); the
# lookbehinds then check it is not glued to a word, a "+" or an earlier number group ("12-555-...").
# A leading "1" can only be the country code (area codes start at 2). Without parentheses both
# separators must be the same character, which rules out most arithmetic and ranges.
_NANP = re.compile(
    r"""
    [(1-9](?<![\w+][(1-9])(?<![0-9][.-][(1-9])
    (?:(?<=1)[ .-][(2-9])?                              # 1-800-..., 1 (555) ...
    (?:(?<=\()[2-9][0-9]{2}\)[ .-]?                     # (555) 123-4567
      |(?<=[2-9])[0-9]{2}(?P<sep>[ .-]))                # 555-123-4567
    [0-9]{3}(?(sep)(?P=sep)|[ .-])[0-9]{4}
    (?!\w|[.-][0-9])
    """,
    re.VERBOSE,
)
# International numbers: "+", a country code and groups of digits (or one "(0)"-style group), each
# separated by at most one space, dot or dash. Each group is possessive and starts with a different
# character than the separator, so the groups split one way. The digit count is checked in Python.
_INTERNATIONAL = re.compile(r"\+(?<![\w+]\+)[1-9][0-9]*+(?:[ .-]?(?:[0-9]++|\([0-9]{1,4}+\)))*+")
_PHONE_DIGITS = (8, 15)


def _digit_count(s: str) -> int:
    return sum(map(s.count, "0123456789"))


class PhoneRecognizer:
    """North-American numbers in their usual shapes, and ``+``-prefixed international numbers.

    A run of digits without separators is a phone only after a "+". Card numbers (groups of four) never
    have the 3-3-4 shape, and never start with "+", so they are not reported here.
    """

    name = "phone"
    entities = frozenset({PHONE_NUMBER})
    score = 0.75

    def find(self, text: str) -> list[Span]:
        spans = [Span(PHONE_NUMBER, m.start(), m.end(), self.score, PATTERN) for m in _NANP.finditer(text)]
        low, high = _PHONE_DIGITS
        for m in _INTERNATIONAL.finditer(text):
            if low <= _digit_count(m.group()) <= high and not _is_word_char(text, m.end()):
                spans.append(Span(PHONE_NUMBER, m.start(), m.end(), self.score, PATTERN))
        return _drop_contained(spans)  # "+1 555 123 4567" holds a North-American match too


# --- US social security numbers ------------------------------------------------------------------------

# Area (not 000, 666 or 9xx), group (not 00), serial (not 0000), with the same separator twice or none.
# Started from a digit that begins a number, like the phone pattern; the area checks are lookbehinds so
# the expression still starts with a character class.
_SSN = re.compile(
    r"""
    [0-8](?<!\w[0-8])(?<![0-9][.-][0-8])[0-9]{2}(?<!000)(?<!666)
    (?:(?P<sep>[ -])(?!00)[0-9]{2}(?P=sep)|(?!00)[0-9]{2})
    (?!0000)[0-9]{4}
    (?!\w|[.-][0-9])
    """,
    re.VERBOSE,
)
_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|social\s+security|tax\s*id|i?tin\b|taxpayer)")
_SSN_CONTEXT_CHARS = 32


class UsSsnRecognizer:
    """``123-45-6789`` or ``123 45 6789``; nine bare digits only after "SSN" or "social security".

    Nine bare digits are too common (order ids, phone numbers) to report without that context word.
    """

    name = "us_ssn"
    entities = frozenset({US_SSN})
    score = 0.85

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for m in _SSN.finditer(text):
            start, end = m.span()
            sep = m.group("sep")
            if sep is None and not _has_ssn_context(text, start):
                continue
            if sep == " " and (_digit_then(text, start - 2, " ") or _digit_then(text, end, " ", after=True)):
                continue  # one group of a longer space-separated run of numbers
            spans.append(Span(US_SSN, start, end, self.score, PATTERN))
        return spans


def _has_ssn_context(text: str, start: int) -> bool:
    """A context word shortly before `start`, on the same line (a newline is a text's edge)."""
    lo = max(0, start - _SSN_CONTEXT_CHARS)
    lo = max(lo, text.rfind("\n", lo, start) + 1)
    return _SSN_CONTEXT.search(text, lo, start) is not None


def _digit_then(text: str, i: int, sep: str, after: bool = False) -> bool:
    """Whether ``text[i:i+2]`` is an ASCII digit then `sep` (or, with `after`, `sep` then a digit)."""
    pair = text[i : i + 2] if i >= 0 else ""
    if len(pair) < 2:
        return False
    digit, other = (pair[1], pair[0]) if after else (pair[0], pair[1])
    return other == sep and "0" <= digit <= "9"


# --- IP addresses --------------------------------------------------------------------------------------

# IPv4: four groups of 1-3 digits, started from a digit that begins a number and not followed by a word
# character or another ".digit" (so not a part of 1.2.3.4.5 or v1.2.3.4). Octet values are checked in
# Python.
_IPV4 = re.compile(r"[0-9](?<!\w[0-9])(?<![0-9]\.[0-9])[0-9]{0,2}+(?:\.[0-9]{1,3}+){3}(?!\w|\.[0-9])")
# IPv6: every address has two colons at most 4 hex digits apart, found with a fast literal search from
# the colon; the address then starts at most 4 hex digits earlier and runs over hex digits, colons and
# dots (an IPv4 tail), to be checked by `ipaddress`.
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}+:")
_IPV6_RUN = re.compile(r"[0-9A-Fa-f:.]++")
_HEX = frozenset("0123456789abcdefABCDEF")
_IPV6_MAX_CHARS = 45


class IpAddressRecognizer:
    """IPv4 dotted quads (octets 0-255, no leading zeros) and IPv6 addresses, full or ``::``-compressed.

    An IPv6 candidate must hold a decimal digit, so C++-style ``Face::add`` and a lone ``::`` are not
    addresses; times like ``12:30:45`` and MAC addresses fail the ``ipaddress`` check.
    """

    name = "ip_address"
    entities = frozenset({IP_ADDRESS})
    score = 0.85

    def find(self, text: str) -> list[Span]:
        spans = [Span(IP_ADDRESS, m.start(), m.end(), self.score, PATTERN)
                 for m in _IPV4.finditer(text) if _valid_octets(m.group())]
        if ":" in text:
            spans.extend(Span(IP_ADDRESS, s, e, self.score, PATTERN) for s, e in _ipv6_spans(text))
        return _drop_contained(spans)  # "::ffff:192.0.2.1" holds an IPv4 match too


def _valid_octets(quad: str) -> bool:
    return all(int(part) <= 255 and (part == "0" or part[0] != "0") for part in quad.split("."))


def _ipv6_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each valid IPv6 address; each run of hex digits and colons is checked once."""
    out: list[tuple[int, int]] = []
    pos = 0
    while (anchor := _IPV6_ANCHOR.search(text, pos)) is not None:
        colon = anchor.start()
        start = colon
        while start > colon - 4 and start > 0 and text[start - 1] in _HEX:
            start -= 1
        pos = _IPV6_RUN.match(text, start).end()
        if start > 0 and (_is_word_char(text, start - 1) or text[start - 1] in ":."):
            if text[start - 1] in _HEX or text[colon + 1] == ":":
                continue  # more than 4 hex digits before the first colon, or "std::", "x.y::z"
            start = colon + 1  # a label before the address: "ip:2001:db8::1"
        end = _ipv6_end(text, start, pos)
        if end is not None:
            out.append((start, end))
    return out


def _ipv6_end(text: str, start: int, end: int) -> int | None:
    """Where the address in the run ``text[start:end]`` ends, or None if the run is not an address."""
    if _is_word_char(text, end):
        return None
    candidate = text[start:end].rstrip(".")
    if candidate.endswith(":") and not candidate.endswith("::"):
        candidate = candidate[:-1]  # "... at fe80::1: it answered" ends a sentence, not the address
    return start + len(candidate) if _is_ipv6(candidate) else None


@lru_cache(maxsize=4096)  # logs repeat the same few addresses; the parse costs a few microseconds
def _is_ipv6(candidate: str) -> bool:
    if len(candidate) > _IPV6_MAX_CHARS or not any(c.isdigit() for c in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


# --- credentials in URLs -------------------------------------------------------------------------------

# From "://" (a fast literal search) preceded by a scheme character: the userinfo up to the last "@"
# before the host. The userinfo's "@"-separated pieces are possessive and each begins with the literal
# "@", so the only backtracking is giving back whole pieces to find that last "@": one pass per URL. The
# userinfo cannot hold "/", and "://" does, so the stretches scanned from two anchors never overlap.
_URL_USERINFO = re.compile(r"://(?<=[A-Za-z0-9+.-]://)([^\s/?#@]*+(?:@[^\s/?#@]*+)*)@(?=[\w\[])")
_TOKEN = re.compile(r"[A-Za-z0-9._~%-]{16,}+")
_TOKEN_SCORE = 0.8


class UrlCredentialsRecognizer:
    """The ``user:password`` part of ``scheme://user:password@host`` (only that part, so the host stays
    readable), and a token-like userinfo of 16+ characters (``https://ghp_...@github.com``)."""

    name = "url_credentials"
    entities = frozenset({CREDENTIAL})
    score = 1.0

    def find(self, text: str) -> list[Span]:
        spans: list[Span] = []
        for m in _URL_USERINFO.finditer(text):
            userinfo = m.group(1)
            start, end = m.span(1)
            if ":" in userinfo:
                if userinfo.partition(":")[2]:
                    spans.append(Span(CREDENTIAL, start, end, self.score, PATTERN))
            elif _looks_like_token(userinfo):
                spans.append(Span(CREDENTIAL, start, end, _TOKEN_SCORE, PATTERN))
        return spans


def _looks_like_token(value: str) -> bool:
    return (_TOKEN.fullmatch(value) is not None and any(c.isdigit() for c in value)
            and any(c.isalpha() for c in value))


# --- registry and scans --------------------------------------------------------------------------------

RECOGNIZERS: dict[str, type[Recognizer]] = {
    "credit_card": CreditCardRecognizer,
    "iban": IbanRecognizer,
    "email": EmailRecognizer,
    "phone": PhoneRecognizer,
    "us_ssn": UsSsnRecognizer,
    "ip_address": IpAddressRecognizer,
    "url_credentials": UrlCredentialsRecognizer,
}
CHECKSUM_NAMES: tuple[str, ...] = ("credit_card", "iban")
PATTERN_NAMES: tuple[str, ...] = ("email", "phone", "us_ssn", "ip_address", "url_credentials")


def default_recognizers(names: Iterable[str] | None = None) -> tuple[Recognizer, ...]:
    """One instance of each named recognizer (all of them by default), in the order given."""
    chosen = tuple(RECOGNIZERS) if names is None else tuple(names)
    unknown = [n for n in chosen if n not in RECOGNIZERS]
    if unknown:
        raise ValueError(f"unknown recognizer(s) {', '.join(unknown)}; known: {', '.join(RECOGNIZERS)}")
    return tuple(RECOGNIZERS[n]() for n in chosen)


_ALL = default_recognizers()  # stateless, so one set serves every call that names none


def find_all(text: str, recognizers: Iterable[Recognizer] | None = None) -> list[Span]:
    """Every span each recognizer finds in `text`, sorted by start, then end (then label).

    Spans of different labels may overlap (a number can be both a phone and something else); resolving
    them is the masking step's job, as with model spans.
    """
    recognizers = _ALL if recognizers is None else recognizers
    return _find_folded(fold(text), recognizers)  # "415—555—0132", fullwidth digits: as ASCII, same offsets


def _find_folded(text: str, recognizers: Iterable[Recognizer]) -> list[Span]:
    """`find_all` of a text already folded (`find_each` folds each text once)."""
    spans = [span for recognizer in recognizers for span in recognizer.find(text)]
    spans.sort(key=_span_key)
    return spans


def find_each(texts: Sequence[str], recognizers: Iterable[Recognizer] | None = None) -> list[list[Span]]:
    """:func:`find_all` of each text, scanned together as one string joined by newlines (no entity spans a
    newline, and a newline counts as a text's edge), so thousands of short texts cost one scan each."""
    recognizers = _ALL if recognizers is None else tuple(recognizers)
    texts = [fold(t) for t in texts]
    out: list[list[Span]] = [[] for _ in texts]
    chosen = [i for i, t in enumerate(texts) if _CANDIDATE.search(t)]  # the rest cannot hold an entity
    if len(chosen) <= 1:
        for i in chosen:
            out[i] = _find_folded(texts[i], recognizers)
        return out
    scanned = [texts[i] for i in chosen]
    starts = list(accumulate((len(t) + 1 for t in scanned[:-1]), initial=0))
    for span in _find_folded("\n".join(scanned), recognizers):
        at = bisect_right(starts, span.start) - 1
        out[chosen[at]].append(span.shifted(-starts[at]))
    return out


_CANDIDATE = re.compile(r"[0-9@]")
"""Every entity the recognizers report holds an ASCII digit or an ``@`` (emails, URL credentials): a text
with neither is skipped without running them (most short values, most prose)."""


# --- the key as context ------------------------------------------------------------------------------------

CONTEXT = "context"
_CONTEXT_SCORE = 0.9
_KEY_LABELS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.IGNORECASE), label) for p, label in (
    (r"ssn|social.?security|tax.?id|tin\b", US_SSN),
    (r"phone|mobile|cell|\btel|fax|msisdn", PHONE_NUMBER),
    (r"card|\bpan\b", CREDIT_CARD),
    (r"iban|account|acct|routing", IBAN_CODE),
    (r"passport|licen[cs]e|national.?id|id.?number|nhs", "ID_NUMBER"),
))
_ID_LIKE = re.compile(r"[0-9 ()+.\-]{6,64}")


def context_spans(key: str | None, text: str) -> list[Span]:
    """The whole of `text` when its key names a kind of identifying number (``"ssn": 536222026``,
    ``"phone": "4155550125"``) and it is such a number (6 or more digits, with only separators): the
    pattern recognizers need separators or context words in the text, and a JSON key is context too."""
    if key is None or len(text) > 64 or not _ID_LIKE.fullmatch(text) or sum(c.isdigit() for c in text) < 6:
        return []
    for pattern, label in _KEY_LABELS:
        if pattern.search(key):
            return [Span(label, 0, len(text), _CONTEXT_SCORE, CONTEXT)]
    return []
