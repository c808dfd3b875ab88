"""The ext_proc processor over a real grpc.aio channel, driven like Envoy drives it, with the real DecisionMaker over
FakeEngine (deterministic answers) so each test can predict the decision from its input."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest

from sidecar.answers import AnswerScan
from sidecar.api.v1 import router_pb2
from sidecar.config import LoggingConfig
from sidecar.errors import InferenceTimeout, Overloaded
from sidecar.logs import configure_logging
from sidecar.metrics import Metrics
from tests.fakes import FakeEngine
from tests.grpc_helpers import (
    BUFFERED_PARTIAL,
    CHAT_PATH,
    COMPLETIONS_PATH,
    FULL_DUPLEX,
    STREAMED,
    Exchange,
    body_msg,
    chat_body,
    chat_request,
    common,
    headers_msg,
    immediate,
    make_config,
    new_body,
    other_phase_msgs,
    removed_headers,
    run_stream,
    set_headers,
    start_server,
    stop_server,
)

OWNED = {"x-selected-model", "x-router-category", "x-router-confidence", "x-router-pii", "x-router-action",
         "x-router-reason"}


@pytest.fixture
async def start():
    """Start a sidecar (config, engine) on a loopback port; every one started is stopped afterwards."""
    running = []

    async def _start(config=None, engine=None, metrics=None):
        engine = engine if engine is not None else FakeEngine()
        r = await start_server(config or make_config(), lambda _c, _m: engine, metrics=metrics)
        running.append(r)
        return r

    yield _start
    for r in running:
        await stop_server(r)


def messages(body: bytes) -> list[dict]:
    return json.loads(body)["messages"]


# --- routing -----------------------------------------------------------------------------------------------


async def test_routes_by_category_and_rewrites_the_virtual_model(start):
    sc = await start()
    head, resp = await chat_request(sc.ext_proc, chat_body("Solve the equation and find the derivative."))
    headers = set_headers(resp)
    assert headers["x-selected-model"] == "math-expert"
    assert headers["x-router-category"] == "math"
    assert headers["x-router-action"] == "allow"
    assert float(headers["x-router-confidence"]) >= 0.5
    assert common(resp).clear_route_cache
    body = new_body(resp)
    assert json.loads(body)["model"] == "math-expert"
    assert headers["content-length"] == str(len(body))


async def test_low_confidence_falls_back_to_the_default_model(start):
    sc = await start()
    _, resp = await chat_request(sc.ext_proc, chat_body("Tell me something nice about the weather."))
    headers = set_headers(resp)
    assert headers["x-selected-model"] == "general"
    assert headers["x-router-reason"] == "low_confidence"
    assert json.loads(new_body(resp))["model"] == "general"


async def test_threshold_is_the_configured_one(start):
    sc = await start(make_config(routing={"confidence_threshold": 0.1}))
    _, resp = await chat_request(sc.ext_proc, chat_body("Tell me something nice about the weather."))
    # 'other' at 0.2 clears a 0.1 threshold but has no backend: unknown category, default model.
    assert set_headers(resp)["x-router-reason"] == "unknown_category"
    assert set_headers(resp)["x-router-category"] == "other"


async def test_client_chosen_model_is_kept_and_body_untouched(start):
    sc = await start()
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve the integral.", model="gpt-4o"))
    headers = set_headers(resp)
    assert headers["x-selected-model"] == "gpt-4o"
    assert headers["x-router-reason"] == "client_model"
    assert new_body(resp) is None
    assert "content-length" not in headers


async def test_completions_path_routes_and_masks_the_prompt(start):
    sc = await start()
    body = json.dumps({"model": "auto", "prompt": "Solve for x, then email jane@example.org"}).encode()
    _, resp = await chat_request(sc.ext_proc, body, path=COMPLETIONS_PATH)
    out = json.loads(new_body(resp))
    assert out["prompt"] == "Solve for x, then email [EMAIL_ADDRESS]"
    assert out["model"] == "math-expert"


async def test_query_string_does_not_hide_a_routed_path(start):
    sc = await start()
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve it."), path=CHAT_PATH + "?api-version=2024")
    assert set_headers(resp)["x-selected-model"] == "math-expert"


# --- PII ---------------------------------------------------------------------------------------------------


async def test_masking_replaces_exact_spans_in_multibyte_text(start):
    sc = await start()
    text = "我的名字是张伟，邮件 zhang.wei@example.com，谢谢 — é"
    _, resp = await chat_request(sc.ext_proc, chat_body(text))
    headers = set_headers(resp)
    body = new_body(resp)
    assert messages(body)[0]["content"] == "我的名字是[PERSON]，邮件 [EMAIL_ADDRESS]，谢谢 — é"
    assert headers["x-router-action"] == "mask"
    assert headers["x-router-pii"] == "EMAIL_ADDRESS,PERSON"
    assert headers["content-length"] == str(len(body))
    assert "zhang.wei@example.com" not in body.decode("utf-8")


async def test_block_answers_403_without_echoing_any_value(start):
    sc = await start(make_config(pii={"policies": {"humanities-expert": {"action": "block"}}}))
    email, phone = "john.smith@example.com", "+1 415 555 0100"
    _, resp = await chat_request(sc.ext_proc, chat_body(f"The court asked John Smith ({email}, {phone}) to appear."))
    status, body = immediate(resp)
    assert status == 403
    assert body["error"]["code"] == "pii_detected"
    for value in (email, phone, "John Smith"):
        assert value.encode() not in resp.SerializeToString()
    assert "EMAIL_ADDRESS" in body["error"]["message"] and "PERSON" in body["error"]["message"]


async def test_client_spoofed_router_headers_are_removed_on_every_path(start):
    sc = await start()
    spoofed = {h: "spoofed" for h in OWNED}
    for path in (CHAT_PATH, COMPLETIONS_PATH, "/v1/models", "/healthz"):
        ex = Exchange(sc.ext_proc)
        resp = await ex.send(headers_msg(path, spoofed, end_of_stream=path not in (CHAT_PATH, COMPLETIONS_PATH)))
        removed = set(removed_headers(resp))
        assert removed | set(set_headers(resp)) >= OWNED, path
        assert "spoofed" not in set(set_headers(resp).values())
        assert common(resp).clear_route_cache, "a route chosen on the spoofed header must be recomputed"
        ex.call.cancel()


async def test_route_cache_is_kept_when_the_client_sent_no_router_header(start):
    sc = await start()
    ex = Exchange(sc.ext_proc)
    resp = await ex.send(headers_msg("/v1/models", end_of_stream=True))
    assert not common(resp).clear_route_cache
    ex.call.cancel()


# --- bad bodies --------------------------------------------------------------------------------------------

OPEN = {"inference": "fail_open"}
PASS = {"bad_body": "pass"}

BAD_BODIES = [
    (b"this is not json", "not_json"),
    (b"\xff{}", "not_utf8"),
    (b'{"model": "auto", "model": "auto", "messages": [{"role": "user", "content": "hi"}]}', "duplicate_key"),
    (b'{"model": "a\\u0000", "messages": [{"role": "user", "content": "hi"}]}', "invalid_model"),
    (b'["a", "list"]', "not_object"),
    (b'{"model": "auto", "messages": []}', "no_text"),
    (b'{"model": "auto", "prompt": [[1, 2]], "messages": [{"role": "user", "content": "hi"}]}', "token_ids"),
    (b"   ", "empty_body"),
]


@pytest.mark.parametrize("body, reason", BAD_BODIES)
async def test_bad_body_passes_unchanged_marked_skipped_when_configured(start, body, reason):
    sc = await start(make_config(failure=PASS))
    _, resp = await chat_request(sc.ext_proc, body)
    assert resp.WhichOneof("response") == "request_body"
    assert set_headers(resp) == {"x-router-action": "skipped", "x-router-reason": reason}
    assert new_body(resp) is None


@pytest.mark.parametrize("body, reason", BAD_BODIES)
async def test_bad_body_is_rejected_with_400_by_default(start, body, reason):
    sc = await start()
    _, resp = await chat_request(sc.ext_proc, body)
    status, error = immediate(resp)
    assert status == 400
    assert error["error"]["code"] == reason
    assert error["error"]["message"]


async def test_headers_only_request_is_an_empty_body(start):
    sc = await start(make_config(failure=PASS))
    [resp] = await run_stream(sc.ext_proc, [headers_msg(end_of_stream=True)])
    assert resp.WhichOneof("response") == "request_headers"
    assert set_headers(resp)["x-router-reason"] == "empty_body"
    sc2 = await start(make_config(failure={"bad_body": "reject"}))
    [resp] = await run_stream(sc2.ext_proc, [headers_msg(end_of_stream=True)])
    assert immediate(resp)[0] == 400


@pytest.mark.parametrize("mode, reason", [(STREAMED, "streamed"), (BUFFERED_PARTIAL, "too_large")])
async def test_partial_bodies_are_refused_at_the_first_chunk_by_default(start, mode, reason):
    sc = await start()
    body = chat_body("Email me at john@example.com")
    answers = await run_stream(sc.ext_proc, [headers_msg(body_mode=mode), body_msg(body[:10], end_of_stream=False)])
    status, error = immediate(answers[1])
    assert status == 413 and error["error"]["code"] == "not_buffered"
    assert sc.engine.calls["detect_pii"] == 0


@pytest.mark.parametrize("mode, reason", [(STREAMED, "streamed"), (BUFFERED_PARTIAL, "too_large")])
async def test_partial_bodies_are_answered_chunk_by_chunk_and_skipped_when_configured(start, mode, reason):
    metrics = Metrics()
    sc = await start(make_config(failure=PASS), metrics=metrics)
    body = chat_body("Email me at john@example.com")
    chunks = [body_msg(body[:10], end_of_stream=False), body_msg(body[10:20], end_of_stream=False),
              body_msg(body[20:], end_of_stream=True)]
    answers = await run_stream(sc.ext_proc, [headers_msg(body_mode=mode), *chunks])
    assert [a.WhichOneof("response") for a in answers] == ["request_headers"] + ["request_body"] * 3
    for a in answers[1:]:
        assert new_body(a) is None and not set_headers(a)
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": reason}) == 1
    assert sc.engine.calls["detect_pii"] == 0


async def test_full_duplex_chunks_are_echoed_back_so_envoy_forwards_them(start):
    """In FULL_DUPLEX_STREAMED Envoy forwards only the body the server returns; CONTINUE would be a 500."""
    metrics = Metrics()
    sc = await start(make_config(failure=PASS), metrics=metrics)
    body = chat_body("Solve it, john@example.com")
    ex = Exchange(sc.ext_proc)
    await ex.send(headers_msg(body_mode=FULL_DUPLEX))
    answers = [await ex.send(body_msg(body[:15], end_of_stream=False)), await ex.send(body_msg(body[15:]))]
    echoed = [common(a).body_mutation.streamed_response for a in answers]
    assert b"".join(e.body for e in echoed) == body
    assert [e.end_of_stream for e in echoed] == [False, True]
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": "streamed"}) == 1
    assert await ex.close() is None


async def test_full_duplex_response_body_is_echoed_on_every_path(start):
    sc = await start()
    for path in (CHAT_PATH, "/v1/models"):
        head = headers_msg(path)
        head.protocol_config.response_body_mode = FULL_DUPLEX
        ex = Exchange(sc.ext_proc)
        await ex.send(head)
        resp = await ex.send(ProcessingRequest(response_body=HttpBody(body=b'{"ok": 1}', end_of_stream=True)))
        assert common(resp).body_mutation.streamed_response.body == b'{"ok": 1}'
        ex.call.cancel()


def answer_headers(content_type: str) -> ProcessingRequest:
    headers = HeaderMap(headers=[HeaderValue(key="content-type", raw_value=content_type.encode())])
    return ProcessingRequest(response_headers=HttpHeaders(headers=headers))


def answer_chunk(data: bytes, end: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=end))


async def test_a_failure_while_scanning_an_answer_withholds_it_and_never_passes_the_chunk(start, monkeypatch):
    async def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the scan")

    monkeypatch.setattr(AnswerScan, "spans", broken)
    monkeypatch.setattr(AnswerScan, "body", broken)
    sc = await start(make_config(pii={"response_window_chars": 32, "default_policy": {"response_pii": "mask"}}))
    said = b"Sure, mail leak@example.com about it and anything else you need to know today."
    # A streamed answer: the chunk at hand becomes one error event; the rest of the stream is dropped.
    ex = Exchange(sc.ext_proc)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat_body("hello there")))
    await ex.send(answer_headers("text/event-stream"))
    event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": said.decode()}}]}).encode() + b"\n\n"
    first = new_body(await ex.send(answer_chunk(event)))
    assert b"leak@example.com" not in first and json.loads(first[6:])["error"]["code"] == "answer_not_inspected"
    assert new_body(await ex.send(answer_chunk(event, end=True))) == b""
    ex.call.cancel()
    # A JSON answer: replaced by a 503 of the client's API.
    ex = Exchange(sc.ext_proc)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat_body("hello there")))
    await ex.send(answer_headers("application/json"))
    status, error = immediate(await ex.send(answer_chunk(b'{"choices": [{"message": {"content": "' + said + b'"}}]}', True)))
    assert status == 503 and error["error"]["code"] == "answer_not_inspected"
    ex.call.cancel()


# --- failure policy ----------------------------------------------------------------------------------------


async def test_fail_open_routes_to_default_model_marked_degraded(start):
    sc = await start(make_config(failure=OPEN), engine=FakeEngine(error=InferenceTimeout("slow")))
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve the integral."))
    headers = set_headers(resp)
    assert headers["x-router-action"] == "degraded"
    assert headers["x-selected-model"] == "general"
    assert headers["x-router-reason"] == "timeout"
    assert json.loads(new_body(resp))["model"] == "general"


async def test_fail_open_on_deadline(start):
    sc = await start(make_config(failure={"timeout_ms": 20, **OPEN}), engine=FakeEngine(delay_s=2))
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve the integral."))
    assert set_headers(resp)["x-router-action"] == "degraded"


@pytest.mark.parametrize("error, code", [(InferenceTimeout("slow"), "timeout"), (Overloaded("full"), "overloaded")])
async def test_fail_closed_answers_503_with_retry_after(start, error, code):
    sc = await start(make_config(failure={"retry_after_s": 2}), engine=FakeEngine(error=error))
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve the integral."))
    status, body = immediate(resp)
    assert status == 503
    assert body["error"]["code"] == code
    assert {h.header.key: h.header.raw_value for h in resp.immediate_response.headers.set_headers}[
        "retry-after"] == b"2"


CARD = "4111 1111 1111 1111"  # Luhn-valid Visa test number


async def test_fail_closed_refuses_a_body_over_max_inspect_bytes_with_413(start):
    metrics = Metrics()
    sc = await start(make_config(failure={"inference": "fail_closed", "max_inspect_bytes": 4096}), metrics=metrics)
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve it. " * 500 + CARD))
    status, body = immediate(resp)
    assert status == 413 and body["error"]["code"] == "too_large" and "4096 bytes" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error" and CARD not in json.dumps(body)
    assert set_headers(resp)["x-router-action"] == "rejected" and set_headers(resp)["x-router-reason"] == "too_large"
    assert sc.engine.calls.total() == 0
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": "too_large"}) == 1


async def test_fail_open_answers_a_body_over_max_inspect_bytes_degraded_with_checksum_masking(start):
    sc = await start(make_config(failure={"max_inspect_bytes": 4096, **OPEN}))
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve it. " * 500 + CARD))
    headers = set_headers(resp)
    assert (headers["x-router-action"], headers["x-router-reason"], headers["x-selected-model"]) == (
        "degraded", "too_large", "general")
    content = messages(new_body(resp))[0]["content"]
    assert content.endswith("[CREDIT_CARD]") and CARD not in content
    assert sc.engine.calls.total() == 0


async def test_a_stream_that_ends_before_its_answer_is_logged_unanswered_not_no_body(start):
    """Envoy gives up after message_timeout (or the client goes away) and resets the stream while the body is
    being decided; with failure_mode_allow it forwards the body as sent. The log must say so."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info"), stream)
    metrics = Metrics()
    sc = await start(make_config(failure={"timeout_ms": 60_000, "max_timeout_ms": 60_000}),
                     engine=FakeEngine(delay_s=60), metrics=metrics)
    late = Exchange(sc.ext_proc)
    await late.send(headers_msg(request_id="late-1"))
    await late.call.write(body_msg(chat_body("Solve the integral.")))
    await until(lambda: sc.engine.calls["detect_pii"] == 1)
    late.call.cancel()
    await until(lambda: logged(stream, "late-1"))
    [event] = logged(stream, "late-1")
    assert (event["action"], event["reason"], event["level"]) == ("unanswered", "stream_closed", "warning")
    assert event["body_bytes"] == len(chat_body("Solve the integral."))
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": "stream_closed"}) == 1
    assert sc.engine.calls["cancelled:detect_pii"] == 1
    headers_only = Exchange(sc.ext_proc)  # no body ever came: still skipped/no_body
    await headers_only.send(headers_msg(request_id="nobody-1"))
    headers_only.call.cancel()
    await until(lambda: logged(stream, "nobody-1"))
    [event] = logged(stream, "nobody-1")
    assert (event["action"], event["reason"]) == ("skipped", "no_body")


