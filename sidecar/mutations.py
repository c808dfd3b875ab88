"""Decisions → Envoy ext_proc protos. Every rule Envoy enforces silently lives here, once:

- header values go in ``raw_value`` (a response that also sets ``value`` makes Envoy answer 500);
- ``clear_route_cache`` only counts when the same response carries a header mutation;
- a replaced body needs ``content-length`` set to its new length, or Envoy rejects the request;
- the headers the sidecar owns are removed when a client sent them, so routes never see a spoofed choice.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpBody,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus

from sidecar.vocabulary import Action, Phase

if TYPE_CHECKING:
    from sidecar.decisions import Decision

SELECTED_MODEL = "x-selected-model"
CATEGORY = "x-router-category"
CONFIDENCE = "x-router-confidence"
PII = "x-router-pii"
ACTION = "x-router-action"
REASON = "x-router-reason"
"""Why: the route reason of a decision, or the reason code of a skipped or degraded request."""

OWNED_HEADERS = (SELECTED_MODEL, CATEGORY, CONFIDENCE, PII, ACTION, REASON)
CONTENT_ENCODING = "content-encoding"
RETRY_AFTER = "retry-after"

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@functools.lru_cache(maxsize=4096)
def header(key: str, value: str) -> HeaderValueOption:
    """One header to set, replacing any copy; the value travels as ``raw_value`` bytes only.

    Most values repeat (models, actions, reasons, categories), so each is built once and shared: a message
    put into another is copied, but never modify one of these in place."""
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode("utf-8")), append_action=_OVERWRITE)


def owned_headers_mutation(values: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> HeaderMutation:
    """Set `values` (owned headers and content-length) and remove every owned header not among them (and
    the headers in `remove`)."""
    values = {k: v for k, v in (values or {}).items() if v != ""}
    return HeaderMutation(
        set_headers=[header(k, v) for k, v in values.items()],
        remove_headers=[h for h in OWNED_HEADERS if h not in values] + list(remove),
    )


def decision_headers(decision: Decision) -> dict[str, str]:
    """The owned headers for a decision; PII is named by entity type only, never by value."""
    values = {ACTION: decision.action, REASON: decision.error or decision.route_reason}
    if decision.model is not None:
        values[SELECTED_MODEL] = decision.model
    if decision.category is not None:
        values[CATEGORY] = decision.category
    if decision.confidence is not None:
        values[CONFIDENCE] = f"{decision.confidence:.4f}"
    if decision.entity_types:
        values[PII] = ",".join(decision.entity_types)
    return values


def continue_response(phase: Phase, mutation: HeaderMutation | None = None, *, clear_route_cache: bool = False,
                      body: bytes | None = None) -> ProcessingResponse:
    """A correctly typed answer for `phase` that lets the request go on, optionally changed."""
    if phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS):
        return ProcessingResponse(**{phase: TrailersResponse(header_mutation=mutation)})
    common = CommonResponse(
        status=CommonResponse.CONTINUE,
        header_mutation=mutation,
        body_mutation=None if body is None else BodyMutation(body=body) if body else BodyMutation(clear_body=True),
        clear_route_cache=clear_route_cache and mutation is not None and bool(mutation.set_headers or mutation.remove_headers),
    )
    wrapper = HeadersResponse if phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS) else BodyResponse
    return ProcessingResponse(**{phase: wrapper(response=common)})


def echo_body(phase: Phase, chunk: HttpBody) -> ProcessingResponse:
    """FULL_DUPLEX_STREAMED and GRPC body modes: Envoy forwards only what the server sends back (a plain
    CONTINUE is a protocol error there, answered with a 500), so a chunk passes by being returned as is."""
    streamed = StreamedBodyResponse(body=chunk.body, end_of_stream=chunk.end_of_stream,
                                    end_of_stream_without_message=chunk.end_of_stream_without_message,
                                    grpc_message_compressed=chunk.grpc_message_compressed)
    common = CommonResponse(body_mutation=BodyMutation(streamed_response=streamed))
    return ProcessingResponse(**{phase: BodyResponse(response=common)})


@functools.cache
def strip_owned_headers(phase: Phase = Phase.REQUEST_HEADERS, *,
                        clear_route_cache: bool = False) -> ProcessingResponse:
    """Request headers pass on without any client copy of the sidecar's headers. When the client did send
    one, the route Envoy may already have chosen on it must be cleared too (`clear_route_cache`).

    Every request's first answer, so it is built once per argument set and shared: never modify it."""
    return continue_response(phase, owned_headers_mutation(), clear_route_cache=clear_route_cache)


def decision_response(decision: Decision, phase: Phase = Phase.REQUEST_BODY) -> ProcessingResponse:
    """allow/mask/degraded: routing headers (+ new body and content-length), route cache cleared; block: 403."""
    if decision.action == Action.BLOCK:
        return blocked_response(decision.entity_types)
    values = decision_headers(decision)
    if decision.body is not None:
        values["content-length"] = str(len(decision.body))
    remove = (CONTENT_ENCODING,) if decision.decompressed else ()
    return continue_response(phase, owned_headers_mutation(values, remove), clear_route_cache=True, body=decision.body)


