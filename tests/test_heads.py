import numpy as np
import pytest

from model_contract.model_dir import ModelDir
from sidecar.errors import ModelLoadError
from sidecar.inference.heads import (
    BioScheme,
    category_results,
    decode_bio,
    snap_to_text,
    softmax,
)
from sidecar.inference.windows import Encoded, TextEncoder
from sidecar.results import Span
from tests.conftest import PII_LABELS

SCHEME = BioScheme.from_labels(PII_LABELS)


@pytest.fixture(scope="module")
def encoder(tiny_pii_dir) -> TextEncoder:
    return TextEncoder.for_model(ModelDir.read(tiny_pii_dir), 512, 64)


def one_hot(tags: list[str], score: float = 10.0) -> np.ndarray:
    out = np.zeros((len(tags), len(PII_LABELS)), dtype=np.float32)
    out[np.arange(len(tags)), [PII_LABELS.index(t) for t in tags]] = score
    return out


def tag_chars(enc: Encoded, start: int, end: int, entity: str) -> list[str]:
    """B- on the first token overlapping [start, end), I- on the rest, O elsewhere."""
    tags, inside = [], False
    for s, e in enc.offsets.tolist():
        if s < end and start < e:
            tags.append(("I-" if inside else "B-") + entity)
            inside = True
        else:
            tags.append("O")
    return tags


def decode(text: str, enc: Encoded, tags: list[str]) -> list[tuple[str, str]]:
    return [(s.label, text[s.start : s.end]) for s in decode_bio(one_hot(tags), enc.offsets, text, SCHEME)]


def test_softmax_rows_sum_to_one_and_keep_order():
    probs = softmax(np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, 0.0]], dtype=np.float32))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs[0].argmax() == 2 and probs[1, 0] == pytest.approx(1.0)


def test_category_results_give_best_label_confidence_and_full_distribution():
    [a, b] = category_results(np.array([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]]), ["biology", "law", "math"])
    assert a.label == "law" and b.label == "biology"
    assert a.confidence == pytest.approx(np.exp(3) / (np.exp(3) + 2))
    assert set(a.scores) == {"biology", "law", "math"} and sum(a.scores.values()) == pytest.approx(1.0)


def test_leading_space_of_a_byte_level_token_is_not_part_of_the_span(encoder):
    text = "My name is John Smith"
    enc = encoder.encode(text)
    assert text[enc.offsets[3][0]] == " "  # 'ĠJohn' starts at the space
    assert decode(text, enc, tag_chars(enc, 11, 21, "PERSON")) == [("PERSON", "John Smith")]


def test_span_offsets_and_score(encoder):
    text = "My name is John Smith"
    enc = encoder.encode(text)
    logits = one_hot(tag_chars(enc, 11, 21, "PERSON"), score=2.0)
    [span] = decode_bio(logits, enc.offsets, text, SCHEME)
    expected = float(softmax(logits)[3:5].max(axis=1).mean())
    assert (span.start, span.end, span.source) == (11, 21, "model")
    assert span.score == pytest.approx(expected)


def test_inside_tag_without_begin_starts_an_entity(encoder):
    text = "My name is John Smith"
    enc = encoder.encode(text)
    tags = ["O", "O", "O", "I-PERSON", "I-PERSON"]
    assert decode(text, enc, tags) == [("PERSON", "John Smith")]


def test_inside_tag_of_another_type_starts_a_new_entity(encoder):
    text = "My name is John Smith"
    enc = encoder.encode(text)
    tags = ["O", "O", "O", "B-PERSON", "I-PHONE_NUMBER"]
    assert decode(text, enc, tags) == [("PERSON", "John"), ("PHONE_NUMBER", "Smith")]


def test_adjacent_entities_of_different_types_stay_apart(encoder):
    text = "call 555 0100 or mail bob@x.io"
    enc = encoder.encode(text)
    phone = tag_chars(enc, 5, 13, "PHONE_NUMBER")
    email = tag_chars(enc, 22, 30, "EMAIL_ADDRESS")
    tags = [p if p != "O" else e for p, e in zip(phone, email, strict=True)]
    assert decode(text, enc, tags) == [("PHONE_NUMBER", "555 0100"), ("EMAIL_ADDRESS", "bob@x.io")]


def test_two_begin_tags_of_one_type_are_two_entities(encoder):
    text = "My name is John Smith"
    enc = encoder.encode(text)
    tags = ["O", "O", "O", "B-PERSON", "B-PERSON"]
    assert decode(text, enc, tags) == [("PERSON", "John"), ("PERSON", "Smith")]


def test_a_word_tagged_in_part_is_widened_to_the_whole_word(encoder):
    text = "Contact Zbigniewska now"
    enc = encoder.encode(text)
    pieces = [i for i, (s, e) in enumerate(enc.offsets.tolist()) if s >= 8 and e <= 19]
    assert len(pieces) > 2  # the surname is split into several sub-word tokens
    tags = ["O"] * len(enc)
    tags[pieces[1]] = "B-PERSON"  # only a middle piece is tagged
    assert decode(text, enc, tags) == [("PERSON", "Zbigniewska")]


def test_multibyte_characters_split_across_tokens_map_to_whole_characters(encoder):
    text = "客户龘鱻先生的电话"
    enc = encoder.encode(text)
    first = [i for i, (s, e) in enumerate(enc.offsets.tolist()) if (s, e) == (2, 3)]
    second = [i for i, (s, e) in enumerate(enc.offsets.tolist()) if (s, e) == (3, 4)]
    assert len(first) > 1 and len(second) > 1  # byte-level BPE splits these rare characters
    tags = ["O"] * len(enc)
    tags[first[1]] = "B-PERSON"  # a later byte of the character, not its first
    tags[second[0]] = "I-PERSON"
    # The name is found as whole characters, and not widened into neighbouring Chinese text.
    assert decode(text, enc, tags) == [("PERSON", "龘鱻")]


def test_whitespace_only_entity_is_dropped(encoder):
    text = "I am Al  \n"
    enc = encoder.encode(text)
    tags = ["O"] * len(enc)
    tags[-2] = "B-PERSON"  # a bare 'Ġ' token
    assert decode(text, enc, tags) == []


def test_no_tokens_no_spans():
    assert decode_bio(np.zeros((0, len(PII_LABELS))), np.zeros((0, 2), dtype=np.int64), "", SCHEME) == []


def test_snap_to_text_trims_and_widens():
    text = "id: AB12cd34 , ok"
    assert snap_to_text(text, 3, 8) == (4, 12)
    assert snap_to_text(text, 12, 13) is None
    long_word = "x " + "a" * 200 + " y"
    assert snap_to_text(long_word, 150, 160) == (2, 202)


def test_overlapping_spans_of_one_type_after_widening_merge():
    text = "JohnSmith"
    offsets = np.array([[0, 2], [2, 4], [4, 9]])
    spans = decode_bio(one_hot(["B-PERSON", "O", "B-PERSON"]), offsets, text, SCHEME)
    assert spans == [Span("PERSON", 0, 9, spans[0].score)]


def test_scheme_lists_entity_types_without_prefixes():
    assert SCHEME.entity_types == ("EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER")


def test_non_bio_label_is_a_load_error():
    with pytest.raises(ModelLoadError, match="'PERSON' is not a BIO tag"):
        BioScheme.from_labels(["O", "PERSON"])