async def test_a_request_id_that_is_not_id_shaped_is_not_logged(start):
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info"), stream)
    sc = await start()
    for request_id in ("John Smith", "JohnSmith", "a" * 200):
        await chat_request(sc.ext_proc, chat_body("Solve the integral."), request_id=request_id)
    await chat_request(sc.ext_proc, chat_body("Solve the integral."), request_id="0f8fad5b-d9cb-469f-a165-70867728950e")
    await until(lambda: logged(stream, "0f8fad5b-d9cb-469f-a165-70867728950e"))
    text = stream.getvalue()
    assert "John" not in text and "a" * 200 not in text


def logged(stream: io.StringIO, request_id: str) -> list[dict]:
    """The JSON log events of one request so far."""
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("request_id") == request_id]


async def until(predicate, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


class ExplodingEngine(FakeEngine):
    """A bug in the inference path for texts containing 'explode'; normal answers otherwise."""

    async def detect_pii(self, text, deadline=None):
        if "explode" in text:
            raise RuntimeError(f"unexpected failure on {text}")
        return await super().detect_pii(text)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_unexpected_error_is_answered_on_its_stream_only(start, policy):
    metrics = Metrics()
    sc = await start(make_config(failure={"inference": policy}), engine=ExplodingEngine(delay_s=0.05), metrics=metrics)
    broken, healthy = await asyncio.gather(
        chat_request(sc.ext_proc, chat_body("please explode"), request_id="broken-1"),
        chat_request(sc.ext_proc, chat_body("Solve the integral, mail bob@example.com"), request_id="ok"),
    )
    # A body the sidecar failed on was not inspected: refused in either failure mode, never forwarded.
    assert immediate(broken[1])[0] == 503
    assert set_headers(broken[1])["x-router-reason"] == "internal_error"
    counted = {"action": "rejected", "category": "none", "model": "none"}
    assert metrics.registry.get_sample_value("sidecar_requests_total", counted) == 1
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": "internal_error"}) == 1
    assert set_headers(healthy[1])["x-selected-model"] == "math-expert"
    assert set_headers(healthy[1])["x-router-action"] == "mask"


async def test_a_cancelled_stream_does_not_disturb_a_concurrent_one(start):
    engine = FakeEngine(delay_s=0.1)
    sc = await start(engine=engine)
    doomed = Exchange(sc.ext_proc)
    await doomed.send(headers_msg(request_id="doomed-1"))
    await doomed.call.write(body_msg(chat_body("Solve the integral.")))
    await asyncio.wait_for(engine.called.wait(), 5)  # the doomed stream is in the engine when it is cancelled
    healthy = asyncio.ensure_future(chat_request(sc.ext_proc, chat_body("The court ruled."), request_id="ok"))
    doomed.call.cancel()
    _, resp = await healthy
    assert set_headers(resp)["x-selected-model"] == "humanities-expert"
    _, again = await chat_request(sc.ext_proc, chat_body("Which gene encodes it?"))
    assert set_headers(again)["x-selected-model"] == "science-expert"


# --- every phase, every mode -------------------------------------------------------------------------------


async def test_trailers_and_response_phases_get_typed_answers(start):
    sc = await start()
    answers = await run_stream(sc.ext_proc, [headers_msg(), body_msg(chat_body("Solve it.")), *other_phase_msgs()])
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers", "request_body", "request_trailers", "response_headers", "response_body",
        "response_trailers"]
    for a in answers[2:]:
        assert not set_headers(a)


