from __future__ import annotations

import random

import pytest

from sidecar.checksums import CREDIT_CARD, IBAN_CODE, find_checksum_spans
from sidecar.recognizers import (
    CHECKSUM_NAMES,
    CREDENTIAL,
    EMAIL_ADDRESS,
    IP_ADDRESS,
    PATTERN_NAMES,
    PHONE_NUMBER,
    RECOGNIZERS,
    US_SSN,
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpAddressRecognizer,
    PhoneRecognizer,
    Recognizer,
    UrlCredentialsRecognizer,
    UsSsnRecognizer,
    default_recognizers,
    find_all,
    find_each,
)

# Published test numbers (card networks, SWIFT registry examples).
CARDS = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "3530111333300000",
         "30569309025904", "6200000000000005", "4222222222222", "4111111111111111111"]
IBANS = ["GB82WEST12345698765432", "DE89370400440532013000", "NL91ABNA0417164300", "NO9386011117947"]


def found(recognizer: Recognizer, text: str) -> list[str]:
    return [text[s.start : s.end] for s in recognizer.find(text)]


def spaced(value: str, sep: str = " ", group: int = 4) -> str:
    return sep.join(value[i : i + group] for i in range(0, len(value), group))


# --- email -------------------------------------------------------------------------------------------------


def test_email_addresses_are_found_with_exact_offsets_and_full_score():
    text = "Write to john.doe+news@mail.example.co.uk, or (ünïcode@exämple.de); mailto:ops@corp.io."
    spans = EmailRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == ["john.doe+news@mail.example.co.uk", "ünïcode@exämple.de",
                                                      "ops@corp.io"]
    assert all(s.label == EMAIL_ADDRESS and s.score == 1.0 and s.source == "pattern" for s in spans)


@pytest.mark.parametrize("text", ["a@b", "root@localhost", "x@y.z", "me@example.c0m", "@example.com",
                                  "a@.com", "a@b..com", "a@-b.com", "twitter @handle.", "foo@bar.123"])
def test_an_at_sign_without_a_dotted_domain_and_letter_tld_is_not_an_email(text):
    assert found(EmailRecognizer(), text) == []


def test_a_sentence_end_or_leading_dots_are_not_part_of_an_email():
    assert found(EmailRecognizer(), "see ...john@example.com.") == ["john@example.com"]
    assert found(EmailRecognizer(), "ask bob@example.org-") == ["bob@example.org"]


def test_the_password_and_host_of_a_url_are_not_reported_as_an_email():
    text = "postgres://admin:s3cret@db.example.com:5432/x and ftp://anon@ftp.example.com/pub"
    assert found(EmailRecognizer(), text) == []


# --- phone numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [
    "(555) 123-4567", "(555)123-4567", "555-123-4567", "555.123.4567", "555 123 4567", "+1 555 123 4567",
    "+1-555-123-4567", "1-800-555-0199", "1 (800) 555-0199", "+1 (555) 123-4567", "+14155552671",
    "+44 20 7946 0958", "+49 30 1234567", "+33 1 23 45 67 89", "+44 (0)20 7946 0958",
])
def test_a_phone_number_in_a_usual_shape_is_found_whole(number):
    text = f"Call me at {number}, thanks."
    spans = PhoneRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == [number]
    assert spans[0].label == PHONE_NUMBER and spans[0].score >= 0.6


@pytest.mark.parametrize("text", [
    "5551234567", "order 14155552671", "A555-123-4567", "555-123-4567B", "12-555-123-4567", "555-123-4567-89",
    "555.123.4567.1", "x555 123 4567",
])
def test_a_phone_number_glued_to_a_word_or_a_longer_number_is_not_reported(text):
    assert found(PhoneRecognizer(), text) == []


def test_a_phone_number_in_a_date_is_not_reported():
    assert found(PhoneRecognizer(), "on 2024-01-02 and 2024.01.02 and 02/01/2024 at 12:30") == []


def test_version_numbers_and_arithmetic_are_not_phone_numbers():
    text = "v1.2.3 or 1.2.3, a 3-4-5 triangle, x = 555 - 123 - 4567, 555-123 4567 and 555.123-4567, 100-200-3000"
    assert found(PhoneRecognizer(), text) == []


def test_a_plus_number_outside_eight_to_fifteen_digits_or_after_a_word_is_not_a_phone():
    assert found(PhoneRecognizer(), "+1 234 567 and +12 3456 7890 1234 5678 9, a+14155552671") == []


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize(("sep", "group"), [("", 4), (" ", 4), ("-", 4), (" ", 5), (".", 4)])
def test_card_numbers_are_not_reported_as_phone_numbers(card, sep, group):
    text = f"card {spaced(card, sep, group) if sep else card} exp 12/29"
    assert found(PhoneRecognizer(), text) == []


