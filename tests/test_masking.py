"""Span conflicts, operators, and exact offsets when masking."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from sidecar.config import PiiPolicyConfig
from sidecar.masking import MaskedItem, anonymize, resolve_conflicts
from sidecar.operators import OPERATORS, Hash, Mask, Redact, Replace
from sidecar.results import Span

REPLACE = PiiPolicyConfig()


def find(text: str, value: str, label: str, score: float = 0.9) -> Span:
    start = text.index(value)
    return Span(label, start, start + len(value), score)


def test_replace_puts_the_entity_type_in_place():
    text = "Write to jane@example.com or call 555-0100 today."
    masked = anonymize(text, [find(text, "jane@example.com", "EMAIL_ADDRESS"), find(text, "555-0100", "PHONE_NUMBER")],
                       REPLACE)
    assert masked.text == "Write to [EMAIL_ADDRESS] or call [PHONE_NUMBER] today."
    assert masked.items == (MaskedItem("EMAIL_ADDRESS", 9, 25, "replace"), MaskedItem("PHONE_NUMBER", 34, 42, "replace"))


def test_items_carry_no_values():
    assert [f.name for f in dataclasses.fields(MaskedItem)] == ["entity_type", "start", "end", "operator"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("我叫张伟，邮箱 zw@例子.中国，谢谢", "zw@例子.中国"), ("😀😀 mail a@b.co 👍🏽 then", "a@b.co"),
     ("e\u0301mile a@b.co ok", "a@b.co")],
)
def test_offsets_are_characters_not_utf8_bytes(text, value):
    span = find(text, value, "EMAIL_ADDRESS")
    masked = anonymize(text, [span], REPLACE)
    assert masked.text == text.replace(value, "[EMAIL_ADDRESS]")
    assert masked.items[0].start == span.start and len(text.encode()) != len(text)


def test_names_in_chinese_text_are_masked_exactly():
    text = "你好，张伟！请联系李娜。"
    masked = anonymize(text, [find(text, "张伟", "PERSON"), find(text, "李娜", "PERSON")], REPLACE)
    assert masked.text == "你好，[PERSON]！请联系[PERSON]。"


def test_operator_per_entity_type_overrides_the_default():
    policy = PiiPolicyConfig(
        default_operator=Redact(),
        operators={"CREDIT_CARD": Mask(chars_to_mask=12, masking_char="#"),
                   "PERSON": Replace(new_value="<name>")},
    )
    text = "Bob paid with 4111111111111111 from bob@x.io."
    masked = anonymize(text, [find(text, "Bob", "PERSON"), find(text, "4111111111111111", "CREDIT_CARD"),
                              find(text, "bob@x.io", "EMAIL_ADDRESS")], policy)
    assert masked.text == "<name> paid with ############1111 from ."
    assert [i.operator for i in masked.items] == ["replace", "mask", "redact"]


def test_mask_from_end_and_over_length():
    config = Mask(chars_to_mask=4, from_end=True)
    assert config.apply("555-0100", "PHONE_NUMBER") == "555-****"
    assert Mask(chars_to_mask=9).apply("ab", "X") == "**"
    assert Mask().apply("abc", "X") == "***"


def test_hash_is_a_salted_hex_digest():
    config = Hash(hash_type="sha256", salt="pepper")
    assert config.apply("a@b.co", "EMAIL_ADDRESS") == hashlib.sha256(b"peppera@b.co").hexdigest()
    assert Hash(hash_type="md5").apply("a@b.co", "X") == \
        hashlib.md5(b"a@b.co").hexdigest()


def test_every_configurable_operator_is_registered():
    assert set(OPERATORS) == {"replace", "redact", "mask", "hash"}


def test_overlapping_same_type_spans_become_their_union():
    resolved = resolve_conflicts([Span("PERSON", 5, 12, 0.7), Span("PERSON", 0, 8, 0.9)])
    assert resolved == [Span("PERSON", 0, 12, 0.9)]


def test_touching_same_type_spans_merge_but_different_types_stay_apart():
    resolved = resolve_conflicts([Span("PERSON", 0, 4, 0.8), Span("PERSON", 4, 9, 0.6), Span("EMAIL_ADDRESS", 9, 20, 0.9)])
    assert resolved == [Span("PERSON", 0, 9, 0.8), Span("EMAIL_ADDRESS", 9, 20, 0.9)]


def test_overlapping_types_keep_the_union_under_the_higher_score():
    resolved = resolve_conflicts([Span("PHONE_NUMBER", 10, 26, 0.6), Span("CREDIT_CARD", 6, 25, 0.95)])
    assert resolved == [Span("CREDIT_CARD", 6, 26, 0.95)]


def test_contained_span_is_absorbed():
    resolved = resolve_conflicts([Span("EMAIL_ADDRESS", 0, 20, 0.99), Span("PERSON", 0, 4, 0.8)])
    assert resolved == [Span("EMAIL_ADDRESS", 0, 20, 0.99)]


def test_conflicting_spans_leave_no_part_of_either_value_visible():
    text = "card 4111 1111 1111 1111 ok"
    spans = [Span("PHONE_NUMBER", 5, 19, 0.7), Span("CREDIT_CARD", 10, 24, 0.95)]
    assert anonymize(text, spans, REPLACE).text == "card [CREDIT_CARD] ok"


def test_span_beyond_the_text_is_an_error():
    with pytest.raises(ValueError, match="outside a text of 3 characters"):
        anonymize("abc", [Span("PERSON", 1, 4, 0.9)], REPLACE)


def test_no_spans_leaves_text_unchanged():
    assert anonymize("nothing here", [], REPLACE).text == "nothing here"


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111111111111111", "4111-1111-1111-1111",
                                  "4111 111111 111111111", "3782 822463 10005"])
def test_chars_to_keep_leaves_only_the_last_four_digits_of_any_card(card):
    masked = Mask(chars_to_keep=4).apply(card, "CREDIT_CARD")
    assert masked == "*" * (len(card) - 4) + card[-4:]
    assert sum(c.isdigit() for c in masked) == 4
    kept_first = Mask(chars_to_keep=4, from_end=True).apply(card, "CREDIT_CARD")
    assert kept_first == card[:4] + "*" * (len(card) - 4)


@pytest.mark.parametrize(("value", "masked"), [("12", "**"), ("4111", "****"), ("4111,111", "********"),
                                               ("078-05-1120", "*******1120")])
def test_chars_to_keep_masks_a_value_no_longer_than_twice_what_it_keeps_whole(value, masked):
    assert Mask(chars_to_keep=4).apply(value, "CREDIT_CARD") == masked


def test_chars_to_mask_and_chars_to_keep_exclude_each_other():
    from sidecar.errors import ConfigError
    from tests.grpc_helpers import make_config

    with pytest.raises(ConfigError, match="cannot both be set"):
        make_config(pii={"default_policy": {"operators": {"CREDIT_CARD": {"type": "mask", "chars_to_mask": 12,
                                                                          "chars_to_keep": 4}}}})


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111111111111111", "4111-1111-1111-1111",
                                  "4111111111111111111", "378282246310005"])
def test_the_shipped_card_operator_shows_at_most_the_last_four_digits(card):
    from sidecar.config import load_config
    from sidecar_demo.configs import ROUTER_CONFIG

    config = load_config(ROUTER_CONFIG)
    for policy in (config.pii.default_policy, *config.pii.policies.values()):
        text = f"pay with {card} today"
        masked = anonymize(text, [find(text, card, "CREDIT_CARD", 1.0)], policy).text
        visible = "".join(c for c in masked if c.isdigit())
        assert len(visible) <= 4 and card not in masked


def test_an_operator_refuses_parameters_another_operator_owns_naming_the_key():
    from sidecar.config import parse_config
    from sidecar.errors import ConfigError

    base = {"routing": {"default_model": "m"}}
    with pytest.raises(ConfigError, match=r"pii.default_policy.operators.EMAIL_ADDRESS.hash.masking_char"):
        parse_config(base | {"pii": {"default_policy": {"operators": {
            "EMAIL_ADDRESS": {"type": "hash", "masking_char": "#"}}}}})
    config = parse_config(base | {"pii": {"default_policy": {"default_operator": {"new_value": "<x>"},
                                                             "operators": {"CREDIT_CARD": {"type": "mask"}}}}})
    policy = config.pii.default_policy
    assert policy.default_operator == Replace(new_value="<x>")  # `type` left out: replace, as it always was
    assert policy.operators["CREDIT_CARD"] == Mask()