async def test_other_paths_answer_every_phase_and_only_bodies_are_scanned(start):
    metrics = Metrics()
    sc = await start(metrics=metrics)
    [headers] = await run_stream(sc.ext_proc, [headers_msg("/v1/models", end_of_stream=True)])
    assert headers.WhichOneof("response") == "request_headers" and not set_headers(headers)
    await until(lambda: metrics.registry.get_sample_value("sidecar_active_streams") == 0)
    assert metrics.registry.get_sample_value("sidecar_request_errors_total", {"reason": "no_body"}) is None
    answers = await run_stream(sc.ext_proc, [headers_msg("/v1/embeddings"),
                                             body_msg(b'{"model": "e", "input": "mail bob@example.com"}'),
                                             *other_phase_msgs()])
    assert len(answers) == 6
    assert new_body(answers[1]) == b'{"model": "e", "input": "mail [EMAIL_ADDRESS]"}'
    assert "x-selected-model" not in set_headers(answers[1])
    assert set_headers(answers[1])["x-router-reason"] == "unrouted"
    [_, refused] = await run_stream(sc.ext_proc, [headers_msg("/upload"), body_msg(b"\x00 not json")])
    assert immediate(refused)[0] == 400


@pytest.mark.parametrize("path", ["//v1/chat/completions", "/v1/./chat/completions", "/v1/chat%2Fcompletions",
                                  "/v1/chat/completions/?x=1", "/x/../v1/chat/completions"])
