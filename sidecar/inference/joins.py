"""One entity, one span: the pieces a token classifier returns for a name, a phone number or an address,
joined back into the entity.

A PII model tags tokens, not entities, and its pieces leak: "Rhonda M. Nguyen" comes back as two names with
the initial's full stop between them, "Weiss, Gilles" as two names around a comma, "Barrett-Harrison" as a
name and a firm, "6 66 32 17 05" as a date and a phone, an address as a street, a house
number read as a phone, a town read as a place and its region code read as nothing. The default policy lets
places, firms and dates through, so the town beside the masked street or the first name read as a place reached
the backend, and each piece got its own placeholder. A title before a name ("Mr.", "Frau") is left as it is
unless the model tagged it: it says how to address someone, not who they are.

Joining only adds: every span the model returned is still there (a place that became part of an address stays
a place under it, an SSN that became part of a phone number stays an SSN), so no policy masks or refuses less
than it would have without the joins. Each piece joins at most a few spans away from the entity it continues
(one for a name or a phone number, three for an address: house number, town, country), so a run of places or
numbers is not swallowed whole. The expressions look only at a few dozen characters at a span's edges or
between two spans, and each pass is linear in the number of spans (about 3 microseconds a span on the 2-core
development machine: 2 s for a body of a million one-word spans).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sidecar.checksums import merge_overlapping
from sidecar.config import CONTEXT_ENTITIES
from sidecar.results import Span

ADDRESS, LOCATION, PERSON, PHONE_NUMBER = "ADDRESS", "LOCATION", "PERSON", "PHONE_NUMBER"
_NAME_CONTEXT = frozenset({"LOCATION", "ORGANIZATION", "NRP"})  # what a first name or surname is misread as
_PHONE_DIGITS = 7  # the fewest digits of a phone number (a local number without its area code)

# What may stand between two pieces of one entity.
_ADDRESS_GAP = re.compile(r"[\s,;/.]{0,4}")  # "Victor Hugo u. 97." + "Sečovlje"
_NAME_GAP = re.compile(r"[ \t]{0,2}|\.[ \t]{0,2}|,[ \t]{1,2}|-")  # "M. Nguyen", "Weiss, Gilles", "Barrett-Harrison"
_NAME_PIECE_GAP = re.compile(r"[ \t]|-")  # a word misread as a place or firm joins a name only this close
_PHONE_GAP = re.compile(r"[ .\-]")
_NUMBER_GAP = re.compile(r"[\W_]{1,3}")  # "4111,1111,1111,1111", "4111 | 1111", "078_05_1120"
_NUMBER_LABELS = {"CREDIT_CARD": 19, "IBAN_CODE": 34, "US_SSN": 9}
"""Numbers whose groups the model may tag one by one, and the most letters and digits one holds: each group
masked on its own would keep its last digits (a card's mask shows four), so groups with only separators
between them are one span, up to that length (a card and the SSN after it stay two: joined, the card's mask
would show the SSN's last four)."""
_DIGITS = re.compile(r"\+?[\d \-]+")

# Edges of a name: hyphenated parts, initials' full stops and letters after a degree.
_HYPHEN_AFTER = re.compile(r"(?:-[^\W\d_]{1,32}){1,2}")  # "Shaw" + "-Bolton", "BAR-LE-" + "DUC"
_HYPHEN_BEFORE = re.compile(r"[^\W\d_]{1,32}-\Z")  # "Jean-" + "Luc"
_HYPHENS = 2  # hyphenated parts taken before a span, at most
_AFTER_NAME = re.compile(r",?[ \t](?:MD|M\.D\.|PhD|Ph\.D\.|Jr\.?|Sr\.?|III|Esq\.?|B\.A\.|M\.A\.|B\.Sc\.|M\.Sc\.|MBA)(?![^\W_])")
_SURNAME_AFTER_INITIAL = re.compile(  # "Rhonda" + " M. Nguyen": a middle initial, then a capitalised surname
    r"[ \t](?:[A-ZÀ-ÖØ-Þ]\.[ \t]?){1,2}[ \t]?[A-ZÀ-ÖØ-Þ](?:['’][A-ZÀ-ÖØ-Þ])?[^\W\d_]{1,32}"
    r"(?:-[A-ZÀ-ÖØ-Þ][^\W\d_]{1,32})?(?![^\W_])")
_INITIALS_AFTER = re.compile(r"(?:[^\W\d_]\.){1,3}")  # "geisel b." + "a."
_SHORT_LAST_WORD = re.compile(r"(?<![^\W\d_])[^\W\d_]{1,2}\Z")  # "Rhonda M", "Mr", "B.A"

# What ends an address: region codes, postcodes ("ON", "(SS)", "HI 37643", "N2 2EX", "K1A 0B1").
_ADDRESS_TAIL = re.compile(
    r"(?:(?:[ \t]{0,2}|[ \t\n]{0,2},[ \t\n]{0,3})(?<![^\W_])"
    r"(?:\(?[A-Z]{2,3}\)?|\d{4,6}(?:-\d{4})?(?![ \t]?\d)"
    r"|(?=[A-Z\d]{2,4}(?![^\W_]))(?=[A-Z\d]{0,3}[A-Z])[A-Z]{0,3}\d[A-Z\d]{0,3})"
    r"(?![^\W_])){1,2}")


def join_entity_parts(text: str, spans: list[Span]) -> list[Span]:
    """The model's spans of one reading with each name, phone number and address made one span, the spans it
    was made of still beside it. `spans` are sorted by start; the result is sorted, same-label overlaps merged."""
    joined = [_widen(text, s) for s in spans]
    if len(joined) > 1:
        joined = _one_label_per_word(merge_overlapping(joined))
        joined = _join(text, joined, PERSON, _name_piece, _NAME_PIECE_GAP, _NAME_GAP, reach=1)
        joined = _join(text, joined, PHONE_NUMBER, _number_piece, _PHONE_GAP, _PHONE_GAP, reach=1)
        for label, longest in _NUMBER_LABELS.items():
            joined = _join_groups(text, joined, label, longest)
        if any(s.label == ADDRESS for s in joined):  # a town joined to a street may end in its region code,
            joined = _join(text, joined, ADDRESS, _address_piece, _ADDRESS_GAP, _ADDRESS_GAP, reach=3)
            joined = _join(text, [_address_tail(text, s) for s in joined], ADDRESS, _address_piece,  # which may
                           _ADDRESS_GAP, _ADDRESS_GAP, reach=0)  # touch the next piece: joined, no more taken
    return merge_overlapping([*joined, *spans])  # an original inside a joined span of its label merges into it


def _one_label_per_word(spans: list[Span]) -> list[Span]:
    """Of spans over the same characters (a word whose tokens got two types, both widened to the word), one:
    the other would stand between the word and the pieces around it. An identifying type wins over a type the
    default policy lets through (a name is never dropped for a place), then the more confident; it takes the
    higher score of the two, so a policy that masks places masks the word still."""
    out: list[Span] = []
    for span in spans:  # sorted by start, then end
        if out and (out[-1].start, out[-1].end) == (span.start, span.end):
            best = span if _rank(span) > _rank(out[-1]) else out[-1]
            out[-1] = Span(best.label, best.start, best.end, max(span.score, out[-1].score), best.source)
        else:
            out.append(span)
    return out


def _rank(span: Span) -> tuple[bool, float]:
    return span.label not in CONTEXT_ENTITIES, span.score


def _widen(text: str, span: Span) -> Span:
    if _name_piece(text, span) and text[span.start].isupper() and \
            (surname := _SURNAME_AFTER_INITIAL.match(text, span.end)):  # "Rhonda" read as a place + " M. Nguyen"
        return Span(PERSON, span.start, surname.end(), span.score, span.source)
    if span.label == PERSON:
        start, end = _name_edges(text, span.start, span.end)
    elif span.label == ADDRESS:
        start, end = _hyphenated(text, span.start, span.end)
        end = _address_tail(text, Span(ADDRESS, start, end, span.score)).end
    else:
        return span
    return span if (start, end) == (span.start, span.end) else Span(span.label, start, end, span.score, span.source)


def _address_tail(text: str, span: Span) -> Span:
    """An address widened over the region codes and postcodes right after it."""
    if span.label != ADDRESS or not (tail := _ADDRESS_TAIL.match(text, span.end)):
        return span
    return Span(ADDRESS, span.start, tail.end(), span.score, span.source)


def _name_edges(text: str, start: int, end: int) -> tuple[int, int]:
    """A name's span widened over its other hyphenated parts, a middle initial and the surname after it,
    and the full stops and degrees after its initials (and after a title the model tagged: "Mr" + ".")."""
    start, end = _hyphenated(text, start, end)
    if surname := _SURNAME_AFTER_INITIAL.match(text, end):
        end = surname.end()
    if text[end - 1] == "." and (initials := _INITIALS_AFTER.match(text, end)):
        end = initials.end()
    if end < len(text) and text[end] == "." and _SHORT_LAST_WORD.search(text, max(start, end - 3), end):
        end += 1
    if after := _AFTER_NAME.match(text, end):
        end = after.end()
    return start, end


def _hyphenated(text: str, start: int, end: int) -> tuple[int, int]:
    """Wider over the word parts hyphenated to the span's edges ("Barrett-" + "Harrison", "BAR-LE-" + "DUC")."""
    last = text[end - 1]  # a span that ends in its hyphen, or in a letter a hyphen follows
    after = _HYPHEN_AFTER.match(text, end - 1 if last == "-" else end) if last == "-" or last.isalpha() else None
    end = after.end() if after else end
    for _ in range(_HYPHENS):
        if not text[start].isalpha() or not (before := _HYPHEN_BEFORE.search(text, max(0, start - 33), start)):
            break
        start = before.start()
    return start, end


def _name_piece(text: str, span: Span) -> bool:
    """One word misread as a place, a firm or a group ("Stephanie" as a place before the surname)."""
    value = text[span.start : span.end]
    return span.label in _NAME_CONTEXT and value[:1].isalpha() and not any(c.isspace() for c in value)


def _number_piece(text: str, span: Span) -> bool:
    """A group of digits too short to be a phone number alone (the "6" of "6 66 32 17 05", read as a date)."""
    value = text[span.start : span.end]
    return _DIGITS.fullmatch(value) is not None and sum(c.isdigit() for c in value) < _PHONE_DIGITS


def _address_piece(text: str, span: Span) -> bool:
    """A place, or a number too short to be a phone (a house number read as a date, a phone or a card; a
    street and its number read as a phone)."""
    if span.label in (LOCATION, PHONE_NUMBER):
        return span.label == LOCATION or sum(c.isdigit() for c in text[span.start : span.end]) < _PHONE_DIGITS
    return _number_piece(text, span)


def _join(text: str, spans: list[Span], label: str, piece: Callable[[str, Span], bool], piece_gap: re.Pattern,
          gap: re.Pattern, reach: int) -> list[Span]:
    """Pieces right beside a `label` span take its label, up to `reach` pieces away from a span the model gave
    that label, then `label` spans that touch, overlap or have only `gap` between them become one, scored as the
    strongest."""
    if not any(s.label == label for s in spans):
        return spans
    out = list(spans)
    for _ in range(reach):
        ends = [s.label == label for s in out]  # this step's entity spans: a piece joins one step at a time
        grown = False
        for i, span in enumerate(out):
            if ends[i] or not piece(text, span):
                continue
            if (i > 0 and ends[i - 1] and _beside(text, out[i - 1], span, piece_gap)) or \
                    (i + 1 < len(out) and ends[i + 1] and _beside(text, span, out[i + 1], piece_gap)):
                out[i] = Span(label, span.start, span.end, span.score, span.source)
                grown = True
        if not grown:
            break
    joined: list[Span] = []
    last = -1  # index in `joined` of the last `label` span
    for span in out:
        if span.label == label and last >= 0 and _beside(text, joined[last], span, gap):
            prev = joined[last]
            joined[last] = Span(label, prev.start, max(prev.end, span.end), max(prev.score, span.score), prev.source)
            continue
        joined.append(span)
        if span.label == label:
            last = len(joined) - 1
    return joined


def _join_groups(text: str, spans: list[Span], label: str, longest: int) -> list[Span]:
    """`label` spans with only `_NUMBER_GAP` between them made one, while it holds at most `longest` letters
    and digits, scored as the strongest."""
    if sum(s.label == label for s in spans) < 2:
        return spans
    out: list[Span] = []
    last = -1  # index in `out` of the last `label` span
    for span in spans:
        if span.label == label and last >= 0 and _beside(text, out[last], span, _NUMBER_GAP):
            prev = out[last]
            end = max(prev.end, span.end)
            if sum(c.isalnum() for c in text[prev.start : end]) <= longest:
                out[last] = Span(label, prev.start, end, max(prev.score, span.score), prev.source)
                continue
        out.append(span)
        if span.label == label:
            last = len(out) - 1
    return out


def _beside(text: str, first: Span, second: Span, gap: re.Pattern) -> bool:
    """`second` (which starts no earlier) overlaps `first` or follows it with only `gap` between."""
    if second.start < first.end:
        return True
    return gap.fullmatch(text, first.end, second.start) is not None
