"""Pure decision rules: which backend a request goes to, and what the PII policy does with the spans found.

No I/O and no models here, so every rule is testable from plain values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.config import PiiPolicyConfig, RoutingConfig
from sidecar.results import CategoryResult, Span
from sidecar.vocabulary import Action, RouteReason


@dataclass(frozen=True, slots=True)
class Route:
    model: str | None
    """The backend model; None for requests that are scanned but not routed (APIs other than the routed ones)."""
    rewrite: bool
    """Write `model` into the body: the client asked for the virtual model (or named none)."""
    reason: RouteReason
    category: str | None = None
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class PiiVerdict:
    action: Action
    """`Action.ALLOW`, `Action.MASK` or `Action.BLOCK`."""
    kept_spans: tuple[Span, ...]
    types: tuple[str, ...]
    """Sorted unique entity types among `kept_spans`."""


def needs_category(requested_model: str | None, routing: RoutingConfig) -> bool:
    """Only requests for the virtual model (or for none) are routed; others skip the classifier."""
    return requested_model is None or requested_model == routing.virtual_model


def choose_route(category: CategoryResult | None, requested_model: str | None, routing: RoutingConfig) -> Route:
    """The backend for a request. `category` None means no category model is loaded."""
    if not needs_category(requested_model, routing):
        return Route(requested_model, rewrite=False, reason=RouteReason.CLIENT_MODEL)
    if category is None:
        return default_route(routing, RouteReason.NO_CATEGORY_MODEL)
    label, confidence = category.label, category.confidence
    if confidence < routing.confidence_threshold:
        return Route(routing.default_model, True, RouteReason.LOW_CONFIDENCE, label, confidence)
    if label not in routing.categories:
        return Route(routing.default_model, True, RouteReason.UNKNOWN_CATEGORY, label, confidence)
    return Route(routing.categories[label], True, RouteReason.CATEGORY, label, confidence)


def default_route(routing: RoutingConfig, reason: RouteReason) -> Route:
    """The default model for a routed request that has no usable category (no model, no text, degraded)."""
    return Route(routing.default_model, rewrite=True, reason=reason)


def kept_spans(spans: Iterable[Span], policy: PiiPolicyConfig) -> list[Span]:
    """Spans at or above the policy's score threshold whose type the policy does not allow through."""
    allowed = set(policy.allow_entities)
    return [s for s in spans if s.score >= policy.score_threshold and s.label not in allowed]


def pii_verdict(spans: Iterable[Span], policy: PiiPolicyConfig, found: Iterable[Span] = ()) -> PiiVerdict:
    """allow when nothing is kept; block when a kept type is in ``block_entities``; otherwise the policy's
    action (an ``allow`` policy still reports types).

    `spans` are what will be masked, overlaps already resolved under one label; `found` are the spans before
    that resolution. A refused type counts wherever it was found: an SSN the recognizer found under a
    phone number the model scored higher is masked as the phone, and still refuses the request."""
    kept = tuple(kept_spans(spans, policy))
    refused = {s.label for s in kept_spans(found, policy)} & set(policy.block_entities)
    types = tuple(sorted({s.label for s in kept} | refused))
    if not kept:
        return PiiVerdict(Action.ALLOW, kept, types)
    if refused or not set(types).isdisjoint(policy.block_entities):
        return PiiVerdict(Action.BLOCK, kept, types)
    return PiiVerdict(Action(policy.action), kept, types)
