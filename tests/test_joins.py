"""One entity, one span: the model's pieces of a name, a phone number or an address joined (sidecar.inference.joins)."""

import pytest

from sidecar.config import CONTEXT_ENTITIES, PiiPolicyConfig
from sidecar.inference.joins import join_entity_parts
from sidecar.policy import kept_spans
from sidecar.results import Span


def joined(text: str, parts: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """join_entity_parts over spans given as (label, substring, score), in text order."""
    spans, at = [], 0
    for label, value, score in parts:
        start = text.index(value, at)
        spans.append(Span(label, start, start + len(value), score))
        at = start
    spans.sort(key=lambda s: (s.start, s.end, s.label))
    out = join_entity_parts(text, spans)
    for span in spans:  # joining only adds: each piece is still there, under a span of its own label
        assert any(o.label == span.label and o.contains(span) for o in out), (span, out)
    return [(s.label, text[s.start : s.end], s.score) for s in out if not any(_under(s, o) for o in out)]


def _under(span: Span, other: Span) -> bool:
    """A piece kept under the entity it was joined to (what the tests look past)."""
    return other.label != span.label and other.contains(span) and (
        len(other) > len(span) or (span.label in CONTEXT_ENTITIES and other.label not in CONTEXT_ENTITIES))


def masked_under_default_policy(text: str, parts: list[tuple[str, str, float]]) -> list[str]:
    spans = [Span(label, text.index(value), text.index(value) + len(value), score) for label, value, score in parts]
    out = join_entity_parts(text, sorted(spans, key=lambda s: (s.start, s.end)))
    return [text[s.start : s.end] for s in kept_spans(out, PiiPolicyConfig())]


# --- addresses ------------------------------------------------------------------------------------------


def test_towns_country_and_house_number_beside_an_address_make_one_address_with_the_best_score():
    text = "Ship to 38 73 Rue Ibn Al Khatib, St Catharines,\nGreece today."
    parts = [("ADDRESS", "38", 0.7), ("PHONE_NUMBER", "73", 0.6), ("ADDRESS", "Rue Ibn Al Khatib", 0.9),
             ("LOCATION", "St Catharines", 0.5), ("LOCATION", "Greece", 0.4)]
    assert joined(text, parts) == [("ADDRESS", "38 73 Rue Ibn Al Khatib, St Catharines,\nGreece", 0.9)]


def test_a_place_before_an_address_joins_it_too():
    text = "Reykjavík; Laugarvegur 77"
    assert joined(text, [("LOCATION", "Reykjavík", 0.7), ("ADDRESS", "Laugarvegur 77", 0.8)]) == [
        ("ADDRESS", "Reykjavík; Laugarvegur 77", 0.8)]


def test_places_numbers_and_phones_apart_from_an_address_keep_their_type():
    text = "I moved from Paris to 12 Gralla 30 last year, then to Lyon."
    parts = [("LOCATION", "Paris", 0.9), ("ADDRESS", "12 Gralla 30", 0.9), ("LOCATION", "Lyon", 0.9)]
    assert joined(text, parts) == parts  # words stand between each place and the address
    assert joined("Paris, Lyon", [("LOCATION", "Paris", 0.9), ("LOCATION", "Lyon", 0.9)]) == [
        ("LOCATION", "Paris", 0.9), ("LOCATION", "Lyon", 0.9)]
    phone = [("ADDRESS", "12 Gralla 30", 0.9), ("PHONE_NUMBER", "555 0142 77", 0.9)]
    assert joined("12 Gralla 30, 555 0142 77", phone) == phone  # seven digits can be a phone: it stays one


def test_the_joined_town_is_masked_under_the_default_policy_that_lets_places_through():
    assert masked_under_default_policy("12 Gralla 30, HELSINKI", [("ADDRESS", "12 Gralla 30", 0.9),
                                                                  ("LOCATION", "HELSINKI", 0.45)]) == [
        "12 Gralla 30, HELSINKI"]


def test_a_house_number_read_as_two_types_does_not_cut_the_town_off_the_street():
    # the tokens of "6896" were tagged ADDRESS and PHONE_NUMBER, each widened to the whole word
    text = "The office is at 37 Parva Domus 6896, Pesconuovo, Latvia"
    parts = [("ADDRESS", "37 Parva Domus 6896", 0.9), ("PHONE_NUMBER", "6896", 0.6),
             ("LOCATION", "Pesconuovo", 1.0), ("LOCATION", "Latvia", 1.0)]
    assert joined(text, parts) == [("ADDRESS", "37 Parva Domus 6896, Pesconuovo, Latvia", 1.0)]


def test_a_house_number_read_as_a_date_joins_the_street_after_it():
    text = "Livraison au 25, chemin Bernard, 68760 Brunet."
    assert joined(text, [("DATE_TIME", "25", 0.8), ("ADDRESS", ", chemin Bernard, 68760 Brunet", 0.9)]) == [
        ("ADDRESS", "25, chemin Bernard, 68760 Brunet", 0.9)]


def test_region_codes_and_postcodes_after_an_address_are_part_of_it():
    cases = {
        "Change my address to 2326 Parkdale Avenue Apt. 676 Hamilton ON for post mail?":
            ("2326 Parkdale Avenue Apt. 676 Hamilton", "2326 Parkdale Avenue Apt. 676 Hamilton ON"),
        "It ships to 32608 Luke Neck Suite 686, Port Ashley, HI 37643 on Monday":
            ("32608 Luke Neck Suite 686, Port Ashley", "32608 Luke Neck Suite 686, Port Ashley, HI 37643"),
        "Flat 47U, Callum Springs, Coleburgh, N2 2EX and no more":
            ("Flat 47U, Callum Springs, Coleburgh, N2", "Flat 47U, Callum Springs, Coleburgh, N2 2EX"),
        "Strada Comisso, 37 07012, Bonorva (SS) on 13 Nov":
            ("Strada Comisso, 37 07012, Bonorva (", "Strada Comisso, 37 07012, Bonorva (SS)"),
    }
    for text, (found, whole) in cases.items():
        assert joined(text, [("ADDRESS", found, 0.9)]) == [("ADDRESS", whole, 0.9)], text


def test_a_region_code_between_two_pieces_of_an_address_joins_them():
    text = "The office is at 66 137 Sim Street\nSušice 1\n, PL\n Algeria 48354"
    assert joined(text, [("ADDRESS", "66 137 Sim Street\nSušice 1", 0.9), ("ADDRESS", "Algeria 48354", 0.8)]) == [
        ("ADDRESS", "66 137 Sim Street\nSušice 1\n, PL\n Algeria 48354", 0.9)]


def test_what_follows_an_address_is_not_taken_when_it_is_a_word_or_a_longer_number():
    text = "I live at 12 Main Street and Oak is nice, 1234 5678 9012 3456 is my card"
    assert joined(text, [("ADDRESS", "12 Main Street", 0.9)]) == [("ADDRESS", "12 Main Street", 0.9)]
    text = "12 Main Street 1234 5678"  # a postcode is not followed by another group of digits
    assert joined(text, [("ADDRESS", "12 Main Street", 0.9)]) == [("ADDRESS", "12 Main Street", 0.9)]
    text = "12 Main Street, Oklahoma"  # a capitalised word is not a region code
    assert joined(text, [("ADDRESS", "12 Main Street", 0.9)]) == [("ADDRESS", "12 Main Street", 0.9)]


# --- names ----------------------------------------------------------------------------------------------


def test_a_name_written_surname_first_or_with_an_initial_is_one_name():
    assert joined("Weiss, Gilles here.", [("PERSON", "Weiss", 1.0), ("PERSON", "Gilles", 0.9)]) == [
        ("PERSON", "Weiss, Gilles", 1.0)]
    assert joined("Who is Rhonda M. Nguyen?", [("PERSON", "Rhonda M", 0.9), ("PERSON", "Nguyen", 0.7)]) == [
        ("PERSON", "Rhonda M. Nguyen", 0.9)]


def test_the_other_half_of_a_hyphenated_name_is_part_of_the_name():
    assert joined("- CLAIRE SHAW-BOLTON (KING INC)", [("PERSON", "CLAIRE SHAW", 1.0),
                                                      ("ORGANIZATION", "BOLTON", 0.9)]) == [
        ("PERSON", "CLAIRE SHAW-BOLTON", 1.0)]
    assert joined("- Amber Barrett-Harrison (Hewitt)", [("PERSON", "Amber Barrett-", 1.0)]) == [
        ("PERSON", "Amber Barrett-Harrison", 1.0)]
    assert joined("ask Jean-Luc Picard", [("PERSON", "Luc Picard", 0.9)]) == [("PERSON", "Jean-Luc Picard", 0.9)]


def test_a_first_name_misread_as_a_place_beside_a_surname_is_masked_with_it():
    text = "the assistant to Stephanie Dolgorukova, and"
    parts = [("LOCATION", "Stephanie", 0.6), ("PERSON", "Dolgorukova", 0.9)]
    assert joined(text, parts) == [("PERSON", "Stephanie Dolgorukova", 0.9)]
    assert masked_under_default_policy(text, parts) == ["Stephanie Dolgorukova"]


def test_a_first_name_misread_as_a_place_before_a_middle_initial_and_a_surname_is_a_name():
    text = "Please forward this to Rhonda M. Nguyen before Friday."
    parts = [("LOCATION", "Rhonda", 0.7), ("ORGANIZATION", "Nguyen", 0.55)]
    assert joined(text, parts) == [("PERSON", "Rhonda M. Nguyen", 0.7)]
    assert masked_under_default_policy(text, parts) == ["Rhonda M. Nguyen"]
    # a place followed by an initial and a word in lower case stays a place
    assert joined("in Paris B. then", [("LOCATION", "Paris", 0.9)]) == [("LOCATION", "Paris", 0.9)]


def test_places_and_firms_apart_from_a_name_keep_their_type():
    text = "Paris, Anna Weiss and New York Times"
    parts = [("LOCATION", "Paris", 0.9), ("PERSON", "Anna Weiss", 0.9), ("ORGANIZATION", "New York Times", 0.9)]
    assert joined(text, parts) == parts  # a comma, or words, stand between
    text = "Anna Weiss New York Times"  # a firm of several words is not a surname
    parts = [("PERSON", "Anna Weiss", 0.9), ("ORGANIZATION", "New York Times", 0.9)]
    assert joined(text, parts) == parts


def test_initials_degrees_and_a_tagged_title_are_masked_with_the_name():
    cases = {
        "hello, this is mr. chad. who": ("mr", "mr."),
        "We met Johann Hamann B.A. in Schleiz.": ("Johann Hamann B.A", "Johann Hamann B.A."),
        "dr. hardy geisel b.a.,lucia": ("dr. hardy geisel b.", "dr. hardy geisel b.a."),
        "Producer Amanda Sultygov MD explained": ("Amanda Sultygov", "Amanda Sultygov MD"),
        "forward this to Rhonda M. Nguyen before Friday": ("Rhonda", "Rhonda M. Nguyen"),
        "ask John F. X. O'Brien-Smith now": ("John", "John F. X. O'Brien-Smith"),
        "ask Élodie B. Durand-Lévy now": ("Élodie", "Élodie B. Durand-Lévy"),
    }
    for text, (found, whole) in cases.items():
        assert joined(text, [("PERSON", found, 0.9)]) == [("PERSON", whole, 0.9)], text
    # an initial not followed by a capitalised word is not a middle name
    assert joined("said Anna B. then left", [("PERSON", "Anna", 0.9)]) == [("PERSON", "Anna", 0.9)]
    # a title the model left out says how to address someone, not who: it stays
    assert joined("this is Mr. Jason Hoover.", [("PERSON", "Jason Hoover", 0.9)]) == [("PERSON", "Jason Hoover", 0.9)]
    # the full stop that ends a sentence after a surname stays
    assert joined("That was Nguyen.", [("PERSON", "Nguyen", 0.9)]) == [("PERSON", "Nguyen", 0.9)]
    # a short word inside a longer one is not an initial
    assert joined("said Kimjo. Then", [("PERSON", "Kimjo", 0.9)]) == [("PERSON", "Kimjo", 0.9)]


# --- phone numbers and the shape of the result ----------------------------------------------------------


def test_a_leading_digit_group_read_as_a_date_is_part_of_the_phone_number():
    text = "Call 6 66 32 17 05."
    assert joined(text, [("DATE_TIME", "6", 0.8), ("PHONE_NUMBER", "66 32 17 05", 0.9)]) == [
        ("PHONE_NUMBER", "6 66 32 17 05", 0.9)]
    text = "On 2024 call 66 32 17 05"  # words between: the date stays a date
    parts = [("DATE_TIME", "2024", 0.8), ("PHONE_NUMBER", "66 32 17 05", 0.9)]
    assert joined(text, parts) == parts


def test_a_word_tagged_with_two_types_keeps_the_more_confident():
    text = "to Stephanie Trevisani, and"
    parts = [("LOCATION", "Stephanie", 0.6), ("ADDRESS", "Trevisani", 0.5), ("PERSON", "Trevisani", 0.9)]
    assert joined(text, parts) == [("PERSON", "Stephanie Trevisani", 0.9)]


def test_a_word_tagged_as_a_name_and_a_place_stays_a_name_however_confident_the_place():
    text = "ask Trevisani now"
    parts = [("LOCATION", "Trevisani", 0.9), ("PERSON", "Trevisani", 0.6)]
    assert joined(text, parts) == [("PERSON", "Trevisani", 0.9)]  # the higher score: a policy masking places masks it
    assert masked_under_default_policy(text, parts) == ["Trevisani"]


def test_widening_is_bounded_however_long_the_hyphenated_run():
    text = "Anna" + "-x" * 10_000
    assert joined(text, [("PERSON", "Anna", 0.9)]) == [("PERSON", "Anna-x-x", 0.9)]
    text = "x-" * 10_000 + "Anna"
    (label, value, _), = joined(text, [("PERSON", "Anna", 0.9)])
    assert value == "x-" * 2 + "Anna"
    # digits are not part of a name: "Smith-2024-report" keeps its year and report
    assert joined("Smith-2024-report", [("PERSON", "Smith", 0.9)]) == [("PERSON", "Smith", 0.9)]


def test_no_spans_and_lone_spans_come_back_as_they_were():
    assert join_entity_parts("nothing", []) == []
    assert joined("a call to 555 0142", [("PHONE_NUMBER", "555 0142", 0.9)]) == [("PHONE_NUMBER", "555 0142", 0.9)]


def test_initials_after_a_name_are_bounded_however_long_the_run():
    text = "Ann B." + "c." * 10_000
    assert joined(text, [("PERSON", "Ann B.", 0.9)]) == [("PERSON", "Ann B.c.c.c.", 0.9)]
    assert joined("Dr Ann B.Yes.No.", [("PERSON", "Dr Ann B.", 0.9)]) == [("PERSON", "Dr Ann B.", 0.9)]


def test_joining_never_leaves_readable_or_unrefused_what_the_pieces_were():
    """Joins only widen, relabel a let-through type as an identifying one at the higher score, or merge, and
    every piece stays under a span of its own type: under a policy that masks every identifying type (the
    default, or one that masks places too, at any threshold) every character masked before is masked after,
    and a type a policy refuses is still there. Random texts of words and of odd characters (combining marks,
    other scripts, zero-width and lone surrogate code points), random spans."""
    import random

    rng = random.Random(7)
    words = ["Anna", "M.", "Weiss,", "12", "Main", "St", "ON", "37643", "-", "Paris", "6", "66 32", "Dr", "(SS)",
             "b.a.", "and", "Jean-Luc", "\n", ",", "N2", "2EX", "MD", "x-", "-y", ".", "1234-5678"]
    chars = [*"aAbZ09 -.,;/\n\t()_", "\u0301", "\u4e2d", "\u05d0", "\u200b", "\ud800", "\u0663", "\u00b2", "\u00df"]
    labels = ["PERSON", "ADDRESS", "PHONE_NUMBER", "LOCATION", "ORGANIZATION", "DATE_TIME", "NRP", "US_SSN"]
    policies = [PiiPolicyConfig(), PiiPolicyConfig(allow_entities=[]), PiiPolicyConfig(score_threshold=0.7),
                PiiPolicyConfig(allow_entities=[], score_threshold=0.7)]
    for n in range(4000):
        if n % 2:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 30)))
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        spans = []
        for _ in range(rng.randint(1, 6)):
            start = rng.randrange(len(text))
            spans.append(Span(rng.choice(labels), start, min(len(text), start + rng.randint(1, 12)),
                              rng.choice([0.4, 0.6, 0.9])))
        spans.sort(key=lambda s: (s.start, s.end, s.label))
        out = join_entity_parts(text, spans)
        assert all(0 <= s.start < s.end <= len(text) for s in out)
        for span in spans:
            assert any(o.label == span.label and o.contains(span) for o in out), (text, spans, span)
        for policy in policies:
            before = {i for s in kept_spans(spans, policy) for i in range(s.start, s.end)}
            after = {i for s in kept_spans(out, policy) for i in range(s.start, s.end)}
            assert before <= after, (text, spans, policy)


