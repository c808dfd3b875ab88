"""Model heads: logits -> typed results.

Category logits become a CategoryResult (softmax, best label, full distribution). PII logits become
Spans by BIO decoding over the whole text at once, vectorised with numpy; only the handful of decoded
spans are touched in Python, to snap their edges to the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.checksums import merge_overlapping
from sidecar.errors import ModelLoadError
from sidecar.results import CategoryResult, Span

OUTSIDE, BEGIN, INSIDE = 0, 1, 2

# Scripts written without spaces between words: a tagged character there says nothing about its
# neighbours, so span edges are not extended through them.
_UNSPACED = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32, without modifying the input."""
    shifted = logits.astype(np.float32, copy=True)
    shifted -= shifted.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def category_results(logits: np.ndarray, labels: Sequence[str]) -> list[CategoryResult]:
    """``[batch, labels]`` logits -> one CategoryResult per row."""
    probs = softmax(np.atleast_2d(logits))
    best = probs.argmax(axis=1)
    return [
        CategoryResult(labels[b], float(row[b]), dict(zip(labels, row.tolist(), strict=True)))
        for b, row in zip(best.tolist(), probs, strict=True)
    ]


@dataclass(frozen=True)
class BioScheme:
    """A PII model's tag set as lookup tables: per label id, its BIO kind and entity-type index."""

    entity_types: tuple[str, ...]
    kind: np.ndarray
    entity: np.ndarray

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> BioScheme:
        types: list[str] = []
        kind = np.zeros(len(labels), dtype=np.int8)
        entity = np.full(len(labels), -1, dtype=np.int64)
        for i, label in enumerate(labels):
            if label == "O":
                continue
            prefix, _, name = label.partition("-")
            if prefix not in ("B", "I") or not name:
                raise ModelLoadError(f"PII label '{label}' is not a BIO tag (expected O, B-TYPE or I-TYPE)")
            if name not in types:
                types.append(name)
            kind[i] = BEGIN if prefix == "B" else INSIDE
            entity[i] = types.index(name)
        return cls(tuple(types), kind, entity)


def decode_bio(logits: np.ndarray, offsets: np.ndarray, text: str, scheme: BioScheme) -> list[Span]:
    """Token logits ``[n, labels]`` with character offsets ``[n, 2]`` -> entity spans, sorted.

    B-X starts an entity; I-X continues an X; an I-X after O or another type starts a new X. Tokens
    that share a character (a multi-byte character split by byte-level BPE) act as one unit, tagged
    with its most confident entity token if any has one. Score is the mean probability of the tags
    that make up the entity.
    """
    keep = offsets[:, 1] > offsets[:, 0]
    if not keep.all():
        logits, offsets = logits[keep], offsets[keep]
    n = len(offsets)
    if n == 0:
        return []
    probs = softmax(logits)
    tag = probs.argmax(axis=1)
    conf = probs[np.arange(n), tag]

    reach = np.maximum.accumulate(offsets[:, 1])
    new_unit = np.ones(n, dtype=bool)
    new_unit[1:] = offsets[1:, 0] >= reach[:-1]
    if new_unit.all():
        starts, ends = offsets[:, 0], offsets[:, 1]
    else:
        first = np.flatnonzero(new_unit)
        last = np.append(first[1:] - 1, n - 1)
        unit = np.cumsum(new_unit) - 1
        rank = np.where(scheme.kind[tag] != OUTSIDE, conf, -1.0)
        best = np.lexsort((-rank, unit))[first]
        tag, conf = tag[best], conf[best]
        starts, ends = offsets[first, 0], reach[last]

    kind = scheme.kind[tag]
    entity = scheme.entity[tag]
    inside = kind != OUTSIDE
    continues = np.zeros(len(tag), dtype=bool)
    continues[1:] = (kind[1:] == INSIDE) & inside[:-1] & (entity[1:] == entity[:-1])
    begins = inside & ~continues
    if not begins.any():
        return []
    members = np.flatnonzero(inside)
    group = (np.cumsum(begins) - 1)[members]
    sizes = np.bincount(group)
    scores = np.bincount(group, weights=conf[members]) / sizes
    heads = np.flatnonzero(begins)
    tails = members[np.cumsum(sizes) - 1]

    spans = []
    for h, t, score in zip(heads.tolist(), tails.tolist(), scores.tolist(), strict=True):
        edges = snap_to_text(text, int(starts[h]), int(ends[t]))
        if edges is not None:
            spans.append(Span(scheme.entity_types[entity[h]], edges[0], edges[1], score))
    return merge_overlapping(spans)


def snap_to_text(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim whitespace at both edges, then widen an edge that cuts through a word to the word's edge
    (never leave part of a value visible); None when nothing but whitespace is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return None
    while start > 0 and _in_word(text[start - 1]) and _in_word(text[start]):
        start -= 1
    while end < len(text) and _in_word(text[end]) and _in_word(text[end - 1]):
        end += 1
    return start, end


def _in_word(ch: str) -> bool:
    if not ch.isalnum():
        return False
    code = ord(ch)
    return not any(low <= code <= high for low, high in _UNSPACED)
