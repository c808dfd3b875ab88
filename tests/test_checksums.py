import pytest

from sidecar.checksums import (
    CREDIT_CARD,
    IBAN_CODE,
    card_brand,
    find_checksum_spans,
    find_checksum_spans_each,
    is_valid_card,
    is_valid_iban,
    luhn_valid,
    merge_overlapping,
    reconcile,
)
from sidecar.folding import fold
from sidecar.results import Span

# Public test numbers published by the card networks and payment processors.
VALID_CARDS = {
    "4111111111111111": "visa",
    "4012888888881881": "visa",
    "4222222222222": "visa",
    "5555555555554444": "mastercard",
    "5105105105105100": "mastercard",
    "2223000048400011": "mastercard",
    "378282246310005": "amex",
    "371449635398431": "amex",
    "6011111111111117": "discover",
    "6011000990139424": "discover",
    "3530111333300000": "jcb",
    "3566002020360505": "jcb",
    "30569309025904": "diners",
    "38520000023237": "diners",
    "6200000000000005": "unionpay",
    "630456538861": "maestro",  # 12 digits: Maestro alone issues them
}

# Example IBANs from the SWIFT registry and national banks, compact.
VALID_IBANS = [
    "GB82WEST12345698765432",
    "DE89370400440532013000",
    "FR1420041010050500013M02606",
    "NL91ABNA0417164300",
    "BE68539007547034",
    "CH9300762011623852957",
    "ES9121000418450200051332",
    "IT60X0542811101000000123456",
    "NO9386011117947",
]


def spaced(value: str, sep: str = " ", group: int = 4) -> str:
    return sep.join(value[i : i + group] for i in range(0, len(value), group))


@pytest.mark.parametrize(("number", "brand"), VALID_CARDS.items())
def test_published_test_cards_are_valid_with_their_brand(number, brand):
    assert luhn_valid(number)
    assert card_brand(number) == brand
    assert is_valid_card(number)
    assert is_valid_card(spaced(number)) and is_valid_card(spaced(number, "-"))


@pytest.mark.parametrize("number", VALID_CARDS)
def test_changing_the_last_digit_breaks_each_card(number):
    broken = number[:-1] + str((int(number[-1]) + 1) % 10)
    assert not luhn_valid(broken)
    assert not is_valid_card(broken)


def test_luhn_valid_number_without_a_known_brand_is_not_a_card():
    assert luhn_valid("9999999999999995")
    assert card_brand("9999999999999995") is None
    assert not is_valid_card("9999999999999995")


def test_brand_lengths_are_enforced():
    assert card_brand("4111111111111111111") == "visa"  # 19 digits
    assert card_brand("41111111111111") is None  # Visa never issues 14 digits


def test_a_twelve_digit_number_is_a_card_only_with_a_maestro_issuer_prefix():
    assert find_checksum_spans("paid with 6304 5653 8861 today")[0].end == len("paid with 6304 5653 8861")
    for number in ("411111111117", "500000000009", "123456789015"):  # Luhn-valid, other prefixes
        assert luhn_valid(number) and not is_valid_card(number) and not find_checksum_spans(f"id {number}")
    assert not find_checksum_spans("paid with 6304 5653 8862 today")  # a Maestro prefix, Luhn fails


def test_twelve_digits_inside_a_longer_number_are_not_a_card():
    assert luhn_valid("675900000000") and not luhn_valid("6759000000002024")
    assert not find_checksum_spans("order 6759 0000 0000 2024 shipped")
    assert not find_checksum_spans("ref 1 6759 0000 0000")  # a lone leading group makes the run longer


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_registry_example_ibans_are_valid_compact_spaced_and_lowercase(iban):
    assert is_valid_iban(iban)
    assert is_valid_iban(spaced(iban))
    assert is_valid_iban(iban.lower())


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_a_changed_check_digit_fails_mod_97(iban):
    broken = iban[:2] + f"{(int(iban[2:4]) + 1) % 100:02d}" + iban[4:]
    assert not is_valid_iban(broken)


def test_iban_of_the_wrong_length_for_its_country_fails():
    assert not is_valid_iban("GB82WEST1234569876543")  # one short
    assert not is_valid_iban("ZZ82WEST12345698765432")  # no such country


def test_finds_cards_and_ibans_with_exact_offsets():
    text = (
        "Pay with 4111 1111 1111 1111 or 5555-5555-5555-4444, compact 378282246310005; "
        "IBAN GB82 WEST 1234 5698 7654 32 and DE89370400440532013000."
    )
    spans = find_checksum_spans(text)
    found = [(s.label, text[s.start : s.end]) for s in spans]
    assert found == [
        (CREDIT_CARD, "4111 1111 1111 1111"),
        (CREDIT_CARD, "5555-5555-5555-4444"),
        (CREDIT_CARD, "378282246310005"),
        (IBAN_CODE, "GB82 WEST 1234 5698 7654 32"),
        (IBAN_CODE, "DE89370400440532013000"),
    ]
    assert all(s.score == 1.0 and s.source == "checksum" for s in spans)