def test_a_piece_joins_only_a_few_spans_away_from_the_entity_so_a_run_is_not_swallowed():
    text = "Thanks Maria Lisbon Porto Madrid Seville"
    parts = [("PERSON", "Maria", 0.9), ("LOCATION", "Lisbon", 0.9), ("LOCATION", "Porto", 0.9),
             ("LOCATION", "Madrid", 0.9), ("LOCATION", "Seville", 0.9)]
    assert joined(text, parts)[:2] == [("PERSON", "Maria Lisbon", 0.9), ("LOCATION", "Porto", 0.9)]
    text = "Ship to 1 Main St, Boston / Chicago / Denver / Austin / Dallas"
    parts = [("ADDRESS", "1 Main St", 0.9)] + [("LOCATION", c, 0.9) for c in ("Boston", "Chicago", "Denver",
                                                                             "Austin", "Dallas")]
    assert joined(text, parts) == [("ADDRESS", "1 Main St, Boston / Chicago / Denver", 0.9),
                                   ("LOCATION", "Austin", 0.9), ("LOCATION", "Dallas", 0.9)]
    text = "call 555 0142 2019 2020 2021"
    parts = [("PHONE_NUMBER", "555 0142", 0.9), ("DATE_TIME", "2019", 0.9), ("DATE_TIME", "2020", 0.9),
             ("DATE_TIME", "2021", 0.9)]
    assert joined(text, parts) == [("PHONE_NUMBER", "555 0142 2019", 0.9), ("DATE_TIME", "2020", 0.9),
                                   ("DATE_TIME", "2021", 0.9)]


