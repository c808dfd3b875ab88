"""Typed results that flow from inference to policy, masking, headers and logs.

Offsets are Python string indices (Unicode code points) into the text that was analysed, half-open
``[start, end)``, so ``text[span.start:span.end]`` is the entity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Span:
    """One detected PII entity, shaped like Presidio's ``RecognizerResult``."""

    label: str
    start: int
    end: int
    score: float
    source: str = "model"  # "model", "checksum", "pattern" or "context" (the JSON key)

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"span [{self.start}, {self.end}) is empty or negative")

    def __len__(self) -> int:
        return self.end - self.start

    def intersects(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end

    def contains(self, other: Span) -> bool:
        return self.start <= other.start and other.end <= self.end

    def outside(self, ranges: Iterable[tuple[int, int]]) -> list[Span]:
        """The parts of this span that no ``[start, end)`` in `ranges` (in text order) covers: a span that runs
        into a range keeps its parts on either side."""
        out, start = [], self.start
        for a, b in ranges:
            if b <= start or a >= self.end:
                continue
            if a > start:
                out.append(Span(self.label, start, a, self.score, self.source))
            start = max(start, b)
        if start < self.end:
            out.append(Span(self.label, start, self.end, self.score, self.source))
        return out

    def shifted(self, offset: int) -> Span:
        return Span(self.label, self.start + offset, self.end + offset, self.score, self.source)

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "label": self.label, "score": round(self.score, 4)}


@dataclass(slots=True)
class StageTimings:
    """Where an inference call spent its time, in milliseconds; feeds logs and histograms."""

    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    infer_ms: float = 0.0
    decode_ms: float = 0.0
    batch_size: int = 0

    def total_ms(self) -> float:
        return self.queue_ms + self.tokenize_ms + self.infer_ms + self.decode_ms


@dataclass(frozen=True, slots=True)
class CategoryResult:
    """The subject of a text: best label, its probability, and the full distribution."""

    label: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict, compare=False, repr=False)
    timings: StageTimings | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class PiiResult:
    """Every entity found in one text, sorted by start, before any policy threshold."""

    spans: list[Span]
    timings: StageTimings | None = field(default=None, compare=False, repr=False)