async def test_paths_a_backend_would_route_to_chat_are_chat(start, path):
    sc = await start()
    [_, resp] = await run_stream(sc.ext_proc, [headers_msg(path), body_msg(chat_body("Solve the integral."))])
    assert set_headers(resp)["x-selected-model"] == "math-expert"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", b'{"model": "auto", "input": [{"role": "user", "content": "Solve the integral, bob@example.com"}]}'),
    ("/v1/messages", b'{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", '
                     b'"text": "Solve the integral, bob@example.com"}]}]}'),
])
async def test_responses_and_messages_apis_are_routed_and_masked(start, path, body):
    sc = await start()
    [_, resp] = await run_stream(sc.ext_proc, [headers_msg(path), body_msg(body)])
    assert set_headers(resp)["x-selected-model"] == "math-expert"
    out = new_body(resp)
    assert b"bob@example.com" not in out and b"[EMAIL_ADDRESS]" in out and b'"model": "math-expert"' in out


@pytest.mark.parametrize("path", ["/v1/chat/completions?user=bob%40example.com", "/v1/models?card=4111+1111+1111+1111",
                                  "/v1/files?ip=10.1.2.3", "/v1/users/bob@example.com/chat",
                                  "/v1/cards/4246374584469162/balance", "/v1/chat/completions?customer=Margaret%20Sanders",
                                  "/v1/chat/completions?phone=4155550123", "/v1/x?card=4111.1111.1111.1111",
                                  "/v1/x?ssn=536222026"])