def test_a_north_american_number_after_plus_one_is_one_span():
    assert found(PhoneRecognizer(), "+1 555 123 4567 or +1.555.123.4567") == ["+1 555 123 4567", "+1.555.123.4567"]


# --- US social security numbers ----------------------------------------------------------------------------


def test_ssns_with_dashes_or_spaces_are_found():
    text = "SSNs 123-45-6789 and 234 56 7890."
    spans = UsSsnRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == ["123-45-6789", "234 56 7890"]
    assert all(s.label == US_SSN and s.score >= 0.6 for s in spans)


@pytest.mark.parametrize("ssn", ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567",
                                 "123-45-0000", "123-45 6789", "123 45-6789", "123.45.6789"])
def test_an_ssn_with_an_invalid_part_or_mixed_separators_is_not_reported(ssn):
    assert found(UsSsnRecognizer(), f"SSN {ssn}") == []


@pytest.mark.parametrize("text", ["1123-45-6789", "123-45-67890", "A123-45-6789", "9-123-45-6789",
                                  "123-45-6789-1", "12 123 45 6789", "123 45 6789 12"])
def test_an_ssn_inside_a_longer_number_or_word_is_not_reported(text):
    assert found(UsSsnRecognizer(), text) == []


def test_nine_bare_digits_are_an_ssn_only_after_a_context_word_on_the_same_line():
    assert found(UsSsnRecognizer(), "SSN: 123456789") == ["123456789"]
    assert found(UsSsnRecognizer(), "my Social Security number is 123456789") == ["123456789"]
    assert found(UsSsnRecognizer(), "order 123456789") == []
    assert found(UsSsnRecognizer(), "SSN\n123456789") == []
    assert found(UsSsnRecognizer(), "SSN 1234567890 and SSN 666456789") == []


# --- IP addresses ------------------------------------------------------------------------------------------


def test_ipv4_and_ipv6_addresses_are_found_with_exact_offsets():
    text = ("hosts 10.0.0.1, 255.255.255.255 and 0.0.0.0; v6 2001:db8::1, fe80::1ff:fe23:4567:890a, "
            "[::1]:8080, 2001:0db8:85a3:0000:0000:8a2e:0370:7334 ip:2001:db8::2 at fe80::1: done")
    spans = IpAddressRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == [
        "10.0.0.1", "255.255.255.255", "0.0.0.0", "2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8::2", "fe80::1"]
    assert all(s.label == IP_ADDRESS and s.score >= 0.6 for s in spans)


@pytest.mark.parametrize("text", ["256.1.1.1", "1.2.3.999", "01.2.3.4", "1.2.3.4.5", "v1.2.3.4", "x1.2.3.4",
                                  "1.2.3.4x", "1.2.3", "release 2.0.1.3.7 now"])
def test_an_ipv4_lookalike_out_of_range_or_inside_a_longer_dotted_number_is_not_reported(text):
    assert found(IpAddressRecognizer(), text) == []


@pytest.mark.parametrize("text", ["12:30", "at 12:30:45 today", "::", "a :: b", "std::vector", "Face::add",
                                  "00:1a:2b:3c:4d:5e", "2001:db8::1g", "2001:db8:::1", "12345::1", "1:2:3:4:5:6:7:8:9"])
def test_times_mac_addresses_scope_operators_and_bad_ipv6_are_not_reported(text):
    assert found(IpAddressRecognizer(), text) == []


def test_an_ipv4_mapped_ipv6_address_is_one_span():
    assert found(IpAddressRecognizer(), "peer ::ffff:192.0.2.1.") == ["::ffff:192.0.2.1"]


# --- credentials in URLs -----------------------------------------------------------------------------------


def test_only_the_user_and_password_of_a_url_are_reported():
    text = "DSN postgres://admin:s3cret@db.example.com:5432/x and redis://:hunter2@cache:6379"
    spans = UrlCredentialsRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == ["admin:s3cret", ":hunter2"]
    assert all(s.label == CREDENTIAL and s.score == 1.0 for s in spans)


def test_a_password_holding_an_at_sign_runs_to_the_last_at_sign_before_the_host():
    assert found(UrlCredentialsRecognizer(), "mysql://root:p@ss@w0rd@localhost/db") == ["root:p@ss@w0rd"]


def test_a_token_like_userinfo_is_a_credential_but_a_plain_user_name_is_not():
    text = "https://ghp_16CharTokenAbc123@github.com/o/r https://alice@example.com https://bob:@example.com"
    spans = UrlCredentialsRecognizer().find(text)
    assert [text[s.start : s.end] for s in spans] == ["ghp_16CharTokenAbc123"]
    assert 0.6 <= spans[0].score < 1.0


