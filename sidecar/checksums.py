"""Checksum recognizers: Luhn for payment cards, ISO 13616 mod 97 for IBANs.

A model can miss a number or tag a lookalike; a checksum cannot be fooled by wording. The engine uses
these to confirm the model's CREDIT_CARD/IBAN_CODE spans and to add valid numbers the model missed, and
the router uses :func:`find_checksum_spans` alone when no PII model can answer (degraded mode).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate

import numpy as np

from sidecar.folding import fold
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
    # Maestro also issues 12-digit numbers; only its own IINs, since a Luhn-valid 12-digit id is common
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (5893, 5893), (6304, 6304), (6759, 6759),
                    (6761, 6763)), frozenset({12})),
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

_CARD_DIGITS = (12, 19)
# A shorter card counts only as a whole run of digit groups: the first 12 digits of a longer number that
# fails its own check ("6759 0000 0000 2024") are more likely that number than a card.
_PART_OF_RUN_DIGITS = 13
# A run of ASCII digit groups joined by single spaces or dashes that holds at least 12 digits: the only
# runs that can contain a card. Tried only from a run's first digit (the lookbehinds), and possessive, so
# a short run costs one pass over it.
_LONG_RUN = re.compile(r"[0-9](?<![0-9][0-9])(?<![0-9][ -][0-9])(?:[ -]?[0-9]){11,}+")
_SEPARATOR = re.compile(r"[ -]")
_JOIN = "|"  # between runs when they are scanned together; neither a digit nor a separator
_DOUBLED = np.array([0, 2, 4, 6, 8, 1, 3, 5, 7, 9], dtype=np.int64)  # Luhn: 2d, minus 9 above 9
_DOUBLE_DIGITS = str.maketrans("0123456789", "0246813579")
# Letters as ISO 13616 numbers (A=10 ... Z=35), for the mod-97 check.
_IBAN_NUMBERS = {ord(c): str(i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ", start=10)}


def _iban_pattern() -> re.Pattern[str]:
    """Every registered IBAN shape in one expression, matched where `_IBAN_HEAD` found a candidate: a
    country code and two check digits at the start of a word, then that country's length of letters and
    digits (single spaces allowed between them), ending at the end of a word. Country codes form a tree
    (first letter, then second), and the repeats are possessive, so a near miss fails without
    backtracking."""

    def either_case(ch: str) -> str:  # not re.IGNORECASE: it would let "K" (Kelvin sign) pass for K
        return f"[{ch}{ch.lower()}]"

    by_first: dict[str, list[str]] = {}
    for country, length in sorted(IBAN_LENGTHS.items()):
        by_first.setdefault(country[0], []).append(
            f"{either_case(country[1])}[0-9]{{2}}(?: ?[A-Za-z0-9]){{{length - 4}}}+")
    shapes = "|".join(f"{either_case(first)}(?:{'|'.join(rest)})" for first, rest in by_first.items())
    return re.compile(rf"(?<![^\W_])(?>{shapes})(?![^\W_])")


_IBAN = _iban_pattern()
# Two letters and two digits, found from the digits (rarer than letters in prose, so the scan skips ahead
# on a character class): the match starts at the first digit, the candidate IBAN two characters earlier.
_IBAN_HEAD = re.compile(r"[0-9](?<=[A-Za-z]{2}[0-9])[0-9]")


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check over a string of ASCII digits."""
    if not digits.isascii() or not digits.isdigit():
        return False
    kept, doubled = digits[::-1][::2], digits[::-1][1::2].translate(_DOUBLE_DIGITS)
    return (sum(map(int, kept)) + sum(map(int, doubled))) % 10 == 0


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
    return int((iban[4:] + iban[:4]).translate(_IBAN_NUMBERS)) % 97 == 1


def find_checksum_spans(text: str) -> list[Span]:
    """Every well-formed card number and IBAN in `text` whose checksum holds, sorted by start (look-alike
    digits, dashes and spaces read as ASCII: `fold`)."""
    text = fold(text)
    spans = list(_find_cards(_apart(text))) + list(_find_ibans(text))
    spans.sort(key=lambda s: (s.start, s.end))
    return spans


def find_checksum_spans_each(texts: Sequence[str]) -> list[list[Span]]:
    """:func:`find_checksum_spans` of each text, scanned together as one (a newline between two texts ends
    any number, as a text's own edges do), so a body of thousands of short messages costs one scan."""
    if len(texts) <= 1:
        return [find_checksum_spans(t) for t in texts]
    starts = list(accumulate((len(t) + 1 for t in texts[:-1]), initial=0))
    out: list[list[Span]] = [[] for _ in texts]
    for span in find_checksum_spans("\n".join(texts)):
        i = bisect_right(starts, span.start) - 1
        at = starts[i]
        out[i].append(Span(span.label, span.start - at, span.end - at, span.score, span.source))
    return out


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
    fragment = fold(fragment)
    found = _find_cards(_apart(fragment)) if label == CREDIT_CARD else _find_ibans(fragment)
    return any(True for _ in found)


