"""Route choice and the PII verdict: pure rules over plain values."""

from __future__ import annotations

import pytest

from sidecar.config import PiiPolicyConfig, RoutingConfig
from sidecar.policy import Route, choose_route, needs_category, pii_verdict
from sidecar.results import CategoryResult, Span

ROUTING = RoutingConfig(default_model="small", confidence_threshold=0.6,
                        categories={"math": "math-llm", "law": "law-llm"})


@pytest.mark.parametrize("requested", ["auto", None])
def test_virtual_or_missing_model_routes_by_category(requested):
    route = choose_route(CategoryResult("math", 0.9), requested, ROUTING)
    assert route == Route("math-llm", True, "category", "math", 0.9)


def test_confidence_below_threshold_falls_back_to_default():
    route = choose_route(CategoryResult("math", 0.59), "auto", ROUTING)
    assert route == Route("small", True, "low_confidence", "math", 0.59)


def test_confidence_at_threshold_routes_by_category():
    assert choose_route(CategoryResult("law", 0.6), "auto", ROUTING).model == "law-llm"


def test_category_without_a_backend_goes_to_default():
    route = choose_route(CategoryResult("biology", 0.99), "auto", ROUTING)
    assert route == Route("small", True, "unknown_category", "biology", 0.99)


def test_no_category_model_goes_to_default():
    assert choose_route(None, "auto", ROUTING) == Route("small", True, "no_category_model")


def test_client_model_is_kept_and_not_rewritten():
    route = choose_route(CategoryResult("math", 0.99), "gpt-4o", ROUTING)
    assert route == Route("gpt-4o", False, "client_model")


def test_custom_virtual_model_name():
    routing = ROUTING.model_copy(update={"virtual_model": "router"})
    assert needs_category("router", routing) and not needs_category("auto", routing)
    assert choose_route(CategoryResult("math", 0.9), "auto", routing).reason == "client_model"


def spans() -> list[Span]:
    return [Span("EMAIL_ADDRESS", 0, 5, 0.99), Span("PERSON", 10, 15, 0.4), Span("PHONE_NUMBER", 20, 30, 0.8)]


def test_mask_policy_keeps_spans_at_or_above_threshold():
    verdict = pii_verdict(spans() + [Span("PERSON", 40, 45, 0.5)], PiiPolicyConfig(score_threshold=0.5))
    assert verdict.action == "mask"
    assert [s.start for s in verdict.kept_spans] == [0, 20, 40]
    assert verdict.types == ("EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER")


def test_allow_entities_pass_through():
    verdict = pii_verdict(spans(), PiiPolicyConfig(action="block", allow_entities=["PHONE_NUMBER"]))
    assert verdict.action == "block"
    assert verdict.types == ("EMAIL_ADDRESS",)


def test_nothing_kept_means_allow_even_under_block():
    verdict = pii_verdict(spans(), PiiPolicyConfig(action="block", score_threshold=0.995))
    assert (verdict.action, verdict.kept_spans, verdict.types) == ("allow", (), ())


def test_allow_policy_still_reports_types():
    verdict = pii_verdict(spans(), PiiPolicyConfig(action="allow"))
    assert verdict.action == "allow" and verdict.types == ("EMAIL_ADDRESS", "PHONE_NUMBER")


def test_block_entities_block_under_a_mask_policy():
    verdict = pii_verdict(spans() + [Span("CREDIT_CARD", 40, 59, 1.0)],
                          PiiPolicyConfig(action="mask", block_entities=["CREDIT_CARD", "US_SSN"]))
    assert verdict.action == "block"
    assert verdict.types == ("CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER")


def test_without_a_blocked_type_the_policy_action_applies():
    verdict = pii_verdict(spans(), PiiPolicyConfig(action="mask", block_entities=["CREDIT_CARD"]))
    assert verdict.action == "mask"


def test_block_entity_below_threshold_does_not_block():
    verdict = pii_verdict(spans() + [Span("CREDIT_CARD", 40, 59, 0.3)],
                          PiiPolicyConfig(action="mask", block_entities=["CREDIT_CARD"]))
    assert verdict.action == "mask"


def test_an_entity_cannot_be_both_allowed_and_blocked():
    with pytest.raises(ValueError, match="US_SSN in both"):
        PiiPolicyConfig(allow_entities=["US_SSN", "PERSON"], block_entities=["US_SSN"])


def test_default_policy_masks_who_and_lets_context_types_through():
    found = [Span("PERSON", 0, 5, 0.9), Span("LOCATION", 10, 15, 0.9), Span("ORGANIZATION", 20, 25, 0.9),
             Span("DATE_TIME", 30, 35, 0.9), Span("EMAIL_ADDRESS", 40, 45, 0.9)]
    verdict = pii_verdict(found, PiiPolicyConfig())
    assert verdict.action == "mask"
    assert verdict.types == ("EMAIL_ADDRESS", "PERSON")


def test_empty_allow_list_masks_context_types_too():
    verdict = pii_verdict([Span("LOCATION", 10, 15, 0.9)], PiiPolicyConfig(allow_entities=[]))
    assert verdict.types == ("LOCATION",)


def test_blocking_a_context_type_takes_it_off_the_default_allow_list():
    policy = PiiPolicyConfig.model_validate({"block_entities": ["LOCATION"]})
    assert "LOCATION" not in policy.allow_entities and "ORGANIZATION" in policy.allow_entities
    assert pii_verdict([Span("LOCATION", 0, 5, 0.9)], policy).action == "block"
