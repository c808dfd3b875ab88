"""The enums' values are the wire format (headers, metric labels, log fields, JSON, ext_proc field names):
pinned here, so renaming a member's value cannot slip through as a refactor."""

from __future__ import annotations

import json
import typing

import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from sidecar import mutations
from sidecar.config import PathsConfig, PiiPolicyConfig
from sidecar.decisions import TextDecision
from sidecar.metrics import Metrics
from sidecar.processor import PROCESSORS, Processor
from sidecar.vocabulary import Action, Kind, Phase, RouteReason


def test_values_are_the_documented_strings():
    # x-router-action and the `action` metric label (README "What the sidecar sets", "Failures")
    assert [a.value for a in Action] == ["allow", "mask", "pseudonymize", "block", "degraded", "skipped", "rejected",
                                         "unanswered"]
    # x-router-reason on a decision (README, ARCHITECTURE.md)
    assert [r.value for r in RouteReason] == ["category", "low_confidence", "unknown_category", "client_model",
                                              "no_category_model", "no_user_text", "degraded", "unrouted"]
    assert [k.value for k in Kind] == ["chat", "completions", "responses", "messages", "generic"]
    assert [p.value for p in Phase] == ["request_headers", "request_body", "request_trailers", "response_headers",
                                        "response_body", "response_trailers"]


def test_kinds_are_the_config_path_groups_plus_generic():
    assert set(Kind) == set(PathsConfig.model_fields) | {Kind.GENERIC}
    assert set(PROCESSORS) == set(Kind)


def test_phases_are_envoys_oneof_fields_and_processor_methods():
    requests = {f.name for f in ProcessingRequest.DESCRIPTOR.oneofs_by_name["request"].fields}
    responses = {f.name for f in ProcessingResponse.DESCRIPTOR.oneofs_by_name["response"].fields}
    assert set(Phase) == requests == responses - {"immediate_response"}
    assert all(callable(getattr(Processor, p)) for p in Phase)


def test_policy_actions_are_actions():
    assert set(typing.get_args(PiiPolicyConfig.model_fields["action"].annotation)) == {
        Action.ALLOW, Action.MASK, Action.PSEUDONYMIZE, Action.BLOCK}


@pytest.mark.parametrize("member", [Action.MASK, RouteReason.NO_USER_TEXT, Kind.CHAT, Phase.REQUEST_BODY])
def test_members_serialise_as_their_plain_value(member):
    value = member.value
    assert str(member) == f"{member}" == value and hash(member) == hash(value)
    assert json.dumps(member) == orjson.dumps(member).decode() == json.dumps(value)
    assert mutations.header(mutations.ACTION, member).header.raw_value == value.encode()


def test_header_metric_and_json_carry_the_plain_values():
    metrics = Metrics()
    metrics.observe_outcome(Action.REJECTED, "not_json")
    assert metrics.registry.get_sample_value(
        "sidecar_requests_total", {"action": "rejected", "category": "none", "model": "none"}) == 1
    decision = TextDecision(text="hi", category=None, confidence=None, model="general", pii=[],
                            action=Action.ALLOW, masked_text="hi", route_reason=RouteReason.NO_CATEGORY_MODEL)
    assert json.loads(decision.to_json())["action"] == "allow"
    assert '"action": "allow"' in decision.to_json()