def test_userinfo_needs_a_scheme_and_a_host():
    assert found(UrlCredentialsRecognizer(), "://user:pw@host a://user:pw@ /://u:p@h user:pw@host") == []


# --- checksum recognizers ----------------------------------------------------------------------------------


def test_checksum_recognizers_give_the_spans_find_checksum_spans_gives():
    text = ("Pay 4111 1111 1111 1111 or 5555-5555-5555-4444, 378282246310005; bad 4111 1111 1111 1112; "
            "IBAN GB82 WEST 1234 5698 7654 32 and DE89370400440532013000, not GB82WEST12345698765433.")
    cards, ibans = CreditCardRecognizer().find(text), IbanRecognizer().find(text)
    assert sorted(cards + ibans, key=lambda s: (s.start, s.end)) == find_checksum_spans(text)
    assert [s.label for s in cards] == [CREDIT_CARD] * 3 and [s.label for s in ibans] == [IBAN_CODE] * 2
    assert all(s.source == "checksum" for s in cards + ibans)


def test_checksum_recognizers_agree_with_find_checksum_spans_on_random_text():
    rng = random.Random(5)
    numbers = [*CARDS, *IBANS, IBANS[0].lower()]
    junk = ["a", "X", "é", "٣", "_", "GB", "DE89", " ", "-", ".", "\n", "12", "4"]
    for _ in range(500):
        pieces = [rng.choice(numbers) if rng.random() < 0.4 else rng.choice(junk) for _ in range(rng.randint(1, 8))]
        text = "".join(p if rng.random() < 0.5 else spaced(p, rng.choice(" -")) for p in pieces)
        both = CreditCardRecognizer().find(text) + IbanRecognizer().find(text)
        assert sorted(both, key=lambda s: (s.start, s.end)) == find_checksum_spans(text), text


# --- registry ----------------------------------------------------------------------------------------------


def test_the_registry_names_every_recognizer_once_as_pattern_or_checksum():
    assert set(PATTERN_NAMES) | set(CHECKSUM_NAMES) == set(RECOGNIZERS)
    assert not set(PATTERN_NAMES) & set(CHECKSUM_NAMES)
    for name, cls in RECOGNIZERS.items():
        recognizer = cls()
        assert isinstance(recognizer, Recognizer) and recognizer.name == name and recognizer.entities


def test_default_recognizers_builds_all_or_the_named_ones_in_order_and_rejects_unknown_names():
    assert [r.name for r in default_recognizers()] == list(RECOGNIZERS)
    assert [r.name for r in default_recognizers(["phone", "email"])] == ["phone", "email"]
    with pytest.raises(ValueError, match="passport"):
        default_recognizers(["email", "passport"])


def test_each_recognizer_reports_only_its_own_labels_and_source():
    text = (f"{SAMPLE} card 4111111111111111 iban DE89370400440532013000")
    for recognizer in default_recognizers():
        source = "checksum" if recognizer.name in CHECKSUM_NAMES else "pattern"
        spans = recognizer.find(text)
        assert spans and all(s.label in recognizer.entities and s.source == source for s in spans)


# --- scanning: find_all and find_each ----------------------------------------------------------------------

SAMPLE = ("Mail john@example.com, call (555) 123-4567, SSN 123-45-6789, host 10.0.0.1, "
          "dsn postgres://admin:s3cret@db.example.com/x")


def test_find_all_returns_every_label_sorted_by_start_then_end():
    spans = find_all(SAMPLE)
    assert [(s.label, SAMPLE[s.start : s.end]) for s in spans] == [
        (EMAIL_ADDRESS, "john@example.com"), (PHONE_NUMBER, "(555) 123-4567"), (US_SSN, "123-45-6789"),
        (IP_ADDRESS, "10.0.0.1"), (CREDENTIAL, "admin:s3cret")]
    assert find_all(SAMPLE, default_recognizers(["email"])) == spans[:1]
    assert find_all("", default_recognizers()) == []


def test_find_each_maps_spans_of_the_joined_scan_back_to_each_text():
    texts = ["call 555-123-4567", "", "john@example.com", "10.0.0.1", "SSN", "123456789", "x" * 5 + SAMPLE]
    each = find_each(texts)
    assert each == [find_all(t) for t in texts]
    assert [(s.start, s.end) for s in each[0]] == [(5, 17)] and [(s.start, s.end) for s in each[2]] == [(0, 16)]
    assert each[5] == []  # the context word is in the text before: a newline is a text's edge
    assert find_each([]) == [] and find_each(["a@b.co"])[0][0].end == 6


def test_no_entity_crosses_the_join_between_two_texts():
    texts = ["555-123", "4567", "john@", "example.com", "10.0.0", ".1", "fe80:", ":1", "https://u:", "p@host"]
    assert find_each(texts) == [[] for _ in texts]


