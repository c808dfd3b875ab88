"""Checksum recognizers: Luhn for payment cards, ISO 13616 mod 97 for IBANs.

A model can miss a number or tag a lookalike; a checksum cannot be fooled by wording. The engine uses
these to confirm the model's CREDIT_CARD/IBAN_CODE spans and to add valid numbers the model missed, and
the router uses :func:`find_checksum_spans` alone when no PII model can answer (degraded mode).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from itertools import accumulate

from sidecar.results import Span

CREDIT_CARD = "CREDIT_CARD"
IBAN_CODE = "IBAN_CODE"
CHECKSUM_LABELS = frozenset({CREDIT_CARD, IBAN_CODE})
SOURCE = "checksum"

# Issuer prefixes (IIN ranges) and the lengths each brand issues; a Luhn-valid number outside every
# brand is more likely an order id than a card.
_BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...], frozenset[int]], ...] = (
    ("amex", ((34, 34), (37, 37)), frozenset({15})),
    ("visa", ((4, 4),), frozenset({13, 16, 19})),
    ("mastercard", ((51, 55), (2221, 2720)), frozenset({16})),
    ("discover", ((6011, 6011), (644, 649), (65, 65)), frozenset(range(16, 20))),
    ("jcb", ((3528, 3589),), frozenset(range(16, 20))),
    ("diners", ((300, 305), (36, 36), (38, 39)), frozenset(range(14, 20))),
    ("unionpay", ((62, 62),), frozenset(range(16, 20))),
    ("maestro", ((50, 50), (56, 69)), frozenset(range(13, 20))),
)

# SWIFT IBAN registry: country code -> total IBAN length.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

_CARD_DIGITS = (13, 19)
# ASCII digit groups joined by single spaces or dashes, not glued to other letters or digits.
_DIGIT_RUN = re.compile(r"(?<![^\W_])[0-9]+(?:[ -][0-9]+)*(?![^\W_])")
_DIGIT_GROUP = re.compile(r"[0-9]+")
# Where an IBAN can start: a country code and two check digits at the start of a word.
_IBAN_START = re.compile(r"(?<![^\W_])[A-Za-z]{2}[0-9]{2}")


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check over a string of ASCII digits."""
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_brand(digits: str) -> str | None:
    """The issuing brand a number's prefix and length belong to, or None."""
    for brand, ranges, lengths in _BRANDS:
        if len(digits) not in lengths:
            continue
        for low, high in ranges:
            width = len(str(low))
            if low <= int(digits[:width]) <= high:
                return brand
    return None


def is_valid_card(number: str) -> bool:
    """A known brand's prefix and length, and a correct Luhn digit; separators are ignored."""
    digits = number.replace(" ", "").replace("-", "")
    return luhn_valid(digits) and card_brand(digits) is not None


def is_valid_iban(value: str) -> bool:
    """Registered country, that country's length, and ISO 13616 mod 97 == 1; spaces are ignored."""
    iban = value.replace(" ", "").upper()
    if not iban.isascii() or not iban.isalnum() or len(iban) < 5:
        return False
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def find_checksum_spans(text: str) -> list[Span]:
    """Every well-formed card number and IBAN in `text` whose checksum holds, sorted by start."""
    spans = list(_find_cards(text)) + list(_find_ibans(text))
    spans.sort(key=lambda s: (s.start, s.end))
    return spans


def reconcile(text: str, spans: Iterable[Span]) -> list[Span]:
    """Combine model spans with checksum evidence.

    A model span labelled with a checksum type that contains a valid number is confirmed (score 1.0);
    one that fails keeps its own score, since a false mask beats a leak. Valid numbers the model missed
    are added, and spans of the same label that overlap are merged into one covering both.
    """
    out: list[Span] = []
    for span in spans:
        if span.label in CHECKSUM_LABELS and _contains_valid(span.label, text[span.start : span.end]):
            span = Span(span.label, span.start, span.end, 1.0, span.source)
        out.append(span)
    out.extend(find_checksum_spans(text))
    return merge_overlapping(out)


def merge_overlapping(spans: Iterable[Span]) -> list[Span]:
    """Merge same-label spans that overlap (union, highest score); sorted by start, then end."""
    by_label: dict[str, list[Span]] = {}
    for span in spans:
        by_label.setdefault(span.label, []).append(span)
    merged: list[Span] = []
    for group in by_label.values():
        group.sort(key=lambda s: (s.start, s.end))
        current = group[0]
        for span in group[1:]:
            if span.start < current.end:
                best = current if current.score >= span.score else span
                current = Span(current.label, current.start, max(current.end, span.end), best.score, best.source)
            else:
                merged.append(current)
                current = span
        merged.append(current)
    merged.sort(key=lambda s: (s.start, s.end, s.label))
    return merged


def _contains_valid(label: str, fragment: str) -> bool:
    finder = _find_cards if label == CREDIT_CARD else _find_ibans
    return any(True for _ in finder(fragment))


def _find_cards(text: str) -> Iterator[Span]:
    """Within each run of digit groups, the longest whole-group stretches that are valid cards."""
    for run in _DIGIT_RUN.finditer(text):
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in _DIGIT_GROUP.finditer(run.group())]
        counts = list(accumulate((end - start for start, end in groups), initial=0))
        i = 0
        while i < len(groups):
            # Groups j whose stretch i..j holds 13-19 digits, longest first.
            lo = bisect_left(counts, counts[i] + _CARD_DIGITS[0]) - 1
            hi = bisect_right(counts, counts[i] + _CARD_DIGITS[1]) - 2
            for j in range(hi, max(lo, i) - 1, -1):
                start, end = groups[i][0], groups[j][1]
                if is_valid_card(text[start:end]):
                    yield Span(CREDIT_CARD, start, end, 1.0, SOURCE)
                    i = j
                    break
            i += 1


def _find_ibans(text: str) -> Iterator[Span]:
    """From each country-code-and-check-digits start, read that country's length of letters and digits
    (single spaces allowed between them); the number must end at a group boundary."""
    n = len(text)
    for m in _IBAN_START.finditer(text):
        start = m.start()
        length = IBAN_LENGTHS.get(text[start : start + 2].upper())
        if length is None:
            continue
        pos, count = start, 0
        while pos < n and count < length:
            ch = text[pos]
            if ch.isascii() and ch.isalnum():
                count += 1
                pos += 1
            elif ch == " " and pos + 1 < n and text[pos + 1].isascii() and text[pos + 1].isalnum() and count:
                pos += 1
            else:
                break
        if count == length and not (pos < n and text[pos].isalnum()) and is_valid_iban(text[start:pos]):
            yield Span(IBAN_CODE, start, pos, 1.0, SOURCE)
