"""A deterministic stand-in for `sidecar.inference.engine.Engine`, for tests that are not about models.

It has the Engine's async and sync methods and attributes. Categories come from keywords, PII from a few
regexes and a name list, so a test can predict every answer from its input. Knobs make it slow, make it
fail, and count calls (and the calls cancelled while sleeping).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field

from sidecar.results import CategoryResult, PiiResult, Span

CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "math": ("solve", "integral", "derivative", "equation", "prime", "sum"),
    "law": ("court", "contract", "statute", "defendant", "tenant", "lawyer"),
    "biology": ("cell", "enzyme", "gene", "organelle", "chromosome", "atp"),
}
"""Keyword lists; a text with none of them is ``other`` at low confidence."""

NO_MATCH_LABEL = "other"
NO_MATCH_CONFIDENCE = 0.2

PERSON_NAMES: tuple[str, ...] = ("John Smith", "Jane Doe", "Alice Johnson", "Bob", "张伟")

PII_SCORES: dict[str, float] = {"EMAIL_ADDRESS": 0.99, "CREDIT_CARD": 0.95, "PHONE_NUMBER": 0.9, "PERSON": 0.85}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<![\d+])\d{4}(?:[ -]?\d{4}){3}(?!\d)")
_PHONE = re.compile(r"(?<![\d+])\+?\d[\d -]{7,}\d")


def keyword_category(text: str, keywords: dict[str, tuple[str, ...]] = CATEGORY_KEYWORDS) -> CategoryResult:
    """Most keyword hits wins; confidence is its share of all hits, scaled so ties stay below 0.5."""
    words = re.findall(r"\w+", text.lower())
    hits = {label: sum(words.count(k) for k in kws) for label, kws in keywords.items()}
    total = sum(hits.values())
    if total == 0:
        scores = {label: (1 - NO_MATCH_CONFIDENCE) / len(keywords) for label in keywords}
        scores[NO_MATCH_LABEL] = NO_MATCH_CONFIDENCE
        return CategoryResult(NO_MATCH_LABEL, NO_MATCH_CONFIDENCE, scores)
    scores = {label: 0.95 * n / total for label, n in hits.items()}
    scores[NO_MATCH_LABEL] = 0.05
    label = max(hits, key=lambda k: (hits[k], k))
    return CategoryResult(label, scores[label], scores)


def regex_pii(text: str, scores: dict[str, float] = PII_SCORES, names: tuple[str, ...] = PERSON_NAMES) -> PiiResult:
    """Emails, 16-digit card numbers, phone numbers (not inside a card) and listed names."""
    spans = [Span("EMAIL_ADDRESS", m.start(), m.end(), scores["EMAIL_ADDRESS"]) for m in _EMAIL.finditer(text)]
    cards = [Span("CREDIT_CARD", m.start(), m.end(), scores["CREDIT_CARD"]) for m in _CARD.finditer(text)]
    spans += cards
    for m in _PHONE.finditer(text):
        phone = Span("PHONE_NUMBER", m.start(), m.end(), scores["PHONE_NUMBER"])
        if not any(phone.intersects(s) for s in spans):
            spans.append(phone)
    for name in names:
        for m in re.finditer(re.escape(name), text):
            person = Span("PERSON", m.start(), m.end(), scores["PERSON"])
            if not any(person.intersects(s) for s in spans):
                spans.append(person)
    return PiiResult(sorted(spans, key=lambda s: (s.start, s.end)))


@dataclass
class FakeEngine:
    """Engine look-alike. Set `delay_s` (or the per-method delays) to make async calls slow, and
    `classify_error` / `pii_error` (or `error` for both) to an exception instance to make calls raise it."""

    keywords: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CATEGORY_KEYWORDS))
    pii_scores: dict[str, float] = field(default_factory=lambda: dict(PII_SCORES))
    names: tuple[str, ...] = PERSON_NAMES
    has_category_model: bool = True
    delay_s: float = 0.0
    classify_delay_s: float | None = None
    pii_delay_s: float | None = None
    error: Exception | None = None
    classify_error: Exception | None = None
    pii_error: Exception | None = None
    calls: Counter = field(default_factory=Counter)
    """Calls per method name; ``cancelled:<method>`` counts async calls cancelled while sleeping."""
    texts: list[str] = field(default_factory=list)
    """Every text passed to any method, in call order (tests may inspect it; the sidecar never logs it)."""
    closed: bool = False
    detects_pii: bool = True
    called: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the first call of any method: the request has reached the engine."""

    @property
    def category_labels(self) -> list[str] | None:
        if not self.has_category_model:
            return None
        return sorted(self.keywords) + [NO_MATCH_LABEL]

    deadlines: list[float | None] = field(default_factory=list)
    """The deadline of every async call, in call order."""

    async def classify(self, text: str, deadline: float | None = None) -> CategoryResult:
        self.deadlines.append(deadline)
        self._record("classify", [text])
        await self._wait("classify", self.classify_delay_s)
        self._raise(self.classify_error)
        return self._classify(text)

    async def detect_pii(self, text: str, deadline: float | None = None) -> PiiResult:
        self._record("detect_pii", [text])
        await self._wait("detect_pii", self.pii_delay_s)
        self._raise(self.pii_error)
        return regex_pii(text, self.pii_scores, self.names)

    async def detect_pii_all(self, texts: list[str], deadline: float | None = None) -> list[PiiResult]:
        """One `detect_pii` call per text, concurrently (counted and cancelled one by one)."""
        self.deadlines.append(deadline)
        return list(await asyncio.gather(*(self.detect_pii(t) for t in texts)))

    def classify_many(self, texts: list[str]) -> list[CategoryResult]:
        self._record("classify_many", texts)
        self._raise(self.classify_error)
        return [self._classify(t) for t in texts]

    def detect_pii_many(self, texts: list[str]) -> list[PiiResult]:
        self._record("detect_pii_many", texts)
        self._raise(self.pii_error)
        return [regex_pii(t, self.pii_scores, self.names) for t in texts]

    def describe(self) -> dict:
        models = {"pii": {"runtime": "fake", "file": None, "providers": []}}
        if self.has_category_model:
            models["category"] = {"runtime": "fake", "file": None, "providers": []}
        return models

    def close(self) -> None:
        self.closed = True

    def _classify(self, text: str) -> CategoryResult:
        if not self.has_category_model:
            raise RuntimeError("FakeEngine has no category model; check category_labels first")
        return keyword_category(text, self.keywords)

    def _record(self, method: str, texts: list[str]) -> None:
        self.calls[method] += 1
        self.texts.extend(texts)
        self.called.set()

    async def _wait(self, method: str, delay: float | None) -> None:
        seconds = self.delay_s if delay is None else delay
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.calls[f"cancelled:{method}"] += 1
            raise

    def _raise(self, specific: Exception | None) -> None:
        err = specific or self.error
        if err is not None:
            raise err
