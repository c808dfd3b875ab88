"""Decisions become the Envoy protos Envoy accepts: raw_value headers, content-length, route cache, errors."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from sidecar import mutations
from sidecar.vocabulary import Phase
from tests.grpc_helpers import common, immediate, make_decision, new_body, removed_headers, set_headers


def test_header_uses_raw_value_only_and_overwrites():
    option = mutations.header("x-selected-model", "math-expert")
    assert option.header.raw_value == b"math-expert"
    assert option.header.value == ""
    assert option.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def test_header_values_are_utf8_bytes():
    assert mutations.header("x-router-category", "computer science").header.raw_value == b"computer science"


def test_allow_decision_sets_routing_headers_and_clears_route_cache():
    decision = make_decision(action="allow", model="math-expert", category="math", confidence=0.91234)
    resp = mutations.decision_response(decision)
    assert resp.WhichOneof("response") == "request_body"
    assert set_headers(resp) == {"x-selected-model": "math-expert", "x-router-category": "math",
                                 "x-router-confidence": "0.9123", "x-router-action": "allow",
                                 "x-router-reason": "category"}
    assert common(resp).clear_route_cache
    assert new_body(resp) is None
    assert "content-length" not in set_headers(resp)


def test_owned_headers_not_set_are_removed_so_client_copies_never_survive():
    resp = mutations.decision_response(make_decision(model="general", route_reason="client_model"))
    assert set(removed_headers(resp)) == {"x-router-category", "x-router-confidence", "x-router-pii"}
    assert set(removed_headers(resp)) | set(set_headers(resp)) == set(mutations.OWNED_HEADERS)


def test_new_body_comes_with_its_byte_length_as_content_length():
    body = json.dumps({"model": "math-expert", "messages": [{"role": "user", "content": "é [PERSON] 你好"}]},
                      ensure_ascii=False).encode("utf-8")
    resp = mutations.decision_response(make_decision(action="mask", body=body, entity_types=("PERSON",),
                                                     entity_counts={"PERSON": 1}))
    assert new_body(resp) == body
    assert set_headers(resp)["content-length"] == str(len(body))
    assert len(body) != len(body.decode("utf-8"))
    assert set_headers(resp)["x-router-pii"] == "PERSON"


def test_pii_header_lists_entity_types_only():
    decision = make_decision(action="mask", entity_types=("EMAIL_ADDRESS", "PERSON"),
                             entity_counts={"EMAIL_ADDRESS": 1, "PERSON": 2})
    assert set_headers(mutations.decision_response(decision))["x-router-pii"] == "EMAIL_ADDRESS,PERSON"


def test_degraded_decision_says_why_in_the_reason_header():
    decision = make_decision(action="degraded", model="general", route_reason="degraded", error="timeout")
    headers = set_headers(mutations.decision_response(decision))
    assert headers["x-router-action"] == "degraded"
    assert headers["x-router-reason"] == "timeout"
    assert headers["x-selected-model"] == "general"


def test_block_decision_is_a_403_naming_types_not_values():
    decision = make_decision(action="block", entity_types=("EMAIL_ADDRESS", "PHONE_NUMBER"),
                             entity_counts={"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1})
    resp = mutations.decision_response(decision)
    status, body = immediate(resp)
    assert status == 403
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == "pii_detected" and body["error"]["param"] is None
    assert "EMAIL_ADDRESS, PHONE_NUMBER" in body["error"]["message"]
    headers = set_headers(resp)
    assert headers["content-type"] == "application/json"
    assert headers["x-router-action"] == "block"


@pytest.mark.parametrize("build, status, code", [
    (lambda: mutations.bad_request_response("not_json", "request body is not valid JSON"), 400, "not_json"),
    (lambda: mutations.unavailable_response("timeout"), 503, "timeout"),
])
def test_error_answers_are_openai_style_json(build, status, code):
    got_status, body = immediate(build())
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["type"] in ("invalid_request_error", "server_error")


def test_skipped_answer_marks_the_request_and_keeps_the_body():
    resp = mutations.skipped_response("not_json")
    assert set_headers(resp) == {"x-router-action": "skipped", "x-router-reason": "not_json"}
    assert new_body(resp) is None
    assert "x-selected-model" in removed_headers(resp)


def test_strip_owned_headers_removes_all_and_sets_nothing():
    resp = mutations.strip_owned_headers()
    assert resp.WhichOneof("response") == "request_headers"
    assert removed_headers(resp) == list(mutations.OWNED_HEADERS)
    assert set_headers(resp) == {}
    assert not common(resp).clear_route_cache


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_gets_an_answer_of_its_own_type(phase):
    resp = mutations.continue_response(phase)
    assert resp.WhichOneof("response") == phase


def test_removing_spoofed_headers_can_clear_the_route_cache():
    assert common(mutations.strip_owned_headers(clear_route_cache=True)).clear_route_cache


def test_route_cache_is_cleared_only_alongside_a_header_mutation():
    resp = mutations.continue_response(Phase.REQUEST_BODY, clear_route_cache=True)
    assert not common(resp).clear_route_cache


def test_echoed_chunk_keeps_bytes_and_stream_flags():
    from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody

    resp = mutations.echo_body(Phase.REQUEST_BODY, HttpBody(body=b"\xff partial", end_of_stream=True))
    streamed = common(resp).body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (b"\xff partial", True)
    assert resp.WhichOneof("response") == "request_body"


@pytest.mark.parametrize("body_mode", [ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL])
def test_asking_for_the_answer_keeps_the_request_body_mode(body_mode):
    """Envoy replaces the whole processing mode with a mode_override: a request body mode left at its default
    (NONE) would send the body to the backend without the sidecar ever reading it."""
    shared = mutations.strip_owned_headers()
    resp = mutations.with_response_phases(shared, body_mode)
    mode = resp.mode_override
    assert mode.request_body_mode == body_mode
    assert (mode.response_header_mode, mode.response_body_mode) == (ProcessingMode.SEND, ProcessingMode.STREAMED)
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (ProcessingMode.SKIP, ProcessingMode.SKIP)
    assert resp.request_headers == shared.request_headers
    assert not shared.HasField("mode_override")  # the cached, shared answer is left as it was