async def test_a_url_whose_query_carries_personal_data_is_refused(start, path):
    sc = await start()
    [resp] = await run_stream(sc.ext_proc, [headers_msg(path)])
    status, error = immediate(resp)
    assert status == 400 and error["error"]["code"] == "pii_in_url"
    assert "example.com" not in error["error"]["message"] and "4111" not in error["error"]["message"]
    [ok] = await run_stream(sc.ext_proc, [headers_msg("/v1/models?limit=10", end_of_stream=True)])
    assert ok.WhichOneof("response") == "request_headers"


async def test_personal_data_in_a_non_protocol_header_is_refused_and_protocol_headers_are_not_read(start):
    sc = await start()
    for extra in ({"x-user-email": "robert.johnson@example.com"}, {"x-card": "4111 1111 1111 1111"},
                  {"x-request-id": "robert.johnson@example.com"}, {"x-customer-card": "4111_1111_1111_1111"}):
        [resp] = await run_stream(sc.ext_proc, [headers_msg(extra=extra)])
        status, error = immediate(resp)
        assert status == 400 and error["error"]["code"] == "pii_in_header" and "example.com" not in error["error"]["message"]
    fine = {"x-forwarded-for": "10.1.2.3", "user-agent": "Mozilla/5.0 Chrome/120.0.0.0", "x-title": "My App 2",
            "x-trace-start": "1700000000123", "x-customer-tier": "2", "x-account-id": "123456789012",
            "x-telemetry-session": "1733370000", "x-mobile-app-build": "20241205", "x-cell-id": "104729",
            "x-trace-id": "00-75010a09252c427b9dc589e906ac7a1f-66462903209479f2-01",
            "x-session-id": "63730581-4734-4109-aa1c-5af194ccf707", "x-object-id": "38921470418701d41fab461a"}
    [ok] = await run_stream(sc.ext_proc, [headers_msg("/v1/models", extra=fine, end_of_stream=True)])
    assert ok.WhichOneof("response") == "request_headers"


