"""From a request body to a Decision: parse, run the models, route, apply the PII policy, all under one deadline.

Classification runs only when the client asked for the virtual model (or named none); PII detection runs on
every scanned field, concurrently with it. When inference fails or misses the deadline, the failure policy
answers: ``fail_closed`` re-raises `InferenceError` (the processor turns it into a 503); ``fail_open``
returns a ``degraded`` decision that routes to the default model and masks or blocks only what the checksum
recognizers (credit cards, IBANs) find without a model. fail_open therefore trades PII protection for
availability: names, emails, phone numbers and other entities that only the model recognises pass unmasked
while it is failing.

``failure.timeout_ms`` bounds the whole decision, not only the models: the models get what is left of it
after parsing, less a reserve for the no-model fallback (checksum scan, masking, JSON rewrite), which grows
with the body. Bodies over ``failure.max_inspect_bytes`` never reach the models: the failure policy answers
at once (fail_closed raises `BodyTooLarge`, a 413). Parsing, the fallback and the rewrite of large bodies
run on a worker thread, so the event loop keeps serving other streams meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.checksums import find_checksum_spans_each
from sidecar.config import Config
from sidecar.errors import BodyTooLarge, InferenceError, InferenceTimeout, NoText
from sidecar.masking import anonymize, resolve_conflicts
from sidecar.policy import (
    PiiVerdict,
    Route,
    choose_route,
    default_route,
    kept_spans,
    needs_category,
    pii_verdict,
)
from sidecar.request import Kind, ParsedRequest, TextField, parse_body, rewrite
from sidecar.results import CategoryResult, PiiResult, Span

# Bodies (and Classify texts) above this many bytes are parsed, scanned and rewritten on a worker thread:
# at 30-60 ms per MB on a busy 2-core machine those steps would otherwise hold the event loop.
_OFF_LOOP_BYTES = 64 * 1024
# The no-model fallback (checksum scan, masking, rewrite) costs about 40-70 ms per MiB of text on a busy
# 2-core machine (more for text dense with digit groups); the models stop this long before the deadline,
# so a degraded answer is still ready in time.
_FALLBACK_S = 0.002
_FALLBACK_S_PER_MIB = 0.06


@dataclass(frozen=True)
class Decision:
    action: str  # "allow" | "mask" | "block" | "degraded"
    model: str  # selected backend model -> x-selected-model
    rewrite_model: bool
    route_reason: str  # category | low_confidence | unknown_category | client_model | no_category_model | no_user_text | degraded
    category: str | None
    confidence: float | None
    entity_types: tuple[str, ...]  # sorted unique kept types -> x-router-pii
    entity_counts: dict[str, int]
    body: bytes | None  # replacement body when anything changed, else None
    timings: dict[str, float]  # ms: parse, classify, pii, total
    error: str | None = None  # reason code when degraded


@dataclass(frozen=True)
class TextDecision:
    """The decision for one text (Classify API, ``sidecar classify``); `pii` offsets index into `text`."""

    text: str
    category: str | None
    confidence: float | None
    model: str
    pii: list[dict[str, Any]]  # kept spans: {"start", "end", "label", "score"}
    action: str  # "allow" | "mask" | "block" | "degraded"
    masked_text: str | None  # None when blocked
    route_reason: str
    error: str | None = None

    def to_json(self) -> str:
        """One line of ``sidecar classify`` output."""
        return json.dumps(
            {
                "text": self.text,
                "category": self.category,
                "confidence": None if self.confidence is None else round(self.confidence, 4),
                "model": self.model,
                "pii": self.pii,
                "action": self.action,
                "masked_text": self.masked_text,
            },
            ensure_ascii=False,
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The PII policy applied to a set of texts: per-text kept spans, the verdict, masked texts."""

    spans: list[list[Span]]
    verdict: PiiVerdict
    masked: list[str | None]  # new text per input, None where nothing changed

    def action(self, degraded: bool) -> str:
        if self.verdict.action == "block":
            return "block"
        return "degraded" if degraded else self.verdict.action