def test_invalid_numbers_are_not_found():
    text = "order 4111 1111 1111 1112, ref A4111111111111112, GB82 WEST 1234 5698 7654 33"
    assert find_checksum_spans(text) == []


@pytest.mark.parametrize("glued", ["No4111111111111111", "x4111111111111111", "4111111111111111X",
                                   "4111111111111111exp", "MC4111111111111111", "No4111 1111 1111 1111", "cc_4111111111111111",
                                   "Ace4111 1111 1111 1111", "4111 1111 1111 1111a", "4111 1111 1111 1111Dec",
                                   "4111.1111.1111.1111", "4111,1111,1111,1111", "3782,822463,10005"])
def test_a_valid_card_glued_to_a_word_is_still_a_card(glued):
    text = f"Duplicate charge on {glued} yesterday."
    [span] = find_checksum_spans(text)
    assert "".join(c for c in text[span.start : span.end] if c.isdigit()) in ("4111111111111111", "378282246310005")


def test_card_is_found_after_an_unrelated_leading_number_group():
    text = "qty 12 4111 1111 1111 1111 thanks"
    [span] = find_checksum_spans(text)
    assert text[span.start : span.end] == "4111 1111 1111 1111"


def test_iban_stops_at_its_country_length_before_a_following_word():
    text = "to GB82 WEST 1234 5698 7654 32 TODAY"
    [span] = find_checksum_spans(text)
    assert text[span.start : span.end] == "GB82 WEST 1234 5698 7654 32"


def test_iban_is_found_after_a_lookalike_word():
    text = "AB12 GB82WEST12345698765432"
    [span] = find_checksum_spans(text)
    assert text[span.start : span.end] == "GB82WEST12345698765432"


def test_reconcile_confirms_a_valid_model_span_and_keeps_a_failing_one():
    text = "cards 4111 1111 1111 1111 and 4111 1111 1111 1112"
    good = Span(CREDIT_CARD, 6, 25, 0.6)
    bad = Span(CREDIT_CARD, 30, 49, 0.7)
    out = reconcile(text, [good, bad])
    assert out == [Span(CREDIT_CARD, 6, 25, 1.0, "model"), bad]


def test_reconcile_adds_a_number_the_model_missed():
    text = "John paid with 5105 1051 0510 5100"
    person = Span("PERSON", 0, 4, 0.9)
    out = reconcile(text, [person])
    assert out == [person, Span(CREDIT_CARD, 15, 34, 1.0, "checksum")]


def test_reconcile_merges_a_partial_model_span_with_the_whole_number():
    text = "card 4111 1111 1111 1111 ok"
    partial = Span(CREDIT_CARD, 5, 14, 0.55)
    [span] = reconcile(text, [partial])
    assert (span.start, span.end, span.score) == (5, 24, 1.0)


def test_reconcile_keeps_overlapping_spans_of_different_labels_for_masking_to_resolve():
    text = "call 4111 1111 1111 1111"
    phone = Span("PHONE_NUMBER", 5, 24, 0.8)
    out = reconcile(text, [phone])
    assert sorted(s.label for s in out) == [CREDIT_CARD, "PHONE_NUMBER"]


def test_merge_overlapping_keeps_touching_spans_apart():
    a, b = Span("PERSON", 0, 4, 0.9), Span("PERSON", 4, 9, 0.8)
    assert merge_overlapping([b, a]) == [a, b]


# --- the scan is linear: the degraded path runs it on whole multi-megabyte bodies --------------------------