async def test_an_unknown_content_encoding_is_refused_with_415(start):
    sc = await start()
    [_, resp] = await run_stream(sc.ext_proc, [headers_msg(extra={"content-encoding": "br"}),
                                               body_msg(chat_body("hi"))])
    assert immediate(resp)[0] == 415


async def test_observability_mode_messages_get_no_answer(start):
    sc = await start()
    ex = Exchange(sc.ext_proc)
    assert await ex.send(headers_msg(observability=True)) is None
    assert await ex.send(body_msg(chat_body("Solve it."), observability=True)) is None
    assert await ex.close() is None


async def test_body_without_headers_uses_the_path_attribute(start):
    sc = await start()
    msg = body_msg(chat_body("Solve it."))
    msg.attributes["envoy.filters.http.ext_proc"].fields["request.path"].string_value = CHAT_PATH
    [resp] = await run_stream(sc.ext_proc, [msg])
    assert set_headers(resp)["x-selected-model"] == "math-expert"
    [resp] = await run_stream(sc.ext_proc, [body_msg(chat_body("Solve it."))])
    assert not set_headers(resp)


# --- concurrency -------------------------------------------------------------------------------------------


async def test_32_concurrent_streams_each_get_their_own_answer(start):
    sc = await start(engine=FakeEngine(delay_s=0.01))
    topics = [("Solve the equation", "math-expert"), ("The court and the contract", "humanities-expert"),
              ("The enzyme in the cell", "science-expert")]
    cases = []
    for i in range(32):
        topic, model = topics[i % 3]
        text = f"{topic} number {i}; write to user{i}@example.com"
        cases.append((i, text, model))
    results = await asyncio.gather(*(chat_request(sc.ext_proc, chat_body(t), request_id=f"r{i}")
                                     for i, t, _ in cases))
    for (i, _, model), (_, resp) in zip(cases, results, strict=True):
        body = new_body(resp)
        assert set_headers(resp)["x-selected-model"] == model
        assert messages(body)[0]["content"] == f"{topics[i % 3][0]} number {i}; write to [EMAIL_ADDRESS]"
        assert set_headers(resp)["content-length"] == str(len(body))