def skipped_response(reason: str, phase: Phase = Phase.REQUEST_BODY) -> ProcessingResponse:
    """The request goes on unchanged and unrouted; the headers say it was skipped and why (a code)."""
    values = {ACTION: Action.SKIPPED, REASON: reason}
    return continue_response(phase, owned_headers_mutation(values), clear_route_cache=True)


def degraded_response(default_model: str, reason: str, phase: Phase = Phase.REQUEST_BODY) -> ProcessingResponse:
    """fail_open without a decision: route to the default model, headers say degraded and why."""
    values = {SELECTED_MODEL: default_model, ACTION: Action.DEGRADED, REASON: reason}
    return continue_response(phase, owned_headers_mutation(values), clear_route_cache=True)


def openai_error_document(message: str, type_: str, code: str) -> dict:
    """The error OpenAI-compatible clients already know how to read."""
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


def openai_error(message: str, type_: str, code: str) -> bytes:
    return json.dumps(openai_error_document(message, type_, code)).encode("utf-8")


def immediate_response(status: int, message: str, type_: str, code: str, action: Action,
                       extra: tuple[tuple[str, str], ...] = (), body: bytes | None = None) -> ProcessingResponse:
    """Envoy answers the client directly with `status` and an OpenAI-style JSON error (or `body`, a JSON error
    of another shape); nothing goes upstream."""
    headers = HeaderMutation(set_headers=[header("content-type", "application/json"), header(ACTION, action),
                                          header(REASON, code)] + [header(k, v) for k, v in extra])
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=status),
        headers=headers,
        body=body if body is not None else openai_error(message, type_, code),
        details=f"semantic_sidecar_{code}",
    ))


def blocked_response(entity_types: tuple[str, ...] | list[str]) -> ProcessingResponse:
    """403 naming the entity types found; the values themselves are never echoed."""
    types = ", ".join(sorted(set(entity_types))) or "personal data"
    message = f"The request was blocked because it contains personal data ({types}). Remove it and try again."
    return immediate_response(403, message, "invalid_request_error", "pii_detected", Action.BLOCK)


BAD_BODY_STATUS = {"unsupported_encoding": 415, "not_buffered": 413, "too_large": 413}
"""Status by reason code for bodies refused unread; any other code is a 400."""


def bad_request_response(reason: str, message: str) -> ProcessingResponse:
    """400 (415 for an encoding, 413 for size) for a body the sidecar cannot read, under
    ``failure.bad_body: reject``."""
    status = BAD_BODY_STATUS.get(reason, 400)
    return immediate_response(status, message, "invalid_request_error", reason, Action.REJECTED)


def too_large_response(reason: str, message: str) -> ProcessingResponse:
    """413 for a body over ``failure.max_inspect_bytes``: it is not inspected, so it is not forwarded either."""
    return immediate_response(413, message, "invalid_request_error", reason, Action.REJECTED)


def unavailable_response(reason: str, retry_after_s: int = 1) -> ProcessingResponse:
    """503 with Retry-After: the request could not be inspected (overload, deadline, model failure, or an
    unexpected error), so it is not forwarded."""
    message = "The request router is temporarily unable to process requests. Retry later."
    return immediate_response(503, message, "server_error", reason, Action.REJECTED,
                              ((RETRY_AFTER, str(retry_after_s)),))


def response_phases(request_body_mode: int) -> ProcessingMode:
    """The processing mode of a request whose answer the sidecar restores: the answer's headers, then its body
    streamed chunk by chunk. Envoy replaces the whole mode with a mode_override (a field left out is its
    proto default, and a request body mode of NONE would send the body on to the backend unread), so the
    request body keeps the mode it was configured with."""
    return ProcessingMode(request_header_mode=ProcessingMode.SEND, request_body_mode=request_body_mode,
                          request_trailer_mode=ProcessingMode.SKIP, response_header_mode=ProcessingMode.SEND,
                          response_body_mode=ProcessingMode.STREAMED, response_trailer_mode=ProcessingMode.SKIP)


def with_response_phases(response: ProcessingResponse, request_body_mode: int) -> ProcessingResponse:
    """A request-headers answer that also asks Envoy for this request's answer (`response_phases`): how a
    pseudonymizing policy gets its values back in. Needs the filter's ``allow_mode_override``; other
    requests keep the configured modes and pay nothing."""
    out = ProcessingResponse()
    out.CopyFrom(response)  # `response` may be a shared, cached message
    out.mode_override.CopyFrom(response_phases(request_body_mode))
    return out


def response_headers_response(remove: list[str]) -> ProcessingResponse:
    """The answer's headers go on, less `remove` (a content-length the restored body no longer has)."""
    return continue_response(Phase.RESPONSE_HEADERS, HeaderMutation(remove_headers=remove) if remove else None)


def answer_withheld_response(status: int, code: str, body: bytes) -> ProcessingResponse:
    """The backend's answer does not reach the client: Envoy answers with `status` and `body` (an error of
    the client's API) in its place."""
    return immediate_response(status, "", "", code, Action.REJECTED, body=body)
