"""Anonymisation after Presidio's anonymizer: conflicting spans are resolved, then each entity is replaced by
the operator its type is configured with, right to left so earlier offsets stay valid.

Operators are classes in `sidecar.operators`, each with its own parameters; a policy picks one per entity
type.
What comes back records where and how each entity was masked, never what it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sidecar.config import PiiPolicyConfig
from sidecar.operators import OperatorConfig
from sidecar.results import Span


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


def anonymize(text: str, spans: Iterable[Span], policy: PiiPolicyConfig,
              quote: Callable[[str], str] | None = None) -> Masked:
    """`text` with every span replaced by its operator's output (`quote`d, for text that is JSON source);
    spans must index into `text`."""
    resolved = resolve_conflicts(spans)
    if resolved and resolved[-1].end > len(text):
        raise ValueError(f"span [{resolved[-1].start}, {resolved[-1].end}) is outside a text of {len(text)} characters")
    pieces: list[str] = []
    items: list[MaskedItem] = []
    pos = len(text)
    for span in reversed(resolved):
        config = operator_for(span.label, policy)
        replacement = config.apply(text[span.start : span.end], span.label)
        pieces += [text[span.end : pos], quote(replacement) if quote else replacement]
        pos = span.start
        items.append(MaskedItem(span.label, span.start, span.end, config.type))
    pieces.append(text[:pos])
    return Masked("".join(reversed(pieces)), tuple(reversed(items)))