def test_an_identifying_piece_keeps_its_own_type_beside_the_entity_so_a_refusing_policy_still_refuses():
    from sidecar.policy import Action, pii_verdict

    refuse = PiiPolicyConfig(block_entities=["US_SSN"])
    text = "ssn 123-45-6789"
    spans = [Span("US_SSN", 4, 10, 0.7), Span("PHONE_NUMBER", 11, 15, 0.8)]
    out = join_entity_parts(text, spans)
    assert Span("US_SSN", 4, 10, 0.7) in out
    assert pii_verdict(out, refuse).action == Action.BLOCK
    same = [Span("PHONE_NUMBER", 6, 17, 0.9), Span("US_SSN", 6, 17, 0.6)]  # one word, two types
    assert pii_verdict(join_entity_parts("my id 123-45-6789 ok", same), refuse).action == Action.BLOCK


def test_region_codes_need_a_comma_to_follow_an_address_onto_the_next_line():
    text = "Ship to 12 Main St\nTHE END"
    assert joined(text, [("ADDRESS", "12 Main St", 0.9)]) == [("ADDRESS", "12 Main St", 0.9)]
    text = "Sim Street 1\n, PL\n more"
    assert joined(text, [("ADDRESS", "Sim Street 1", 0.9)]) == [("ADDRESS", "Sim Street 1\n, PL", 0.9)]