# --- observability -----------------------------------------------------------------------------------------


async def test_one_log_event_per_request_with_fields_and_no_text(start):
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info"), stream)
    sc = await start()
    await chat_request(sc.ext_proc, chat_body("Solve it and mail jane@example.org"), request_id="req-42",
                       path=CHAT_PATH + "?key=secret-key")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 1
    event = requests[0]
    assert event["request_id"] == "req-42"
    assert event["path"] == CHAT_PATH
    assert event["category"] == "math" and event["model"] == "math-expert" and event["action"] == "mask"
    assert event["pii_types"] == ["EMAIL_ADDRESS"] and event["pii_counts"] == {"EMAIL_ADDRESS": 1}
    assert event["body_bytes"] > 0 and "total" in event["timings"]
    assert "jane@example.org" not in stream.getvalue()
    assert "secret-key" not in stream.getvalue()
    assert "Solve it" not in stream.getvalue()


async def test_requests_are_counted_by_action_category_and_model(start):
    metrics = Metrics()
    sc = await start(metrics=metrics)
    await chat_request(sc.ext_proc, chat_body("Solve it, I am John Smith"))
    await chat_request(sc.ext_proc, b"not json")
    await chat_request(sc.ext_proc, chat_body("Solve it", model="client-choice-1"))
    await chat_request(sc.ext_proc, chat_body("Solve it", model="client-choice-2"))
    get = metrics.registry.get_sample_value
    assert get("sidecar_requests_total", {"action": "mask", "category": "math", "model": "math-expert"}) == 1
    assert get("sidecar_pii_entities_total", {"type": "PERSON"}) == 1
    assert get("sidecar_requests_total", {"action": "rejected", "category": "none", "model": "none"}) == 1
    assert get("sidecar_requests_total", {"action": "allow", "category": "none", "model": "other"}) == 2
    assert get("sidecar_active_streams") == 0


async def test_stream_errors_are_not_grpc_errors(start):
    """Envoy turns a failed stream into a 500 (or skips the sidecar): every answer must be a message."""
    sc = await start(engine=ExplodingEngine())
    ex = Exchange(sc.ext_proc)
    await ex.send(headers_msg())
    resp = await ex.send(body_msg(chat_body("explode")))
    assert immediate(resp)[0] == 503
    assert await ex.close() is None
    assert await ex.call.code() == grpc.StatusCode.OK


# --- the real Engine on the tiny untrained models (structure, not labels) -----------------------------------