def test_texts_scanned_together_get_the_spans_each_gets_alone_in_random_text():
    rng = random.Random(11)
    values = ["john@example.com", "(555) 123-4567", "+44 20 7946 0958", "123-45-6789", "SSN 123456789",
              "10.0.0.1", "fe80::1", "::ffff:1.2.3.4", "http://u:p@h.io", "4111111111111111", IBANS[1]]
    junk = ["a", "é", "\n", " ", "-", ".", ":", "@", "+", "(", "12", "1.2", "555", "::", "SSN", "x://", "\ud800"]
    for _ in range(300):
        texts = ["".join(rng.choice(values if rng.random() < 0.4 else junk) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(1, 6))]
        each = find_each(texts)
        assert each == [find_all(t) for t in texts], texts
        assert all("\n" not in t[s.start : s.end] for t, spans in zip(texts, each, strict=True) for s in spans)


def test_lone_surrogates_and_other_unicode_do_not_break_the_scan():
    text = "\ud800 john@example.com \udfff 555-123-4567 ٣٣٣-٤٥-٦٧٨٩ 🙂 10.0.0.1 \U0010ffff"
    spans = find_all(text)
    assert [text[s.start : s.end] for s in spans] == ["john@example.com", "555-123-4567", "٣٣٣-٤٥-٦٧٨٩", "10.0.0.1"]


# --- linear time: the sidecar scans attacker-controlled bodies of several MiB ------------------------------

HOSTILE = {
    "at-signs": "a@" * 500_000,
    "dash-digits": "1-" * 500_000,
    "dot-digits": "1." * 500_000,
    "space-digits": "1 " * 500_000,
    "colons": ":" * 10**6,
    "hex-colons": "a:" * 500_000,
    "zero-colons": "0:" * 500_000,
    "long-url": "http://" + "a" * 10**6,
    "url-at-signs": "http://a:" + "b@" * 500_000,
    "schemes": "://" * 333_333,
    "plus-ones": "+1 " * 333_333,
    "parens": "(" * 10**6,
    "long-local-part": "a." * 500_000 + "@x.com",
    "digits": "1" * 10**6,
    "dotted-quads": "1.1.1.1." * 125_000,
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", HOSTILE)
def test_a_megabyte_of_hostile_text_is_scanned_in_linear_time(name):
    """A regex that backtracks would take minutes on these (each is ~1 MiB), past the 20 s timeout."""
    spans = find_all(HOSTILE[name])
    assert len(spans) <= 1


@pytest.mark.timeout(20)
def test_a_megabyte_of_real_entities_is_scanned_in_linear_time():
    text = ("a@b.co 555-123-4567 123-45-6789 10.0.0.1 ::1 x://u:p@h.io " * 20_000)[: 1 << 20]
    assert len(find_all(text)) >= 6 * 17_000


@pytest.mark.parametrize(("text", "label", "value"), [
    ("Please call me back at 415\u2014555\u20140132 tonight", "PHONE_NUMBER", "415\u2014555\u20140132"),
    ("Please call me back at 415\u2212555\u22120132 tonight", "PHONE_NUMBER", "415\u2212555\u22120132"),
    ("SSN \uff10\uff17\uff18-\uff10\uff15-\uff11\uff11\uff12\uff10 on file", "US_SSN", "\uff10\uff17\uff18-\uff10\uff15-\uff11\uff11\uff12\uff10"),
    ("card \u0664\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661 ok",
     "CREDIT_CARD", "\u0664\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661\u00a0\u0661\u0661\u0661\u0661"),
    ("mail jo\uff20example.com now", "EMAIL_ADDRESS", "jo\uff20example.com"),
    ("call me back at 415\u2022555\u20220132 soon", "PHONE_NUMBER", "415\u2022555\u20220132"),
    ("call me back at 415\u2219555\u22190132 soon", "PHONE_NUMBER", "415\u2219555\u22190132"),
    ("card 4111\u02d71111\u02d71111\u02d71111 ok", "CREDIT_CARD", "4111\u02d71111\u02d71111\u02d71111"),
    ("card 4111\u30021111\u30021111\u30021111 ok", "CREDIT_CARD", "4111\u30021111\u30021111\u30021111"),
    ("My card is \u2074\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9", "CREDIT_CARD",
     "\u2074\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9 \u00b9\u00b9\u00b9\u00b9"),
])
def test_look_alike_digits_dashes_spaces_and_at_signs_are_found_at_their_own_offsets(text, label, value):
    from sidecar.recognizers import find_each

    for spans in (find_all(text), find_each([text, "a second text 4155550132"])[0]):
        assert (label, value) in {(s.label, text[s.start : s.end]) for s in spans}