def test_a_hyphen_before_digits_or_at_the_text_edges_widens_nothing():
    assert joined("Anna- 2024", [("PERSON", "Anna-", 0.9)]) == [("PERSON", "Anna-", 0.9)]
    assert joined("Anna-2024", [("PERSON", "Anna", 0.9)]) == [("PERSON", "Anna", 0.9)]
    assert joined("Anna-", [("PERSON", "Anna-", 0.9)]) == [("PERSON", "Anna-", 0.9)]
    assert joined("-Anna", [("PERSON", "Anna", 0.9)]) == [("PERSON", "Anna", 0.9)]


@pytest.mark.parametrize("sep", [",", ", ", ";", "|", " | ", "*", "#", "'", "·", "_", "~", ",\n"])
def test_the_groups_of_a_card_tagged_one_by_one_are_one_card_whatever_separates_them(sep):
    from sidecar.operators import Mask

    groups = ["4111", "1111", "1111", "1111"]
    text = f"My card is {sep.join(groups)} thanks"
    spans, at = [], text.index("4111")
    for _group in groups:
        spans.append(Span("CREDIT_CARD", at, at + 4, 0.9))
        at += 4 + len(sep)
    out = [s for s in join_entity_parts(text, spans) if (s.start, s.end) not in {(p.start, p.end) for p in spans}]
    assert [(s.label, text[s.start : s.end]) for s in out] == [("CREDIT_CARD", sep.join(groups))]
    masked = Mask(chars_to_keep=4).apply(text[out[0].start : out[0].end], "CREDIT_CARD")
    assert sum(c.isdigit() for c in masked) == 4


def test_two_numbers_with_words_between_stay_two():
    text = "card 4111 and then 1111"
    parts = [("CREDIT_CARD", "4111", 0.9), ("CREDIT_CARD", "1111", 0.9)]
    assert joined(text, parts) == parts


def test_a_card_and_the_ssn_after_it_stay_two_numbers():
    text = "pay with 4111 1111 1111 1111 078-05-1120 today"
    card, ssn = text.index("4111"), text.index("078")
    spans = [Span("CREDIT_CARD", card, card + 19, 0.9), Span("CREDIT_CARD", ssn, ssn + 11, 0.8)]
    assert [(s.start, s.end) for s in join_entity_parts(text, spans)] == [(card, card + 19), (ssn, ssn + 11)]