class Router:
    """Turns requests into decisions for one config and engine (both swapped together on reload)."""

    def __init__(self, config: Config, engine: Any):
        self.config = config
        self.engine = engine
        self._roles = frozenset(config.pii.roles)
        self._timeout_s = config.failure.timeout_ms / 1000
        self._max_inspect = config.failure.max_inspect_bytes

    async def decide(self, body: bytes, kind: Kind) -> Decision:
        """The decision for one request body; `RequestError` for unreadable bodies, `InferenceError` when the
        models fail under ``fail_closed`` (`BodyTooLarge` at once for a body over max_inspect_bytes)."""
        started = time.perf_counter()
        deadline = self._models_deadline(len(body))
        too_large = self._check_size(len(body))
        heavy = len(body) > _OFF_LOOP_BYTES
        parsed = await asyncio.to_thread(parse_body, body, kind) if heavy else parse_body(body, kind)
        timings = {"parse": _ms_since(started)}
        routing = self.config.routing
        routed = needs_category(parsed.requested_model, routing)
        category_text = parsed.category_text(routing.category_input) if routed else ""
        fields = parsed.pii_fields(self._roles)
        texts = [f.text for f in fields]
        error: str | None = None
        spans: list[list[Span]] | None = None
        try:
            if too_large is not None:
                raise too_large
            category, results = await self._infer(category_text, texts, timings, deadline)
            route = self._route(category, parsed.requested_model, routed, category_text)
            spans = [r.spans for r in results]
        except (InferenceError, TimeoutError) as e:
            error = self._fail(e)
            route = self._degraded_route(parsed.requested_model, routed)
        finish = (body, parsed, fields, route, texts, spans, error is not None)
        outcome, action, new_body = await asyncio.to_thread(self._finish, *finish) if heavy else self._finish(*finish)
        timings["total"] = _ms_since(started)
        return Decision(
            action=action,
            model=route.model,
            rewrite_model=route.rewrite and action != "block",
            route_reason=route.reason,
            category=route.category,
            confidence=route.confidence,
            entity_types=outcome.verdict.types,
            entity_counts=dict(Counter(s.label for s in outcome.verdict.kept_spans)),
            body=new_body,
            timings=timings,
            error=error,
        )

    async def decide_text(self, text: str, requested_model: str | None = "auto") -> TextDecision:
        """The decision a chat request whose latest user message is `text` would get (Classify API).
        An empty `requested_model` means the virtual model; the failure policy and deadline apply as in
        `decide`, with the text's UTF-8 length standing for the body's."""
        if not text:
            raise NoText("text is empty")
        size = len(text) if len(text) * 4 <= self._max_inspect else len(text.encode("utf-8", "surrogatepass"))
        deadline = self._models_deadline(size)
        too_large = self._check_size(size)
        requested = requested_model or None
        routed = needs_category(requested, self.config.routing)
        texts = [text] if "user" in self._roles else []
        error: str | None = None
        spans: list[list[Span]] | None = None
        try:
            if too_large is not None:
                raise too_large
            category, results = await self._infer(text if routed else "", texts, {}, deadline)
            route = self._route(category, requested, routed, text)
            spans = [r.spans for r in results]
        except (InferenceError, TimeoutError) as e:
            error = self._fail(e)
            route = self._degraded_route(requested, routed)
        if size > _OFF_LOOP_BYTES:
            outcome = await asyncio.to_thread(self._outcome, route, texts, spans)
        else:
            outcome = self._outcome(route, texts, spans)
        return self._text_decision(text, route, outcome, outcome.spans[0] if texts else [],
                                   outcome.masked[0] if texts else None, error)

    def decide_texts(self, texts: Sequence[str], requested_model: str | None = "auto") -> list[TextDecision]:
        """Decisions for many texts at once with the engine's batched synchronous calls (offline use: no
        deadline, and inference errors propagate). Empty texts get the default route and no PII."""
        requested = requested_model or None
        routed = needs_category(requested, self.config.routing)
        present = [i for i, t in enumerate(texts) if t]
        categories: dict[int, CategoryResult] = {}
        if routed and self.engine.category_labels is not None and present:
            categories = dict(zip(present, self.engine.classify_many([texts[i] for i in present]), strict=True))
        scanned = present if "user" in self._roles else []
        pii: dict[int, PiiResult] = {}
        if scanned:
            pii = dict(zip(scanned, self.engine.detect_pii_many([texts[i] for i in scanned]), strict=True))
        decisions = []
        for i, text in enumerate(texts):
            route = self._route(categories.get(i), requested, routed, text)
            outcome = self._apply(route, [text], [pii[i].spans if i in pii else []])
            decisions.append(self._text_decision(text, route, outcome, outcome.spans[0], outcome.masked[0], None))
        return decisions

    async def _infer(
        self, category_text: str, pii_texts: list[str], timings: dict[str, float], deadline: float
    ) -> tuple[CategoryResult | None, list[PiiResult]]:
        """Classification (when there is category text and a model) and PII detection of every text,
        concurrently, until `deadline` (event-loop time); leftover calls are cancelled, and awaited, on
        every way out."""
        classify = bool(category_text) and self.engine.category_labels is not None
        detect = bool(pii_texts) and self.engine.detects_pii
        if not detect:
            no_pii = [PiiResult([]) for _ in pii_texts]
            if not classify:
                return None, no_pii
        started = time.perf_counter()

        async def timed(call: Awaitable[Any], stage: str) -> Any:
            result = await call
            timings[stage] = max(timings.get(stage, 0.0), _ms_since(started))
            return result

        if not (classify and detect):  # one call: awaited in place, no task to schedule or gather
            async with asyncio.timeout_at(deadline):
                if detect:
                    return None, await timed(self.engine.detect_pii_all(pii_texts), "pii")
                return await timed(self.engine.classify(category_text), "classify"), no_pii
        # Both at once; PII is one call for all the texts: one tokenization job, one trip through the batcher.
        tasks = [asyncio.ensure_future(timed(self.engine.classify(category_text), "classify")),
                 asyncio.ensure_future(timed(self.engine.detect_pii_all(pii_texts), "pii"))]
        for task in tasks:
            task.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline):
                results = await asyncio.gather(*tasks)
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        return results[0], results[1]

    def _models_deadline(self, size: int) -> float:
        """Event-loop time by which the models must have answered for a body of `size` bytes: the
        decision's deadline less the reserve the no-model fallback needs for that much text."""
        reserve = _FALLBACK_S + _FALLBACK_S_PER_MIB * size / (1 << 20)
        return asyncio.get_running_loop().time() + self._timeout_s - reserve

    def _check_size(self, size: int) -> BodyTooLarge | None:
        """The error for a body over ``failure.max_inspect_bytes`` (raised at once under fail_closed: a 413
        that costs no parsing), or None."""
        if size <= self._max_inspect:
            return None
        error = BodyTooLarge(f"The request body ({size} bytes) is larger than this gateway inspects "
                             f"({self._max_inspect} bytes). Send less text per request.")
        if self.config.failure.inference == "fail_closed":
            raise error
        return error

    def _finish(self, body: bytes, parsed: ParsedRequest, fields: list[TextField], route: Route, texts: list[str],
                spans: list[list[Span]] | None, degraded: bool) -> tuple[_Outcome, str, bytes | None]:
        """The PII policy applied (to checksum spans when the models gave none) and the new body."""
        outcome = self._outcome(route, texts, spans)
        action = outcome.action(degraded)
        new_body = None
        if action != "block":
            changed = {f.index: m for f, m in zip(fields, outcome.masked, strict=True) if m is not None}
            if route.rewrite or changed:
                new_body = rewrite(body, parsed, route.model if route.rewrite else None, changed)
        return outcome, action, new_body

    def _outcome(self, route: Route, texts: list[str], spans: list[list[Span]] | None) -> _Outcome:
        return self._apply(route, texts, self._checksum_only(texts) if spans is None else spans)

    def _route(self, category: CategoryResult | None, requested: str | None, routed: bool, category_text: str) -> Route:
        if routed and not category_text:
            return default_route(self.config.routing, "no_user_text")
        return choose_route(category, requested, self.config.routing)

    def _degraded_route(self, requested: str | None, routed: bool) -> Route:
        if routed:
            return default_route(self.config.routing, "degraded")
        return Route(requested, rewrite=False, reason="degraded")

    def _fail(self, e: Exception) -> str:
        """Apply the failure policy: re-raise under fail_closed, else the reason code for a degraded answer
        (the processor logs it with the decision; nothing is logged here)."""
        error = e if isinstance(e, InferenceError) else InferenceTimeout(
            f"inference did not finish within {self.config.failure.timeout_ms:g} ms")
        if self.config.failure.inference == "fail_closed":
            raise error from None
        return error.reason

    def _checksum_only(self, texts: list[str]) -> list[list[Span]]:
        if not self.config.pii.checksums:
            return [[] for _ in texts]
        return find_checksum_spans_each(texts)

    def _apply(self, route: Route, texts: list[str], spans: list[list[Span]]) -> _Outcome:
        policy = self.config.pii.policy_for(route.model)
        per_text = [resolve_conflicts(kept_spans(s, policy)) for s in spans]
        verdict = pii_verdict([s for kept in per_text for s in kept], policy)
        masked: list[str | None] = [None] * len(texts)
        if verdict.action == "mask":
            masked = [anonymize(t, kept, policy).text if kept else None for t, kept in zip(texts, per_text, strict=True)]
        return _Outcome(per_text, verdict, masked)

    def _text_decision(self, text: str, route: Route, outcome: _Outcome, spans: list[Span], masked: str | None,
                       error: str | None) -> TextDecision:
        action = outcome.action(degraded=error is not None)
        return TextDecision(
            text=text,
            category=route.category,
            confidence=route.confidence,
            model=route.model,
            pii=[s.to_dict() for s in spans],
            action=action,
            masked_text=None if action == "block" else (masked if masked is not None else text),
            route_reason=route.reason,
            error=error,
        )


def _retrieve(task: asyncio.Future) -> None:
    """Mark a finished call's exception as seen; the first one already propagated through gather."""
    if not task.cancelled():
        task.exception()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
