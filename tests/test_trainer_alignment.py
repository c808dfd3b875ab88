"""The one label-alignment function and the PII windows built on it."""

import pytest

from trainer.data import EntitySpan, bio_labels
from trainer.preprocess import IGNORE_INDEX, align_labels, encode_pii, without_overlap

LABELS = bio_labels(["EMAIL_ADDRESS", "LOCATION", "PERSON"])
L2I = {label: i for i, label in enumerate(LABELS)}
I2L = dict(enumerate(LABELS))


def tags(offsets, spans, text, special=None) -> list[str]:
    ids = align_labels(offsets, spans, text, L2I, special)
    return ["-" if i == IGNORE_INDEX else I2L[i] for i in ids]


def test_ascii_entity_gets_b_then_i_and_special_tokens_are_ignored():
    text = "My name is John Smith."
    offsets = [(0, 0), (0, 2), (2, 7), (7, 10), (10, 15), (15, 21), (21, 22), (0, 0)]
    spans = [EntitySpan(11, 21, "PERSON")]
    assert tags(offsets, spans, text) == ["-", "O", "O", "O", "B-PERSON", "I-PERSON", "O", "-"]


def test_special_tokens_mask_is_honoured_even_with_a_real_range():
    text = "John"
    assert tags([(0, 4), (0, 4)], [EntitySpan(0, 4, "PERSON")], text, special=[1, 0]) == ["-", "B-PERSON"]


def test_leading_space_of_the_next_word_does_not_join_an_entity_with_a_trailing_space():
    # 'ĠSmith' covers (4, 10) = " Smith"; the span "John " ends on that space.
    text = "John Smith"
    offsets = [(0, 4), (4, 10)]
    assert tags(offsets, [EntitySpan(0, 5, "PERSON")], text) == ["B-PERSON", "O"]


def test_whitespace_only_token_inside_an_entity_continues_it():
    text = "New  York"
    offsets = [(0, 3), (3, 4), (4, 9)]
    assert tags(offsets, [EntitySpan(0, 9, "LOCATION")], text) == ["B-LOCATION", "I-LOCATION", "I-LOCATION"]


def test_span_ending_inside_a_sub_word_keeps_the_partly_covered_token():
    text = "Mr Smithson"
    offsets = [(0, 2), (2, 8), (8, 9), (9, 11)]  # Mr | ĠSmith | s | on
    assert tags(offsets, [EntitySpan(3, 9, "PERSON")], text) == ["O", "B-PERSON", "I-PERSON", "O"]


def test_span_starting_inside_a_sub_word_starts_on_that_token():
    text = "Mr Smithson"
    offsets = [(0, 2), (2, 8), (8, 9), (9, 11)]
    assert tags(offsets, [EntitySpan(5, 11, "PERSON")], text) == ["O", "B-PERSON", "I-PERSON", "I-PERSON"]


def test_byte_tokens_of_one_cjk_character_share_its_range():
    text = "张伟"
    offsets = [(0, 0), (0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (0, 0)]
    assert tags(offsets, [EntitySpan(0, 2, "PERSON")], text) == ["-"] + ["B-PERSON"] + ["I-PERSON"] * 4 + ["-"]
    assert tags(offsets, [EntitySpan(1, 2, "PERSON")], text) == ["-", "O", "O", "O", "B-PERSON", "I-PERSON", "-"]


def test_adjacent_entities_of_one_type_each_start_with_b():
    text = "Paris London"
    offsets = [(0, 5), (5, 12)]
    spans = [EntitySpan(0, 5, "LOCATION"), EntitySpan(6, 12, "LOCATION")]
    assert tags(offsets, spans, text) == ["B-LOCATION", "B-LOCATION"]


def test_real_tokenizer_chinese_and_leading_space_alignment(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "Name 鑫龘 Smith"
    spans = [EntitySpan(5, 7, "PERSON")]
    enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    got = tags(offsets, spans, text, enc["special_tokens_mask"])
    inside = [i for i, (s, e) in enumerate(offsets) if s < 7 and e > 5 and text[s:e].strip()]
    assert len(inside) >= 3, "rare CJK characters should split into several byte tokens"
    assert [got[i] for i in inside] == ["B-PERSON"] + ["I-PERSON"] * (len(inside) - 1)
    assert got[0] == got[-1] == "-"
    assert all(t == "O" for i, t in enumerate(got[1:-1], 1) if i not in inside)


@pytest.mark.parametrize("stride", [0, 8])
def test_windows_of_a_long_text_keep_an_entity_at_the_end(tiny_base, stride):
    from transformers import AutoTokenizer

    from trainer.data import SpanExample

    tok = AutoTokenizer.from_pretrained(tiny_base)
    filler = "The court held that the contract was void. " * 30
    text = filler + "Write to john.smith@example.com now"
    start = text.index("john")
    example = SpanExample(text, (EntitySpan(start, start + len("john.smith@example.com"), "EMAIL_ADDRESS"),), "t", 1)
    windows = encode_pii(tok, [example], L2I, max_length=48, stride=stride)

    assert len(windows) > 3 and set(windows.example) == {0}
    assert windows.overlap == [0] + [stride] * (len(windows) - 1)
    last = [I2L[i] for i in windows.labels[-1] if i != IGNORE_INDEX]
    assert last.count("B-EMAIL_ADDRESS") == 1 and "I-EMAIL_ADDRESS" in last

    # Windows joined without their overlap are exactly the alignment of the whole, untruncated text.
    full = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    whole = [i for i in align_labels(full["offset_mapping"], example.spans, text, L2I, full["special_tokens_mask"])
             if i != IGNORE_INDEX]
    joined = [i for k in range(len(windows)) for i in without_overlap(windows.labels[k], windows.overlap[k])
              if i != IGNORE_INDEX]
    assert joined == whole


def test_stride_must_leave_room_in_the_window(tiny_base):
    from transformers import AutoTokenizer

    from trainer.data import SpanExample
    from trainer.settings import UsageError

    tok = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(UsageError, match="--stride must be in"):
        encode_pii(tok, [SpanExample("hello", (), "t", 1)], L2I, max_length=16, stride=14)