_PUNCTUATED_CARD = re.compile(
    r"(?<![0-9])[0-9]{4}([.,;/|#~'_$])(?:[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}|[0-9]{6}\1[0-9]{4,5})(?![0-9])")
"""A card written in its groups (4-4-4-x, or Amex's 4-6-5) with one punctuation mark, the same each time,
between them ("4111.1111.1111.1111", "4111,1111,1111,1111"): a reader takes the mark for a space. Only
in that shape, and not with an arithmetic sign or a colon: any punctuation between digits would make
coordinates, decimals, grouped thousands, times and sums ("47.3625296,7.3354620", "36,218,604,712,139",
"5839+1131+6676+3992") into cards."""
_HEX = re.compile(r"[0-9A-Fa-f]+")
_WORD_CHARS = 64
"""How far `_word` looks either side of a digit: longer words are ids or data, not a card with a prefix."""


def glued_number(word: str, grouped: bool = False) -> bool:
    """Whether `word`, letters touching a number, is a number glued to a word ("No4111111111111111",
    "4111111111111111exp": still a card to whoever reads it, so it is scanned as one) rather than an id: a
    hexadecimal word (a UUID's group, a trace id, a hash, a Mongo ObjectId) is an id, unless it is a short
    word at the edge of a number written in groups (`grouped`: "Ace4111 1111 1111 1111", "…1111 1111a"). An
    order number that passes Luhn and a brand's prefix is masked too: a false mask beats a leak."""
    if len(word) > 2 * _WORD_CHARS:
        return False
    return not _HEX.fullmatch(word) or (grouped and len(word) <= 8)


