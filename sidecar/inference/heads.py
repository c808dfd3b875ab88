"""Model heads: logits -> typed results.

Category logits become a CategoryResult (softmax, best label, full distribution). PII logits become
Spans by BIO decoding over the whole text at once, vectorised with numpy; only the handful of decoded
spans are touched in Python, to snap their edges to the text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.checksums import merge_overlapping
from sidecar.errors import ModelLoadError
from sidecar.results import CategoryResult, Span

OUTSIDE, BEGIN, INSIDE = 0, 1, 2

# A character that joins a word: a letter or digit, except in scripts written without spaces between
# words (Thai, Lao, Myanmar, Khmer, kana, CJK ideographs), where a tagged character says nothing about
# its neighbours, so span edges are never widened through them.
_UNSPACED = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003ffff"
)
_WORD_CHAR = f"[^\\W_{_UNSPACED}]"
_WORD_RUN = re.compile(f"{_WORD_CHAR}+")
_IS_WORD = re.compile(_WORD_CHAR)
# How far back to look for a word's start in one step (longer words take more steps).
_LOOKBACK = 64


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


def bias_vector(scheme: BioScheme, labels: Sequence[str], bias: Mapping[str, float]) -> np.ndarray | None:
    """Per label, what `bias` adds to an entity type's B- and I- scores (``models.pii.entity_bias``); None
    when nothing is added. A type the model does not tag is a load error, not a silent no-op."""
    unknown = sorted(set(bias) - set(scheme.entity_types))
    if unknown:
        raise ModelLoadError(f"entity_bias names {', '.join(unknown)}, which the model does not tag "
                             f"(it tags {', '.join(scheme.entity_types)})")
    vector = np.zeros(len(labels), dtype=np.float32)
    for i in range(len(labels)):
        if scheme.kind[i] != OUTSIDE:
            vector[i] = bias.get(scheme.entity_types[scheme.entity[i]], 0.0)
    return vector if vector.any() else None


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
    tag = logits.argmax(axis=1)
    if not scheme.kind[tag].any():  # the common case: nothing tagged, no probabilities needed
        return []
    shifted = logits - logits.max(axis=1, keepdims=True)
    conf = 1.0 / np.exp(shifted, dtype=np.float32).sum(axis=1)  # softmax probability of the argmax

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
    members = np.flatnonzero(inside)
    group = (np.cumsum(begins) - 1)[members]
    sizes = np.bincount(group)
    scores = np.bincount(group, weights=conf[members]) / sizes
    heads = np.flatnonzero(begins)
    tails = members[np.cumsum(sizes) - 1]

    spans = []
    types = scheme.entity_types
    for start, end, label, score in zip(
        starts[heads].tolist(), ends[tails].tolist(), entity[heads].tolist(), scores.tolist(), strict=True
    ):
        edges = snap_to_text(text, start, end)
        if edges is not None:
            spans.append(Span(types[label], edges[0], edges[1], score))
    return merge_overlapping(spans) if len(spans) > 1 else spans


def snap_to_text(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim whitespace at both edges, then widen an edge that cuts through a word to the word's edge
    (never leave part of a value visible); None when nothing but whitespace is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return None
    while start > 0 and _IS_WORD.match(text, start) and _IS_WORD.match(text, start - 1):
        back = _WORD_RUN.match(text[max(0, start - _LOOKBACK) : start][::-1])
        if back is None:
            break
        start -= back.end()
    if end < len(text) and _IS_WORD.match(text, end - 1):
        run = _WORD_RUN.match(text, end)
        end = run.end() if run else end
    return start, end
