"""Placeholders in the request, values back in the answer: JSON and streamed (SSE) answers of the three APIs."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.answers import AnswerStream
from sidecar.pseudonyms import (
    Pseudonyms,
    check_format,
    pseudonymize,
    restore_body,
)
from sidecar.results import Span

NAME, EMAIL = "Jane Roe", "jane@example.org"


def spans_of(text: str, *values: tuple[str, str]) -> list[Span]:
    return [Span(label, text.index(v), text.index(v) + len(v), 0.9) for label, v in values]


def test_placeholders_are_numbered_by_first_appearance_across_the_request_and_reused_for_a_value():
    texts = [f"I am {NAME}.", f"Write to {EMAIL} for {NAME}."]
    p = Pseudonyms()
    out = pseudonymize(texts, [spans_of(texts[0], ("PERSON", NAME)),
                               spans_of(texts[1], ("EMAIL_ADDRESS", EMAIL), ("PERSON", NAME))], p)
    assert out == ["I am <PERSON_1>.", "Write to <EMAIL_ADDRESS_2> for <PERSON_1>."]


def test_a_re_sent_history_gets_the_same_placeholders_on_the_next_turn():
    turn1 = [f"I am {NAME}."]
    turn2 = turn1 + ["The assistant answered.", f"Mail {EMAIL}, please."]
    first = pseudonymize(turn1, [spans_of(turn1[0], ("PERSON", NAME))], Pseudonyms())
    second = pseudonymize(turn2, [spans_of(turn2[0], ("PERSON", NAME)), [],
                                  spans_of(turn2[2], ("EMAIL_ADDRESS", EMAIL))], Pseudonyms())
    assert second[0] == first[0] == "I am <PERSON_1>."
    assert second[1] is None and second[2] == "Mail <EMAIL_ADDRESS_2>, please."


def test_a_placeholder_the_client_wrote_itself_is_never_issued_nor_restored():
    text = f"Literally '<PERSON_1>' in my text, and I am {NAME}."
    p = Pseudonyms(taken=text)
    [out] = pseudonymize([text], [spans_of(text, ("PERSON", NAME))], p)
    assert out == "Literally '<PERSON_1>' in my text, and I am <PERSON_2>."
    assert p.restore("<PERSON_1> and <PERSON_2>") == f"<PERSON_1> and {NAME}"


def test_a_custom_format_is_used_and_bad_formats_are_refused():
    p = Pseudonyms(template=check_format("[[{type}#{n}]]"))
    assert p.placeholder("PERSON", NAME) == "[[PERSON#1]]"
    for bad in ("{type}_{n}", "<{n}_{type}>", "<{type}>", "<{type}_{n}{n}>", "<{type}_{n}7>"):
        with pytest.raises(ValueError):
            check_format(bad)


def test_a_json_answer_gets_the_values_back_in_text_and_tool_call_arguments():
    p = Pseudonyms()
    person = p.placeholder("PERSON", 'Dwayne "The Rock" Johnson')
    mail = p.placeholder("EMAIL_ADDRESS", EMAIL)
    answer = {"choices": [{"message": {
        "content": f"Dear {person}, we wrote to {mail}.",
        "tool_calls": [{"function": {"name": "send", "arguments": json.dumps({"to": mail, "name": person})}}]}}]}
    out = json.loads(restore_body(json.dumps(answer).encode(), p))
    message = out["choices"][0]["message"]
    assert message["content"] == f'Dear Dwayne "The Rock" Johnson, we wrote to {EMAIL}.'
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "to": EMAIL, "name": 'Dwayne "The Rock" Johnson'}


# --- streams -----------------------------------------------------------------------------------------------


def sse(*events: dict | str, name: bool = False) -> bytes:
    out = []
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        head = f"event: {e['type']}\n" if name and isinstance(e, dict) else ""
        out.append(f"{head}data: {data}\n\n")
    return "".join(out).encode()


def chat_chunks(pieces: list[str]) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    return sse(*events, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]")


def run_stream(stream: bytes, restorer: AnswerStream, cuts: list[int]) -> bytes:
    async def run() -> bytes:
        out, at = [], 0
        for cut in [*cuts, len(stream)]:
            out.append(await restorer.feed(stream[at:cut]))
            at = cut
        return b"".join(out) + await restorer.finish()

    return asyncio.run(run())


def events_of(stream: bytes) -> list[dict | str]:
    out = []
    for block in stream.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            out.append(data[0] if data[0] == "[DONE]" else json.loads(data[0]))
    return out


def chat_text(stream: bytes) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events_of(stream) if isinstance(e, dict))


def test_a_placeholder_split_between_two_events_at_every_offset_is_restored():
    p = Pseudonyms()
    person = p.placeholder("PERSON", NAME)
    text = f"Dear {person}, hello."
    at = text.index(person)
    for cut in range(at, at + len(person) + 1):
        out = run_stream(chat_chunks([text[:cut], text[cut:]]), AnswerStream(p), [])
        assert chat_text(out) == f"Dear {NAME}, hello.", cut
        assert events_of(out)[-1] == "[DONE]"


def test_chunk_boundaries_at_every_byte_of_the_stream_change_nothing():
    p = Pseudonyms()
    person, mail = p.placeholder("PERSON", NAME), p.placeholder("EMAIL_ADDRESS", EMAIL)
    stream = chat_chunks(["Dear <PER", f"SON_1>, mail {mail[:5]}", f"{mail[5:]} now, {person}"])
    for cut in range(1, len(stream)):
        out = run_stream(stream, AnswerStream(p), [cut])
        assert chat_text(out) == f"Dear {NAME}, mail {EMAIL} now, {NAME}", cut


def test_at_most_a_partial_placeholder_is_held_back():
    p = Pseudonyms()
    p.placeholder("EMAIL_ADDRESS", EMAIL)
    restorer = AnswerStream(p)
    out = asyncio.run(restorer.feed(sse({"choices": [{"index": 0, "delta": {"content": "Hello there, <EMAIL_AD"}}]})))
    shown = chat_text(out)
    assert shown == "Hello there, "  # "<EMAIL_AD" waits: it may be the start of a placeholder
    out = asyncio.run(restorer.feed(sse({"choices": [{"index": 0, "delta": {"content": "x and more"}}]})))
    assert chat_text(out) == "<EMAIL_ADx and more"  # not a placeholder after all: let go at once


def test_tool_call_arguments_streamed_in_pieces_are_restored_as_valid_json():
    p = Pseudonyms()
    person = p.placeholder("PERSON", 'Ann "A" Lee')
    args = json.dumps({"name": person})
    pieces = [args[:12], args[12:]]
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}}]}
              for a in pieces]
    out = run_stream(sse(*events, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, "[DONE]"),
                     AnswerStream(p), [])
    text = "".join(e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                   for e in events_of(out) if isinstance(e, dict) and e["choices"][0]["delta"].get("tool_calls"))
    assert json.loads(text) == {"name": 'Ann "A" Lee'}


def test_anthropic_messages_stream_is_restored_block_by_block():
    p = Pseudonyms()
    person = p.placeholder("PERSON", NAME)
    events = [{"type": "message_start", "message": {"content": []}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi " + person[:4]}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": person[4:] + "!"}},
              {"type": "content_block_stop", "index": 0},
              {"type": "message_stop"}]
    out = events_of(run_stream(sse(*events, name=True), AnswerStream(p), []))
    text = "".join(e["delta"]["text"] for e in out if e["type"] == "content_block_delta")
    assert text == f"Hi {NAME}!"


def test_a_held_piece_goes_out_before_the_event_that_ends_its_block():
    p = Pseudonyms()
    p.placeholder("PERSON", NAME)
    events = [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ends with <PERS"}},
              {"type": "content_block_stop", "index": 0}]
    out = events_of(run_stream(sse(*events, name=True), AnswerStream(p), []))
    assert [e["type"] for e in out] == ["content_block_delta", "content_block_delta", "content_block_stop"]
    assert out[0]["delta"]["text"] + out[1]["delta"]["text"] == "ends with <PERS"


def test_responses_api_stream_deltas_and_the_final_response_are_restored():
    p = Pseudonyms()
    person = p.placeholder("PERSON", NAME)
    delta = {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "content_index": 0}
    events = [{**delta, "delta": "Dear <"}, {**delta, "delta": person[1:] + "."},
              {"type": "response.output_text.done", "item_id": "m1", "text": f"Dear {person}."},
              {"type": "response.completed", "response": {"output": [{"content": [{"text": f"Dear {person}."}]}]}}]
    out = events_of(run_stream(sse(*events, name=True), AnswerStream(p), []))
    assert "".join(e["delta"] for e in out if e["type"] == "response.output_text.delta") == f"Dear {NAME}."
    assert out[-2]["text"] == f"Dear {NAME}."
    assert out[-1]["response"]["output"][0]["content"][0]["text"] == f"Dear {NAME}."


def test_two_requests_never_see_each_others_values():
    a, b = Pseudonyms(), Pseudonyms()
    assert a.placeholder("PERSON", "Ann") == b.placeholder("PERSON", "Bob") == "<PERSON_1>"
    assert a.restore("<PERSON_1>") == "Ann" and b.restore("<PERSON_1>") == "Bob"


def test_a_json_answer_with_a_number_python_cannot_write_back_keeps_it_and_stays_valid_json():
    p = Pseudonyms()
    person = p.placeholder("PERSON", 'Jane "JR" Roe')
    out = restore_body(b'{"content": "Hi ' + person.encode() + b'", "logprob": 1e400}', p)
    assert b"1e400" in out and json.loads(out)["content"] == 'Hi Jane "JR" Roe'