_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def _in_uuid(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` lies inside a UUID (whose all-digit groups now and then pass Luhn)."""
    lo = max(0, start - 36)
    return any(m.start() <= start and end <= m.end() for m in _UUID.finditer(text, lo, min(len(text), end + 36)))


def _word(text: str, at: int) -> str:
    """The letters and digits around ``text[at]`` (at most `_WORD_CHARS` either side, and one more to tell)."""
    lo, hi = max(0, at - _WORD_CHARS - 1), min(len(text), at + _WORD_CHARS + 2)
    start = at
    while start > lo and text[start - 1].isalnum():
        start -= 1
    end = at
    while end < hi and text[end].isalnum():
        end += 1
    return text[start:end]


def _apart(text: str) -> str:
    """The card scan's view of `text`: a `_PUNCTUATED_CARD`'s marks as spaces, character for character
    (offsets stay)."""
    if not _PUNCTUATED_CARD.search(text):
        return text
    return _PUNCTUATED_CARD.sub(lambda m: m.group().replace(m.group(1), " "), text)


def _find_cards(text: str) -> Iterator[Span]:
    """Within each run of digit groups, the longest whole-group stretches that are valid cards.

    Scanning from the left, the first group that starts a valid card of 12-19 digits takes the longest
    such stretch, and the scan goes on after it. A group glued to a word (``A4111...``, ``...1111X``) is
    not part of any number. Linear in the text: the runs are found by one regular expression, and all
    their candidate stretches are checked together with numpy, so digit-dense text costs no Python work
    per group.
    """
    runs: list[tuple[int, int]] = []
    for m in _LONG_RUN.finditer(text):
        start, end = m.span()
        grouped = _SEPARATOR.search(text, start, end) is not None
        if grouped and "-" in text[start:end] and _in_uuid(text, start, end):
            continue  # a UUID's digit groups, joined by its dashes
        if start and text[start - 1].isalnum() and not glued_number(_word(text, start), grouped):  # an id's digits
            sep = _SEPARATOR.search(text, start, end)
            if sep is None:
                continue
            start = sep.end()
        if end < len(text) and text[end].isalnum() and not glued_number(_word(text, end - 1), grouped):
            end = max(text.rfind(" ", start, end), text.rfind("-", start, end))
            if end < start:
                continue
        runs.append((start, end))
    if runs:
        yield from _cards_in_runs(text, runs)


def _cards_in_runs(text: str, runs: list[tuple[int, int]]) -> Iterator[Span]:
    """The cards in `runs` (``[start, end)`` of runs of digit groups in `text`), all checked at once."""
    joined = _JOIN.join(text[start:end] for start, end in runs)
    chars = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    at = np.flatnonzero((chars >= 48) & (chars <= 57))  # where each digit sits in `joined`
    digits = chars[at].astype(np.int64) - 48
    n = len(digits)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = at[1:] != at[:-1] + 1
    bounds = np.append(np.flatnonzero(new_group), n)  # bounds[g]: digits before group g; bounds[-1]: all
    groups = len(bounds) - 1
    group_at = np.full(n + 1, -1, dtype=np.int64)  # the group a digit index starts (or, at n, the end)
    group_at[bounds] = np.arange(groups + 1)
    new_run = np.ones(groups, dtype=bool)
    new_run[1:] = chars[at[bounds[1:-1]] - 1] == ord(_JOIN)
    run_of_digit = np.repeat(np.cumsum(new_run) - 1, np.diff(bounds))

    # Candidate starts: groups with room for the shortest card whose first digit can begin a brand's number.
    begin = bounds[:-1]
    first = np.flatnonzero((begin + _CARD_DIGITS[0] <= n) & (digits[np.minimum(begin, n - 1)] >= 2)
                           & (digits[np.minimum(begin, n - 1)] <= 6))
    if not len(first):
        return
    a = begin[first]
    head = digits[a] * 1000 + digits[a + 1] * 100 + digits[a + 2] * 10 + digits[a + 3]
    brand_of = []  # per _BRANDS entry: which starts carry one of its prefixes
    for _, ranges, _ in _BRANDS:
        match = np.zeros(len(first), dtype=bool)
        for low, high in ranges:
            top = head // 10 ** (4 - len(str(low)))
            match |= (top >= low) & (top <= high)
        brand_of.append(match)
    # Luhn by prefix sums: a digit is doubled when its distance to the number's last digit is odd, so in
    # numbers ending on an even (odd) digit index the digits at odd (even) indices are doubled.
    odd = np.arange(n) % 2 == 1
    doubled = _DOUBLED[digits]
    prefix = np.zeros((2, n + 1), dtype=np.int64)
    prefix[0, 1:] = np.cumsum(np.where(odd, doubled, digits))
    prefix[1, 1:] = np.cumsum(np.where(odd, digits, doubled))
    best = np.zeros(len(first), dtype=np.int64)  # digits in the longest valid card from each start
    for length in range(_CARD_DIGITS[1], _CARD_DIGITS[0] - 1, -1):  # longest first
        ok = best == 0
        branded = np.zeros(len(first), dtype=bool)
        for match, (_, _, lengths) in zip(brand_of, _BRANDS, strict=True):
            if length in lengths:
                branded |= match
        ok &= branded
        stop = np.minimum(a + length, n)
        ok &= (a + length <= n) & (group_at[stop] >= 0) & (run_of_digit[stop - 1] == run_of_digit[a])
        if length < _PART_OF_RUN_DIGITS:  # the whole run or nothing
            run = run_of_digit[a]
            ok &= (a == 0) | (run_of_digit[np.maximum(a - 1, 0)] != run)
            ok &= (stop == n) | (run_of_digit[np.minimum(stop, n - 1)] != run)
        (cand,) = np.nonzero(ok)
        if not len(cand):
            continue
        lo, hi = a[cand], a[cand] + length
        parity = (hi - 1) % 2
        valid = (prefix[parity, hi] - prefix[parity, lo]) % 10 == 0
        best[cand[valid]] = length

    offsets = np.cumsum([0] + [end - start + len(_JOIN) for start, end in runs[:-1]])  # runs in `joined`
    shift = np.array([start for start, _ in runs], dtype=np.int64) - offsets  # `joined` -> `text`
    run_of_group = run_of_digit[begin]
    next_free = 0
    for i in np.flatnonzero(best).tolist():
        g = int(first[i])
        if g < next_free:
            continue
        last = int(group_at[bounds[g] + best[i]]) - 1
        move = int(shift[run_of_group[g]])
        yield Span(CREDIT_CARD, int(at[bounds[g]]) + move, int(at[bounds[last + 1] - 1]) + 1 + move, 1.0, SOURCE)
        next_free = last + 1


def _find_ibans(text: str) -> Iterator[Span]:
    """Every registered country's IBAN shape (see ``_IBAN``) whose mod-97 check holds."""
    for head in _IBAN_HEAD.finditer(text):
        m = _IBAN.match(text, head.start() - 2)
        if m is not None and is_valid_iban(m.group()):
            yield Span(IBAN_CODE, m.start(), m.end(), 1.0, SOURCE)
