"""The answer scan (``response_pii``) without Envoy: whole answers, streamed answers through the scan window,
blocking, and what happens when an answer cannot be scanned. The FakeEngine finds emails, card numbers,
phone numbers and a few names (tests.fakes), so every expectation follows from the text."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.answers import (
    NOT_INSPECTED,
    PII_IN_ANSWER,
    Answer,
    AnswerRefused,
    AnswerScan,
    AnswerStream,
    release_point,
)
from sidecar.config import load_config, parse_config
from sidecar.decisions import DecisionMaker
from sidecar.errors import ConfigError, InferenceError
from sidecar.pseudonyms import Pseudonyms
from sidecar.results import Span
from sidecar.vocabulary import Kind
from tests.fakes import FakeEngine
from tests.test_pseudonyms import events_of, sse

EMAIL, CARD, NAME = "leak@example.com", "4111 1111 1111 1111", "John Smith"
SAID = f"Sure. Ask {NAME} at {EMAIL}, or pay with {CARD}; that settles it for the whole group today."
MASKED = "Sure. Ask [PERSON] at [EMAIL_ADDRESS], or pay with [CREDIT_CARD]; that settles it for the whole group today."


def scan_for(response_pii: str = "mask", window: int = 40, engine: FakeEngine | None = None,
             protected: Pseudonyms | None = None, **failure) -> AnswerScan:
    config = parse_config({"routing": {"default_model": "small"}, "failure": failure,
                           "pii": {"default_policy": {"response_pii": response_pii}}})
    decider = DecisionMaker(config, engine or FakeEngine())
    return AnswerScan(decider, decider.answer_policy("small"), window, protected)


def chat_answer(text: str) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "small", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()


def chat_stream(text: str, size: int) -> bytes:
    events = [{"id": "c1", "choices": [{"index": 0, "delta": {"content": text[i:i + size]}, "finish_reason": None}]}
              for i in range(0, len(text), size)]
    return sse(*events, {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")


def streamed_text(out: bytes) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events_of(out)
                   if isinstance(e, dict) and "choices" in e)


async def run(stream: AnswerStream, data: bytes, size: int) -> bytes:
    out = [await stream.feed(data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(out) + await stream.finish()


# --- whole answers -------------------------------------------------------------------------------------------

async def test_a_json_answer_is_masked_and_its_identifiers_are_left_alone():
    scan = scan_for()
    out = json.loads(await scan.body(chat_answer(SAID)))
    assert out["choices"][0]["message"]["content"] == MASKED
    assert scan.masked == {"PERSON": 1, "EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}
    assert (out["id"], out["model"], out["choices"][0]["finish_reason"]) == ("chatcmpl-1", "small", "stop")


async def test_what_the_request_carried_comes_back_and_only_new_data_is_masked():
    p = Pseudonyms()
    mine = p.placeholder("EMAIL_ADDRESS", "me@example.org")
    answer = Answer(p, scan_for(protected=p), Kind.CHAT, "application/json", None, 1 << 20)
    out = await answer.chunk(chat_answer(f"Noted, {mine}. Also write to {EMAIL}."), end=True)
    assert json.loads(out)["choices"][0]["message"]["content"] == "Noted, me@example.org. Also write to [EMAIL_ADDRESS]."


async def test_a_json_answer_with_personal_data_under_block_is_refused_by_type():
    with pytest.raises(AnswerRefused) as refused:
        await scan_for("block").body(chat_answer(SAID))
    assert refused.value.code == PII_IN_ANSWER and refused.value.status == 502
    assert set(refused.value.types) == {"CREDIT_CARD", "EMAIL_ADDRESS", "PERSON"}
    assert EMAIL not in refused.value.message and NAME not in refused.value.message


async def test_a_block_entity_blocks_the_answer_even_when_the_scan_masks():
    config = parse_config({"routing": {"default_model": "small"}, "pii": {"default_policy": {
        "response_pii": "mask", "block_entities": ["CREDIT_CARD"]}}})
    decider = DecisionMaker(config, FakeEngine())
    with pytest.raises(AnswerRefused):
        await AnswerScan(decider, decider.answer_policy("small"), 40).body(chat_answer(SAID))


async def test_an_answer_that_cannot_be_scanned_is_withheld_under_fail_closed():
    scan = scan_for(engine=FakeEngine(pii_error=InferenceError("model down")))
    answer = Answer(None, scan, Kind.CHAT, "application/json", None, 1 << 20)
    assert await answer.chunk(chat_answer(SAID), end=True) == b""
    assert answer.refused is not None and answer.refused.code == NOT_INSPECTED and answer.refused.status == 503


async def test_an_answer_scan_may_take_the_capped_deadline_whatever_its_size():
    engine = FakeEngine()
    now = asyncio.get_running_loop().time()
    await scan_for(engine=engine).body(chat_answer("A short answer."))
    assert 2.5 < engine.deadlines[-1] - now < 2.7  # failure.max_timeout_ms, not 250 ms for a small body


async def test_under_fail_open_a_failed_scan_still_masks_what_the_recognizers_find():
    scan = scan_for(engine=FakeEngine(pii_error=InferenceError("model down")), inference="fail_open")
    out = json.loads(await scan.body(chat_answer(f"Write to {EMAIL}.")))
    assert out["choices"][0]["message"]["content"] == "Write to [EMAIL_ADDRESS]."


@pytest.mark.parametrize(("encoding", "chunks"), [("gzip", [b"\x1f\x8b..."]), (None, [b"{" + b" " * 60, b"}"])])
async def test_an_answer_too_large_or_encoded_is_withheld_when_scanned(encoding, chunks):
    answer = Answer(None, scan_for(), Kind.CHAT, "application/json", encoding, max_bytes=50)
    out = [await answer.chunk(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert b"".join(out) == b"" and answer.refused is not None and answer.refused.code == NOT_INSPECTED


async def test_without_a_scan_an_oversized_answer_passes_as_it_came():
    answer = Answer(Pseudonyms(), None, Kind.CHAT, "application/json", None, max_bytes=50)
    chunks = [b"{" + b" " * 60, b"}"]
    out = [await answer.chunk(c, end=i == 1) for i, c in enumerate(chunks)]
    assert b"".join(out) == b"".join(chunks) and answer.refused is None and answer.given_up == "too_large"


# --- streamed answers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [32, 40, 48, 64])
@pytest.mark.parametrize("size", [1, 3, 5, 13, 40])
async def test_a_streamed_answer_cut_anywhere_is_masked_whole(size, window):
    scan = scan_for(window=window)
    out = await run(AnswerStream(Pseudonyms(), scan, Kind.CHAT), chat_stream(SAID, size), 7)
    assert streamed_text(out) == MASKED
    assert EMAIL.encode() not in out and b"1111 1111" not in out and NAME.encode() not in out
    assert scan.masked == {"PERSON": 1, "EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}
    assert events_of(out)[-1] == "[DONE]"


async def test_a_stream_holds_back_at_most_its_window_per_text():
    window = 40
    stream = AnswerStream(Pseudonyms(), scan_for(window=window), Kind.CHAT)
    text = "word " * 60
    sent = ""
    for i in range(len(text)):
        event = sse({"choices": [{"index": 0, "delta": {"content": text[i]}, "finish_reason": None}]})
        sent += streamed_text(await stream.feed(event))
        assert text.startswith(sent)
        assert i + 1 - len(sent) < window, (i, len(sent))


async def test_the_requests_placeholders_are_restored_in_a_scanned_stream():
    p = Pseudonyms()
    mine = p.placeholder("EMAIL_ADDRESS", "me@example.org")
    text = f"Noted, {mine}; I will also copy {EMAIL} on the thread as you asked."
    for size in (1, 4, 9):
        out = await run(AnswerStream(p, scan_for(protected=p), Kind.CHAT), chat_stream(text, size), 5)
        assert streamed_text(out) == "Noted, me@example.org; I will also copy [EMAIL_ADDRESS] on the thread as you asked."


async def test_streamed_tool_call_arguments_are_masked_and_stay_valid_json():
    args = json.dumps({"to": EMAIL, "note": "see you"})
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 3]}}]},
                            "finish_reason": None}]} for i in range(0, len(args), 3)]
    data = sse(*events, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, "[DONE]")
    out = await run(AnswerStream(Pseudonyms(), scan_for(window=32), Kind.CHAT), data, 11)
    got = "".join(e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                  for e in events_of(out) if isinstance(e, dict) and e["choices"][0]["delta"].get("tool_calls"))
    assert json.loads(got) == {"to": "[EMAIL_ADDRESS]", "note": "see you"}


async def test_a_final_event_that_repeats_the_whole_text_is_masked_too():
    done = {"type": "response.output_text.done", "item_id": "m1", "output_index": 0, "content_index": 0, "text": SAID}
    deltas = [{"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "content_index": 0,
               "delta": SAID[i:i + 6]} for i in range(0, len(SAID), 6)]
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.RESPONSES), sse(*deltas, done, name=True), 64)
    events = events_of(out)
    assert "".join(e["delta"] for e in events if e["type"].endswith(".delta")) == MASKED
    assert events[-1]["text"] == MASKED


async def test_delta_events_are_scanned_through_the_window_not_one_model_call_each():
    engine = FakeEngine()
    deltas = [{"type": "response.output_text.delta", "item_id": "msg_0123456789", "output_index": 0,
               "content_index": 0, "obfuscation": "q9XkLm", "sequence_number": i, "delta": SAID[i:i + 2]}
              for i in range(0, len(SAID), 2)]
    out = await run(AnswerStream(Pseudonyms(), scan_for(window=40, engine=engine), Kind.RESPONSES),
                    sse(*deltas, name=True), 300)
    assert "".join(e["delta"] for e in events_of(out)) == MASKED
    assert engine.calls["detect_pii"] <= len(SAID) // 20 + 2 < len(deltas)


async def test_a_blocked_stream_ends_with_one_error_event_and_sends_nothing_held():
    stream = AnswerStream(Pseudonyms(), scan_for("block"), Kind.MESSAGES)
    deltas = [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": SAID[i:i + 4]}}
              for i in range(0, len(SAID), 4)]
    out = await run(stream, sse(*deltas, {"type": "content_block_stop", "index": 0}, name=True), 9)
    assert NAME.encode() not in out and EMAIL.encode() not in out
    blocks = out.decode().strip().split("\n\n")
    assert blocks[-1].startswith("event: error\n") and json.loads(blocks[-1].split("data: ", 1)[1])["type"] == "error"
    assert sum(b.startswith("event: error") for b in blocks) == 1
    assert stream.stopped is not None and stream.stopped.code == PII_IN_ANSWER
    assert await stream.feed(sse(deltas[0], name=True)) == b""  # the rest of the backend's stream goes nowhere


async def test_a_stream_that_cannot_be_scanned_ends_with_an_error_event():
    stream = AnswerStream(Pseudonyms(), scan_for(engine=FakeEngine(pii_error=InferenceError("down"))), Kind.CHAT)
    out = await run(stream, chat_stream(SAID, 5), 50)
    assert EMAIL.encode() not in out and stream.stopped.code == NOT_INSPECTED
    assert events_of(out)[-1]["error"]["code"] == NOT_INSPECTED


async def test_an_event_that_never_ends_is_refused_past_the_limit_when_scanned():
    stream = AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT, max_event_bytes=100)
    out = await stream.feed(b"data: " + b"x" * 200)
    assert stream.stopped.code == NOT_INSPECTED and b"xxx" not in out


# --- pieces --------------------------------------------------------------------------------------------------

def test_the_release_point_never_splits_a_span_or_a_placeholder():
    text = "one two three four five six seven eight nine ten"
    assert release_point(text, [], 10, []) == text.rindex(" ", 0, len(text) - 10) + 1
    at = text.index("seven")
    assert release_point(text, [Span("X", at - 2, at + 8, 1.0)], 10, []) == at + 8  # the whole span goes
    assert release_point(text, [], 10, [(at - 2, at + 8)]) == at - 2  # a placeholder waits whole
    assert release_point("short", [], 10, []) == 0


def test_response_pii_and_its_window_are_validated_and_ask_for_answers():
    base = {"routing": {"default_model": "small"}}
    assert not parse_config(base).pii.reads_answers
    config = parse_config({**base, "pii": {"policies": {"x": {"response_pii": "block"}}}})
    assert config.pii.reads_answers and not config.pii.pseudonymizes
    for bad in ({"default_policy": {"response_pii": "redact"}}, {"response_window_chars": 8}):
        with pytest.raises(ConfigError):
            parse_config({**base, "pii": bad})


def test_a_blocked_request_has_no_answer_policy_and_an_off_policy_none():
    assert asyncio.run(_decision(response_pii="mask")).answer_policy.action == "mask"
    assert asyncio.run(_decision(response_pii="off")).answer_policy is None
    assert asyncio.run(_decision(response_pii="mask", action="block", text=EMAIL)).answer_policy is None


async def _decision(text: str = "hello there", **policy):
    config = parse_config({"routing": {"default_model": "small"}, "pii": {"default_policy": policy}})
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": text}]}).encode()
    return await DecisionMaker(config, FakeEngine()).decide(body, Kind.CHAT)


def test_a_bare_yaml_off_means_off(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("routing: {default_model: small}\npii:\n  patterns: off\n  default_policy: {response_pii: off}\n")
    config = load_config(path)
    assert (config.pii.patterns, config.pii.default_policy.response_pii) == ("off", "off")


# --- what a backend controls: framing, fields, structure (found by an adversarial review) ---------------------

def chat_event(content: str, **choice) -> dict:
    return {"id": "c1", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None, **choice}]}


@pytest.mark.parametrize("frame", [
    lambda e: b"event: delta\r" + e,  # a CR alone ends a line too
    lambda e: b": keep-alive\r\n" + e.replace(b"\n", b"\r"),  # CR-only framing throughout
    lambda e: b"\xef\xbb\xbf" + e,  # a byte-order mark before the first event
])
async def test_every_standard_line_ending_and_a_bom_are_read_before_anything_passes(frame):
    data = frame(sse(chat_event(SAID)) + b"data: [DONE]\n\n")
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT), data, 9)
    assert EMAIL.encode() not in out and NAME.encode() not in out
    assert streamed_text(out.replace(b"\r", b"\n")) == MASKED


async def test_under_a_scan_only_json_data_goes_on_ids_comments_and_odd_event_names_do_not():
    data = b"id: " + EMAIL.encode() + b"\nevent: " + NAME.encode() + b"\n: " + CARD.encode() + b"\n" + sse(chat_event("ok"))
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT), data + b"data: [DONE]\n\n", 50)
    assert EMAIL.encode() not in out and NAME.encode() not in out and CARD.encode() not in out


async def test_data_that_is_not_json_withholds_a_scanned_stream():
    stream = AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT)
    out = await run(stream, b'data: "Mail leak\\u0040example.com"\n\ndata: [DONE]\n\n', 64)
    assert stream.stopped.code == NOT_INSPECTED and b"leak" not in out


@pytest.mark.parametrize("body", [
    b'{"choices": [{"message": {"content": "Write to leak\\u0040example.com"}}], "choices": []}',  # repeated key
    b'[{"content": "Write to leak\\u0040example.com"}]',  # not an object
])
async def test_json_the_reader_refuses_is_withheld_not_scanned_as_text(body):
    with pytest.raises(AnswerRefused) as refused:
        await scan_for().body(body)
    assert refused.value.code == NOT_INSPECTED


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain"])
async def test_events_sent_under_another_content_type_are_scanned_as_a_stream(content_type):
    answer = Answer(None, scan_for(), Kind.CHAT, content_type, None, 1 << 20)
    out = await answer.chunk(chat_stream(SAID, 4), end=True)
    assert streamed_text(out) == MASKED


@pytest.mark.parametrize("choice", [
    {"delta": {"refusal": SAID}},
    {"delta": {"reasoning": SAID}},
    {"delta": {}, "text": SAID},  # legacy completions with an empty delta
])
async def test_every_streamed_text_field_is_a_scanned_channel(choice):
    data = sse({"choices": [{"index": 0, "finish_reason": None, **choice}]}, "[DONE]")
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT), data, 13)
    assert EMAIL.encode() not in out and NAME.encode() not in out


async def test_personal_data_in_an_identifier_withholds_the_answer():
    with pytest.raises(AnswerRefused):
        await scan_for().body(json.dumps({"id": EMAIL, "choices": [{"message": {"content": "ok"}}]}).encode())
    stream = AnswerStream(Pseudonyms(), scan_for(), Kind.RESPONSES)
    event = {"type": "response.output_text.delta", "item_id": EMAIL, "output_index": 0, "content_index": 0, "delta": "hi"}
    out = await run(stream, sse(event, name=True), 64)
    assert stream.stopped.code == PII_IN_ANSWER and EMAIL.encode() not in out


async def test_a_window_without_whitespace_is_held_not_cut_inside_a_word():
    text = "Mail:johnsmith82@examplecompanyx.com now"
    out = await run(AnswerStream(Pseudonyms(), scan_for(window=32), Kind.CHAT), chat_stream(text, 1), 5)
    assert streamed_text(out) == "Mail:[EMAIL_ADDRESS] now"


async def test_escaped_characters_in_streamed_arguments_withhold_what_the_scan_cannot_read():
    args = '{"to": "leak\\u0040example.com"}'
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 5]}}]},
                            "finish_reason": None}]} for i in range(0, len(args), 5)]
    stream = AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT)
    out = await run(stream, sse(*events, "[DONE]"), 40)
    assert stream.stopped.code == NOT_INSPECTED and b"leak" not in out


async def test_a_value_running_into_a_placeholder_is_masked_on_both_sides():
    p = Pseudonyms("_{type}_{n}_")  # word characters at both ends: an address can run into it
    mine = p.placeholder("PERSON", "Bob")
    out = json.loads(await scan_for(protected=p).body(chat_answer(f"Write to alice.{mine}.private@example.com now.")))
    assert out["choices"][0]["message"]["content"] == f"Write to [EMAIL_ADDRESS]{mine}[EMAIL_ADDRESS] now."


async def test_text_after_its_end_withholds_a_scanned_stream():
    events = [chat_event("Please call John"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              chat_event(" Smith tomorrow.")]
    stream = AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT)
    out = await run(stream, sse(*events, "[DONE]"), 200)
    assert stream.stopped.code == NOT_INSPECTED and b"Smith" not in out


async def test_held_text_goes_out_in_an_event_that_repeats_no_id_name_or_role():
    first = {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello! How can"},
                                      "finish_reason": None}]}
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.CHAT), sse(first, chat_event(" I help?"), "[DONE]"), 64)
    events = [e for e in events_of(out) if isinstance(e, dict)]
    assert sum(e["choices"][0]["delta"].get("role") == "assistant" for e in events) <= 1
    assert streamed_text(out) == "Hello! How can I help?"


async def test_an_error_event_lets_the_held_text_out_before_it():
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A partial answer."}}
    out = await run(AnswerStream(Pseudonyms(), scan_for(), Kind.MESSAGES), sse(delta, error, name=True), 64)
    blocks = out.decode().strip().split("\n\n")
    assert "A partial answer." in blocks[-2] and blocks[-1].startswith("event: error")
