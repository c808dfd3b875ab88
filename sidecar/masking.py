"""Anonymisation after Presidio's anonymizer: conflicting spans are resolved, then each entity is replaced by
the operator its type is configured with, right to left so earlier offsets stay valid.

Operators are small named functions in `OPERATORS`; `OperatorConfig` (config.py) picks one per entity type.
What comes back records where and how each entity was masked, never what it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.config import OperatorConfig, PiiPolicyConfig
from sidecar.results import Span

Operator = Callable[[str, str, OperatorConfig], str]
"""(value, entity_type, config) -> the text that takes the value's place."""

OPERATORS: dict[str, Operator] = {}


def operator(name: str) -> Callable[[Operator], Operator]:
    def register(fn: Operator) -> Operator:
        OPERATORS[name] = fn
        return fn

    return register


@operator("replace")
def replace(value: str, entity_type: str, config: OperatorConfig) -> str:
    return config.new_value if config.new_value is not None else f"[{entity_type}]"


@operator("redact")
def redact(value: str, entity_type: str, config: OperatorConfig) -> str:
    return ""


@operator("mask")
def mask(value: str, entity_type: str, config: OperatorConfig) -> str:
    if config.chars_to_keep is not None:
        n = max(len(value) - config.chars_to_keep, 0)
    else:
        n = len(value) if config.chars_to_mask is None else min(config.chars_to_mask, len(value))
    if config.from_end:
        return value[: len(value) - n] + config.masking_char * n
    return config.masking_char * n + value[n:]


@operator("hash")
def hash_(value: str, entity_type: str, config: OperatorConfig) -> str:
    data = (config.salt + value).encode("utf-8", "surrogatepass")
    return hashlib.new(config.hash_type, data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class MaskedItem:
    """One masked entity: its type, its place in the original text, and the operator used."""

    entity_type: str
    start: int
    end: int
    operator: str


@dataclass(frozen=True, slots=True)
class Masked:
    text: str
    items: tuple[MaskedItem, ...]


def resolve_conflicts(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans sorted by start. Overlapping or touching spans of one type become their union;
    overlapping spans of different types become their union under the higher-scoring label, so no part of
    either value is left visible."""
    resolved: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if resolved:
            last = resolved[-1]
            overlaps = span.start < last.end
            touches_same = span.start == last.end and span.label == last.label
            if overlaps or touches_same:
                resolved[-1] = _union(last, span)
                continue
        resolved.append(span)
    return resolved


def _union(a: Span, b: Span) -> Span:
    """Ties in score go to the longer span, then to the earlier one."""
    winner = a if (a.score, len(a)) >= (b.score, len(b)) else b
    return Span(winner.label, min(a.start, b.start), max(a.end, b.end), max(a.score, b.score), winner.source)


def operator_for(entity_type: str, policy: PiiPolicyConfig) -> OperatorConfig:
    return policy.operators.get(entity_type, policy.default_operator)


def anonymize(text: str, spans: Iterable[Span], policy: PiiPolicyConfig) -> Masked:
    """`text` with every span replaced by its operator's output; spans must index into `text`."""
    resolved = resolve_conflicts(spans)
    if resolved and resolved[-1].end > len(text):
        raise ValueError(f"span [{resolved[-1].start}, {resolved[-1].end}) is outside a text of {len(text)} characters")
    pieces: list[str] = []
    items: list[MaskedItem] = []
    pos = len(text)
    for span in reversed(resolved):
        config = operator_for(span.label, policy)
        pieces += [text[span.end : pos], OPERATORS[config.type](text[span.start : span.end], span.label, config)]
        pos = span.start
        items.append(MaskedItem(span.label, span.start, span.end, config.type))
    pieces.append(text[:pos])
    return Masked("".join(reversed(pieces)), tuple(reversed(items)))