def _reference_spans(text: str, apart: bool = False) -> list[tuple[str, int, int]]:
    """The recognizers written the plain way (a Python loop per digit group and per IBAN start), kept to
    check the vectorised scan against: same numbers, same offsets. `apart`: cards are read with one mark of
    punctuation between two digits as a space."""
    import re

    out = []
    from sidecar.checksums import _apart, _in_uuid, _word, glued_number

    cards = _apart(text) if apart else text
    for run in re.finditer(r"(?<![0-9])[0-9]+(?:[ -][0-9]+)*(?![0-9])", cards):
        groups = [(m.start() + run.start(), m.end() + run.start()) for m in re.finditer(r"[0-9]+", run.group())]
        grouped = len(groups) > 1
        if grouped and "-" in run.group() and _in_uuid(cards, run.start(), run.end()):
            continue
        if run.start() and cards[run.start() - 1].isalnum() and not glued_number(_word(cards, run.start()), grouped):
            groups = groups[1:]  # the first group is part of an id before it
        if run.end() < len(cards) and cards[run.end()].isalnum() and not glued_number(_word(cards, run.end() - 1), grouped):
            groups = groups[:-1]
        i = 0
        while i < len(groups):
            digits = 0
            found = None
            for j in range(i, len(groups)):
                digits += groups[j][1] - groups[j][0]
                whole = i == 0 and j == len(groups) - 1
                if (13 <= digits <= 19 or digits == 12 and whole) and is_valid_card(cards[groups[i][0]:groups[j][1]]):
                    found = j  # the longest stretch wins
            if found is not None:
                out.append((CREDIT_CARD, groups[i][0], groups[found][1]))
                i = found
            i += 1
    for m in re.finditer(r"(?<![^\W_])[A-Za-z]{2}[0-9]{2}", text):
        from sidecar.checksums import IBAN_LENGTHS

        length = IBAN_LENGTHS.get(text[m.start():m.start() + 2].upper())
        pos, count = m.start(), 0
        while length and pos < len(text) and count < length:
            ch = text[pos]
            if ch.isascii() and ch.isalnum():
                count, pos = count + 1, pos + 1
            elif ch == " " and count and pos + 1 < len(text) and text[pos + 1].isascii() and text[pos + 1].isalnum():
                pos += 1
            else:
                break
        end_ok = not (pos < len(text) and text[pos].isalnum())
        if length and count == length and end_ok and is_valid_iban(text[m.start():pos]):
            out.append((IBAN_CODE, m.start(), pos))
    return sorted(out, key=lambda s: (s[1], s[2]))


def test_texts_scanned_together_get_the_spans_each_gets_alone():
    texts = ["4111 1111", "1111 1111 ok", "GB82 WEST 1234 5698 7654 32", "", "x", "card 4111-1111-1111-1111",
             "DE89370400440532013000", "4111111111111111x", "é4111111111111111"]
    assert find_checksum_spans_each(texts) == [find_checksum_spans(t) for t in texts]
    assert [len(s) for s in find_checksum_spans_each(texts)] == [0, 0, 1, 0, 0, 1, 1, 1, 1]  # glued: still cards
    assert find_checksum_spans_each([]) == [] and find_checksum_spans_each(["4111111111111111"])[0][0].end == 16


def test_the_scan_finds_what_the_plain_reading_finds_in_random_text():
    import random

    rng = random.Random(13)
    numbers = [*VALID_CARDS, "4111111111111111111", *VALID_IBANS, VALID_IBANS[0].lower()]
    junk = ["a", "X", "é", "٣", "_", "K", "GB", "DE89", "AB12", " ", "  ", "-", ".", "\n", "x1", "12", "4", "0000"]
    for _ in range(3000):
        pieces = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.4:
                value = rng.choice(numbers)
                if rng.random() < 0.5:
                    value = spaced(value, rng.choice(" -"), rng.choice([1, 2, 3, 4, 5]))
            elif r < 0.7:
                value = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))
            else:
                value = rng.choice(junk)
            pieces.append(value + rng.choice(["", " ", " ", "-", "x", "  "]))
        text = "".join(pieces)
        assert [(s.label, s.start, s.end) for s in find_checksum_spans(text)] == _reference_spans(fold(text), apart=True), text


@pytest.mark.parametrize("unit", ["1 ", "4 ", "4-", "12 ", "4111111111112 ", "DE89 ", "GB82WEST12345698765433 ",
                                  "Pay 4111 1111 1111 1111 to GB82 WEST 1234 5698 7654 32. "])
def test_a_two_megabyte_text_is_scanned_in_well_under_a_second_per_megabyte(unit):
    """Digit- and IBAN-dense text used to cost a Python loop per group (about 15 s per MB for "1 1 1 ...");
    the bound is generous for a busy CI machine, not a benchmark."""
    import time

    text = unit * (2_000_000 // len(unit))
    started = time.perf_counter()
    spans = find_checksum_spans(text)
    assert time.perf_counter() - started < 4.0
    if unit.startswith("Pay"):
        assert len(spans) == 2 * (2_000_000 // len(unit))


@pytest.mark.parametrize("text", ["https://www.google.com/maps/@47.3625296,7.3354620,15z", "near 6.5693176,93.7203126",
                                  "$36,218,604,712,139", "332,652,660,483,263,575,838,637", "2.718281828459045",
                                  "150.43.180.129:57942", "6.727,5.652,4.431,9.915", "5839+1131+6676+3992", "req_97c38876421419943872f09e",
                                  "38921470418701d41fab461a", "00-75010a09252c427b9dc589e906ac7a1f-66462903209479f2-01",
                                  "40936093-7735-2800-1334-16d45f1e820d", "58288258-8661-0913-a65e-0abfeac6907d"])
def test_coordinates_grouped_numbers_decimals_and_hex_ids_are_not_cards(text):
    assert find_checksum_spans(text) == []


def test_a_card_with_dollar_signs_between_its_groups_is_a_card():
    text = "pay 4111$1111$1111$1111 now"
    [span] = find_checksum_spans(text)
    assert text[span.start : span.end] == "4111$1111$1111$1111"