@pytest.fixture
def real_config(tiny_category_dir, tiny_pii_dir):
    """Tiny untrained models with short windows, so a few hundred characters already need many windows."""
    def _config(**sections):
        models = {"category": {"path": str(tiny_category_dir), "max_length": 32, "stride": 0},
                  "pii": {"path": str(tiny_pii_dir), "max_length": 32, "stride": 8}}
        base = {"models": models, "routing": {"confidence_threshold": 0.0},
                "failure": {"timeout_ms": 30000, "max_timeout_ms": 30000}, "batching": {"max_wait_ms": 5}}
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value}
        return make_config(**base)
    return _config


async def start_real(config, metrics):
    from sidecar.app import load_engine

    return await start_server(config, load_engine, metrics=metrics)


async def test_real_engine_decides_through_the_stream_with_long_text_windowing(real_config):
    metrics = Metrics()
    sc = await start_real(real_config(), metrics)
    try:
        text = "Please solve this question about cells and contracts. " * 40
        _, resp = await chat_request(sc.ext_proc, chat_body(text))
        headers = set_headers(resp)
        assert headers["x-router-category"] in ("biology", "law", "math")
        assert headers["x-selected-model"] == make_config().routing.categories[headers["x-router-category"]]
        assert 0.0 <= float(headers["x-router-confidence"]) <= 1.0
        assert headers["x-router-action"] in ("allow", "mask")
        body = new_body(resp)
        assert headers["content-length"] == str(len(body))
        assert json.loads(body)["model"] == headers["x-selected-model"]
        windows = metrics.registry.get_sample_value("sidecar_batch_size_sum", {"model": "pii"})
        assert windows > 10, "a 2,000-character text in 32-token windows must be read in many windows"
        assert metrics.registry.get_sample_value("sidecar_batch_size_sum", {"model": "category"}) == 1, \
            "the category model reads the first window only"
    finally:
        await stop_server(sc)


async def test_real_engine_masks_on_exact_code_point_offsets(real_config):
    # The card number is found by the Luhn recognizer whatever the untrained model says, so masking is certain.
    sc = await start_real(real_config(), Metrics())
    try:
        card = "4111 1111 1111 1111"
        text = f"我的名字是张伟 😀 café, карта {card}, спасибо. " * 2
        _, resp = await chat_request(sc.ext_proc, chat_body(text))
        answer = await sc.router_api.Classify(router_pb2.ClassifyRequest(text=text))
        assert answer.action == "mask"
        cards = [e for e in answer.pii if e.label == "CREDIT_CARD"]
        # The untrained model may widen a card span leftwards (union is the safe merge), never misplace it:
        # each span ends exactly on a card, counted in code points despite the multi-byte text before it.
        assert len(cards) == 2 and all(text[e.start:e.end].endswith(card) for e in cards)
        body = new_body(resp)
        assert messages(body)[0]["content"] == answer.masked_text
        assert card not in body.decode("utf-8")
        assert set_headers(resp)["content-length"] == str(len(body))
        assert "CREDIT_CARD" in set_headers(resp)["x-router-pii"].split(",")
    finally:
        await stop_server(sc)


async def test_real_engine_32_concurrent_streams_are_batched_and_each_gets_its_own_answer(real_config):
    metrics = Metrics()
    sc = await start_real(real_config(pii={"default_policy": {"action": "allow"}}), metrics)
    try:
        texts = [f"Question {i}: {topic} marker-{i}" for i, topic in enumerate(
            ["how do enzymes fold", "who signs the contract", "what is the integral of x"] * 11)][:32]
        solo = [await sc.router_api.Classify(router_pb2.ClassifyRequest(text=t)) for t in texts]
        solo_batches = metrics.registry.get_sample_value("sidecar_batch_size_count", {"model": "category"})
        results = await asyncio.gather(*(chat_request(sc.ext_proc, chat_body(t), request_id=f"r{i}")
                                         for i, t in enumerate(texts)))
        for text, alone, (_, resp) in zip(texts, solo, results, strict=True):
            headers = set_headers(resp)
            assert messages(new_body(resp))[0]["content"] == text
            assert float(headers["x-router-confidence"]) == pytest.approx(alone.confidence, abs=2e-3)
        get = metrics.registry.get_sample_value
        batches = get("sidecar_batch_size_count", {"model": "category"}) - solo_batches
        assert batches < 32, "concurrent streams should share forward passes"
    finally:
        await stop_server(sc)
