"""Parsing OpenAI-style bodies and editing them byte-losslessly."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import (
    DuplicateKey,
    EmptyBody,
    InvalidModel,
    NoText,
    NotJson,
    NotObject,
    NotUtf8,
    RequestError,
    TooDeep,
)
from sidecar.request import encode_string, parse_body, rewrite

SECRET = "hunter2-secret"

WAV = "UklGRiQAAABXQVZFZm10IA=="  # how a WAV file begins
PDF = "JVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MKJVBERi0xLjQKJeLjz9MK"

MANY_FIELDS = (
    b'{\n  "stream" :true,"n":2,\t"model":  "auto",\r\n'
    b'  "messages": [\n'
    b'    {"role": "system", "content": "You help \\"Jane Doe\\" \\u00e9t\\u00e9 \\ud83d\\ude00."},\n'
    b'    {"role":"user","content":[{"type":"text","text":"Mail john@example.com please"},'
    b'{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"low"}}],'
    b'"name":"u1"}\n'
    b'  ],\n'
    b'  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",'
    b' "properties": {"x": {"type": "number", "enum": [1.0, 2e10, -0.5E-3]}}}}}],\n'
    b'  "response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": true, "schema": {}}},\n'
    b'  "logit_bias": {"50256": -100, "198": 5},   "temperature": 0.70,\n'
    b'  "x-vendor-ext": {"nested": [[1, [2, [3, {"deep": null}]]], [], {}], "unicode": "\\u4e2d\\u6587 \xe4\xb8\xad"},\n'
    b'  "unknown_key": [true, false, null, "\\/slash"]\n'
    b"}\n"
)


def field(parsed, text: str):
    [found] = [f for f in parsed.fields if f.text == text]
    return found


def test_round_trip_changes_only_model_and_masked_strings():
    parsed = parse_body(MANY_FIELDS, "chat")
    assert parsed.requested_model == "auto"
    system = field(parsed, 'You help "Jane Doe" été 😀.')
    user = field(parsed, "Mail john@example.com please")

    out = rewrite(MANY_FIELDS, parsed, "math-llm", {
        system.index: 'You help "[PERSON]" été 😀.',
        user.index: "Mail [EMAIL_ADDRESS] please",
    })

    expected = (
        MANY_FIELDS.replace(b'"model":  "auto"', b'"model":  "math-llm"')
        .replace(b'"You help \\"Jane Doe\\" \\u00e9t\\u00e9 \\ud83d\\ude00."',
                 '"You help \\"[PERSON]\\" été 😀."'.encode())
        .replace(b'"Mail john@example.com please"', b'"Mail [EMAIL_ADDRESS] please"')
    )
    assert out == expected
    before, after = json.loads(MANY_FIELDS), json.loads(out)
    for key in ("stream", "n", "tools", "response_format", "logit_bias", "temperature", "x-vendor-ext", "unknown_key"):
        assert after[key] == before[key]
    assert after["messages"][1]["content"][1] == before["messages"][1]["content"][1]


def test_every_string_is_scanned_except_structural_values_and_base64_media():
    parsed = parse_body(MANY_FIELDS, "chat")
    texts = parsed.texts()
    for scanned in ("u1", "中文 中", "/slash"):
        assert scanned in texts
    for field_name in ("x-vendor-ext", "unknown_key", "deep"):  # field names: checked, never masked
        assert field_name not in texts and field_name in parsed.structural
    for skipped in ("auto", "system", "user", "text", "image_url", "low", "function", "object", "number",
                    "json_schema", "data:image/png;base64,iVBORw0KGgo=", "messages", "content", "tools"):
        assert skipped not in texts


def test_rewrite_without_changes_is_byte_identical():
    parsed = parse_body(MANY_FIELDS, "chat")
    assert rewrite(MANY_FIELDS, parsed, None, {}) == MANY_FIELDS


def test_missing_model_is_inserted_as_the_first_key():
    body = b'  {"messages": [{"role": "user", "content": "hi"}], "stream": false}'
    parsed = parse_body(body, "chat")
    assert parsed.requested_model is None and parsed.model_span is None
    out = rewrite(body, parsed, "small", {})
    assert out == b'  {"model":"small","messages": [{"role": "user", "content": "hi"}], "stream": false}'
    assert json.loads(out)["model"] == "small"


def test_non_string_model_counts_as_missing_and_is_replaced():
    body = b'{"model": null, "prompt": "hi"}'
    parsed = parse_body(body, "completions")
    assert parsed.requested_model is None
    assert rewrite(body, parsed, "small", {}) == b'{"model": "small", "prompt": "hi"}'


@pytest.mark.parametrize("body", [
    b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}], "model": "auto"}',
    b'{"messages": [{"role": "user", "content": "' + SECRET.encode() + b'", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "meta": {"a": 1, "\\u0061": 2}}',
    b'{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", '
    b'"arguments": "{\\"to\\": \\"x\\", \\"to\\": \\"y\\"}"}}]}]}',
])
def test_a_key_repeated_in_one_object_is_refused_wherever_it_is(body):
    with pytest.raises(DuplicateKey) as info:
        parse_body(body, "chat")
    assert info.value.reason == "duplicate_key" and SECRET not in str(info.value)


def test_escaped_key_names_are_recognised():
    body = b'{"mod\\u0065l": "auto", "m\\u0065ssages": [{"r\\u006fle": "user", "content": "hi"}]}'
    parsed = parse_body(body, "chat")
    assert parsed.requested_model == "auto"
    assert parsed.texts() == ["hi"] and parsed.category_text() == "hi"


def test_content_parts_every_string_is_scanned_and_only_text_parts_are_the_category_input():
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "text", "text": "first part"},
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}, "text": "not a text part"},
        {"type": "input_text", "text": "second part"},
        {"type": "text", "text": 42},
        "not an object",
    ]}]}).encode()
    parsed = parse_body(body, "chat")
    assert parsed.texts() == ["https://x/y.png", "first part", "not a text part", "second part",
                              "not an object"]  # input audio is decoded by the backend, not read
    assert parsed.category_text() == "first part\nsecond part"
    out = json.loads(rewrite(body, parsed, None, {field(parsed, "second part").index: "2nd"}))
    parts = out["messages"][0]["content"]
    assert parts[3]["text"] == "2nd"
    assert parts[2]["text"] == "not a text part" and parts[0] == json.loads(body)["messages"][0]["content"][0]


def test_tool_call_arguments_are_masked_inside_and_stay_valid_json():
    arguments = json.dumps({"email": "jo@example.com", "card": 4111111111111111, "note": "call Ann"})
    body = json.dumps({"model": "auto", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "lookup", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "found jo@example.com"},
        {"role": "user", "content": "thanks"}]}).encode()
    parsed = parse_body(body, "chat")
    email = field(parsed, "jo@example.com")
    card = field(parsed, "4111111111111111")
    assert email.doc == card.doc == 1 and card.number
    assert "found jo@example.com" in parsed.texts() and "c1" not in parsed.texts()
    out = json.loads(rewrite(body, parsed, None, {email.index: "[EMAIL]", card.index: "****1111"}))
    inner = json.loads(out["messages"][0]["tool_calls"][0]["function"]["arguments"])
    assert inner == {"email": "[EMAIL]", "card": "****1111", "note": "call Ann"}


def test_tool_and_function_names_are_structural_and_a_participant_name_is_text():
    body = json.dumps({"model": "auto", "messages": [
        {"role": "user", "name": "alice_j", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "lookup", "arguments": "{}"}}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Find Ann"}}]}).encode()
    parsed = parse_body(body, "chat")
    assert parsed.texts() == ["alice_j", "hi", "Find Ann"]
    assert [f.index for f in parsed.fields] == [0, 1, 2]
    assert parsed.structural.count("lookup") == 2


def test_unknown_keys_and_long_numbers_are_scanned_short_numbers_are_not():
    body = b'{"model": "x", "input": "hi", "metadata": {"jo@example.com": 123456789, "k": 12345678, "id": 123456789012}}'
    parsed = parse_body(body, "generic")
    assert parsed.texts() == ["hi", "jo@example.com", "123456789", "123456789012"]
    assert "k" in parsed.structural


def test_inside_a_tools_json_structural_keys_hold_data_and_are_scanned():
    output = json.dumps({"detail": "No policy for Robert Johnson", "status": "closed by Ann", "id": 4111111111111111})
    body = json.dumps({"model": "auto", "messages": [{"role": "tool", "tool_call_id": "c", "content": output},
                                                     {"role": "user", "content": "why?"}]}).encode()
    parsed = parse_body(body, "chat")
    assert parsed.texts() == ["No policy for Robert Johnson", "closed by Ann", "4111111111111111", "why?"]


def test_base64_attachments_are_not_scanned_but_svg_images_are():
    blob = PDF
    svg = "data:image/svg+xml;base64," + "PHN2Zz4=" * 4
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": blob}}, {"type": "image_url", "image_url": {"url": svg}},
        {"type": "text", "text": "read it"}]}]}).encode()
    assert parse_body(body, "chat").texts() == [svg, "read it"]


WORDS = ["Please", "note", "my", "card", "4111", "1111", "1111", "1111", "and", "SSN", "078", "05", "1120"] * 8


@pytest.mark.parametrize("sep", ["\n", "\r\n", "+", "/", ""])
def test_words_in_base64_characters_are_text_wherever_no_api_puts_media(sep):
    words = sep.join(WORDS)
    fake_image = "data:image/png;base64," + "".join(WORDS)[:64]
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": words}, {"type": "text", "text": fake_image}]}],
        "metadata": {"data": words, "url": fake_image}}).encode()
    assert parse_body(body, "chat").texts() == [words, fake_image, words, fake_image]


def test_base64_media_is_not_read_only_where_an_api_decodes_it():
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    body = json.dumps({"model": "auto", "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
            {"type": "input_audio", "input_audio": {"data": png, "format": "wav"}},
            {"type": "file", "file": {"file_data": png, "filename": "a.pdf"}},
            {"type": "text", "text": "what is in these?"}]},
        {"role": "tool", "tool_call_id": "c", "content": json.dumps({"image_url": {"url": "data:image/png;base64," + png}})},
    ]}).encode()
    assert parse_body(body, "chat").texts() == ["a.pdf", "what is in these?", "data:image/png;base64," + png]  # tool output: text
    anthropic = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "+".join(WORDS)}},
        {"type": "text", "text": "compare them"}]}]}).encode()
    assert parse_body(anthropic, "messages").texts() == ["+".join(WORDS), "compare them"]  # a text document is read
    responses = json.dumps({"model": "auto", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64," + png},
        {"type": "input_text", "text": "describe"}]}]}).encode()
    assert parse_body(responses, "responses").texts() == ["describe"]


@pytest.mark.parametrize("url", ["data:image/png;base64,Please note my card 4111 1111 1111 1111",
                                 "data:image/png;base64,4111111111111111x", "data:image/svg+xml;base64,PHN2Zz4=",
                                 "data:text/plain;base64,TXkgY2FyZA=="])
def test_an_image_url_that_is_not_valid_base64_media_is_read(url):
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}).encode()
    assert parse_body(body, "chat").texts() == [url, "hi"]


@pytest.mark.parametrize("numbers", [
    ["4111111111111111", "5500000000000004", "378282246310005", "+15551234567", "+442071838750"] * 4,
    ["415/555/0142", "4111/1111/1111/1111"] * 20,
])
def test_a_long_list_of_numbers_without_spaces_is_text_not_an_attachment(numbers):
    listing = "\n".join(numbers)
    assert len(listing) >= 256
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": listing}]}).encode()
    assert parse_body(body, "chat").texts() == [listing]


def test_json_nested_deeper_than_the_walk_follows_is_refused():
    body = b'{"prompt": "hi", "x": ' + b"[" * 100 + b"]" * 100 + b"}"
    with pytest.raises(TooDeep):
        parse_body(body, "completions")


@pytest.mark.parametrize("model", ["a" * 257, r"auto\u0000", r"m\r\nx-selected-model: math", r"caf\u00e9", ""])
def test_a_model_name_no_header_can_carry_is_refused(model):
    body = b'{"model": "' + model.encode() + b'", "prompt": "hi"}'
    with pytest.raises(InvalidModel):
        parse_body(body, "completions")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_bodies_in_any_json_encoding_are_read_and_rewritten_in_that_encoding(encoding):
    text = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Mail jo@example.com é"}]},
                      ensure_ascii=False)
    body = text.encode(encoding)
    parsed = parse_body(body, "chat")
    email = field(parsed, "Mail jo@example.com é")
    out = rewrite(body, parsed, "m", {email.index: "Mail [EMAIL] é"})
    assert out.decode(encoding) == text.replace("jo@example.com", "[EMAIL]").replace('"auto"', '"m"')
    assert out[:4] == body[:4]


def chat(*messages: tuple[str, object]) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": r, "content": c} for r, c in messages]}).encode()


def test_category_text_is_the_latest_user_message_with_text():
    body = chat(("system", "sys"), ("user", "old question"), ("assistant", "answer"),
                ("user", [{"type": "text", "text": "new"}, {"type": "text", "text": "question"}]),
                ("user", [{"type": "image_url", "image_url": {"url": "u"}}]))
    parsed = parse_body(body, "chat")
    assert parsed.category_text("latest_user") == "new\nquestion"
    assert parsed.category_text("all_user") == "old question\nnew\nquestion"


def test_category_text_is_empty_without_user_text():
    assert parse_body(chat(("system", "only a system prompt")), "chat").category_text() == ""


def test_every_role_is_scanned_and_the_user_role_is_found_whatever_its_case():
    body = chat(("system", "s"), ("developer", "d"), ("User", "u"), ("assistant", "a"), ("tool", "t"), ("user", ""),
                ("assistant", None), ("", "no role"))
    parsed = parse_body(body, "chat")
    assert parsed.texts() == ["s", "d", "u", "a", "t", "no role"]
    assert parsed.category_text() == "u"
    unnamed = parse_body(b'{"messages": [{"content": "no role at all"}]}', "chat")
    assert unnamed.texts() == ["no role at all"] and unnamed.category_text() == ""


def test_completions_prompt_string_and_list():
    single = parse_body(b'{"model": "auto", "prompt": "Once upon"}', "completions")
    assert single.texts() == ["Once upon"]
    many = parse_body(b'{"prompt": ["a", "b"], "max_tokens": 5}', "completions")
    assert many.texts() == ["a", "b"]
    assert many.category_text() == "a\nb"
    out = rewrite(b'{"prompt": ["a", "b"], "max_tokens": 5}', many, "m", {1: "B"})
    assert out == b'{"model":"m","prompt": ["a", "B"], "max_tokens": 5}'


def test_responses_api_input_and_instructions_are_scanned_and_the_latest_user_input_is_classified():
    body = json.dumps({"model": "auto", "instructions": "You are Ann's helper", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "reply"}]},
        {"type": "function_call_output", "call_id": "c", "output": "{\"email\": \"jo@example.com\"}"},
        {"role": "user", "content": "second"}]}).encode()
    parsed = parse_body(body, "responses")
    assert parsed.texts() == ["You are Ann's helper", "first", "reply", "jo@example.com", "second"]
    assert parsed.category_text() == "second"
    assert parse_body(b'{"model": "auto", "input": "just text"}', "responses").category_text() == "just text"


def test_messages_api_system_blocks_tool_use_and_tool_results_are_scanned():
    body = json.dumps({"model": "auto", "max_tokens": 10, "system": [{"type": "text", "text": "sys Ann"}],
                       "messages": [
                           {"role": "user", "content": "question one"},
                           {"role": "assistant", "content": [
                               {"type": "tool_use", "id": "t1", "name": "find", "input": {"who": "Bob Stone"}}]},
                           {"role": "user", "content": [
                               {"type": "tool_result", "tool_use_id": "t1", "content": "bob@example.com"},
                               {"type": "text", "text": "question two"}]}]}).encode()
    parsed = parse_body(body, "messages")
    assert parsed.texts() == ["sys Ann", "question one", "Bob Stone", "bob@example.com", "question two"]
    assert "find" in parsed.structural  # a tool's name is an identifier: masking it would break the call
    assert parsed.category_text() == "question two"


def test_escapes_decode_to_the_text_models_see():
    body = b'{"messages": [{"role": "user", "content": "a\\nb\\t\\u00e9\\ud83d\\ude00\\\\"}]}'
    assert parse_body(body, "chat").fields[0].text == "a\nb\té😀\\"


def test_multibyte_text_keeps_character_offsets_and_reencodes_as_utf8():
    text = "我的邮箱是 a@b.cn 😀 谢谢"
    body = json.dumps({"messages": [{"role": "user", "content": text}]}, ensure_ascii=False).encode()
    parsed = parse_body(body, "chat")
    field = parsed.fields[0]
    start = field.text.index("a@b.cn")
    assert field.text[start:start + 6] == "a@b.cn"
    masked = field.text[:start] + "[EMAIL_ADDRESS]" + field.text[start + 6:]
    out = rewrite(body, parsed, None, {field.index: masked})
    assert json.loads(out.decode("utf-8"))["messages"][0]["content"] == "我的邮箱是 [EMAIL_ADDRESS] 😀 谢谢"
    assert parsed.source[field.span[0]:field.span[1]] == json.dumps(text, ensure_ascii=False)


def test_lone_surrogates_stay_escaped_when_reencoded():
    body = b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}'
    parsed = parse_body(body, "chat")
    assert parsed.fields[0].text == "x\ud800y"
    assert encode_string("x\ud800y!") == '"x\\ud800y!"'
    out = rewrite(body, parsed, None, {0: "x\ud800y!"})
    assert json.loads(out)["messages"][0]["content"] == "x\ud800y!"


@pytest.mark.parametrize(
    ("body", "error", "reason"),
    [
        (b"", EmptyBody, "empty_body"),
        (b" \r\n\t", EmptyBody, "empty_body"),
        (b'{"prompt": "' + SECRET.encode() + b'\xff"}', NotUtf8, "not_utf8"),
        (b'{"prompt": "' + SECRET.encode() + b'"', NotJson, "not_json"),
        (b"\xef\xbb\xbf{}", NoText, "no_text"),
        (b'{"prompt": "' + SECRET.encode() + b'", "prompt": "x"}', DuplicateKey, "duplicate_key"),
        (b'{"prompt": "' + SECRET.encode() + b'"} trailing', NotJson, "not_json"),
        (b'{"n": ' + b"9" * 5000 + b"}", NotJson, "not_json"),
        (b"[" * 100000 + b"]" * 100000, NotJson, "not_json"),
        (b'["' + SECRET.encode() + b'"]', NotObject, "not_object"),
        (b'"' + SECRET.encode() + b'"', NotObject, "not_object"),
        (b"null", NotObject, "not_object"),
        (b'{"model": "auto"}', NoText, "no_text"),
        (b'{"messages": []}', NoText, "no_text"),
        (b'{"messages": [{"role": "user", "content": null}, {"role": "user", "content": ""}]}', NoText, "no_text"),
    ],
)
def test_unreadable_chat_bodies_raise_the_matching_request_error(body, error, reason):
    with pytest.raises(error) as info:
        parse_body(body, "chat")
    assert isinstance(info.value, RequestError)
    assert info.value.reason == reason
    assert SECRET not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("body", [b'{"prompt": ""}', b'{"prompt": []}', b'{"model": "auto", "temperature": 0.5}'])
def test_completions_without_any_text_have_no_text(body):
    with pytest.raises(NoText):
        parse_body(body, "completions")


def _random_json(rng, depth: int = 0) -> object:
    """Any JSON value: what clients put beside the fields we read (tools, vendor extensions)."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return _random_text(rng)
    if kind == 1:
        return rng.choice([0, -1, 2.5, 1e-7, 12345678901234567890])
    if kind == 2:
        return rng.choice([True, False])
    if kind == 3:
        return None
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_random_text(rng): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_text(rng) -> str:
    alphabet = 'ab c"\\/\n\t\u00e9\u4e2d\U0001f600\u2028{}[],:'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))


def _random_dumps(rng, value: object) -> str:
    """JSON text with random spacing and escaping, so byte positions differ from json.dumps's."""
    ws = lambda: rng.choice(["", " ", "\n  ", "\t", " \r\n"])  # noqa: E731
    if isinstance(value, dict):
        items = [f"{ws()}{_random_dumps(rng, k)}{ws()}:{ws()}{_random_dumps(rng, v)}{ws()}" for k, v in value.items()]
        return "{" + ",".join(items) + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(f"{ws()}{_random_dumps(rng, v)}{ws()}" for v in value) + ws() + "]"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


def test_random_bodies_read_and_rewrite_exactly_what_json_loads_sees():
    """Fields, roles and texts are those of the decoded document; rewriting them changes the document in those
    places only and keeps every other byte, whatever the spacing, escapes or neighbouring keys."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        messages = []
        for i in range(rng.randrange(1, 5)):
            message = {"role": rng.choice(["system", "user", "assistant"]), "extra": _random_json(rng)}
            if i == 0 or rng.random() < 0.5:  # at least one text, or the body is refused (NoText)
                message["content"] = _random_text(rng) + "x"
            else:
                message["content"] = [rng.choice([{"type": "text", "text": _random_text(rng)},
                                                  {"type": "image_url", "image_url": {"url": _random_text(rng)}},
                                                  _random_json(rng)]) for _ in range(rng.randrange(1, 4))]
            messages.append(dict(rng.sample(list(message.items()), len(message))))
        document = {"tools": _random_json(rng), "model": "auto", "messages": messages, "x": _random_json(rng)}
        body = _random_dumps(rng, dict(rng.sample(list(document.items()), len(document)))).encode()
        parsed = parse_body(body, "chat")
        assert parsed.texts() == list(_expected_texts(json.loads(body)))
        assert rewrite(body, parsed, None, {}) == body
        new_texts = {f.index: f"<{f.index}>{f.text[::-1]}" for f in parsed.fields if rng.random() < 0.7}
        out = rewrite(body, parsed, "routed", new_texts)
        changed = iter(new_texts.get(i) for i in range(len(parsed.fields)))
        expected = _transformed(json.loads(body), changed)
        expected["model"] = "routed"
        assert _inner_parsed(json.loads(out)) == expected
        assert next(changed, "end") == "end"


def _inner_json(text: str) -> object | None:
    if text.lstrip()[:1] in ("{", "["):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, (dict, list)) else None
    return None


def _scanned_key(k: str) -> bool:
    from sidecar.request import _IDENTIFIER, KNOWN_KEYS

    return bool(k) and k not in KNOWN_KEYS and not _IDENTIFIER.fullmatch(k)


def _structural(key: str | None, top: bool) -> bool:
    from sidecar.request import STRUCTURAL_KEYS

    return top and key in STRUCTURAL_KEYS


def _long_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and sum(c.isdigit() for c in json.dumps(value)) >= 9


def _expected_texts(value: object, key: str | None = None, top: bool = True):
    """The walk's rule, on the decoded document: every string but structural values (in the body itself),
    every unknown key that is not a plain field name, long numbers, and strings that hold JSON walked
    inside."""
    if isinstance(value, dict):
        for k, v in value.items():
            if _scanned_key(k):
                yield k
            yield from _expected_texts(v, k, top)
    elif isinstance(value, list):
        for item in value:
            yield from _expected_texts(item, key, top)
    elif isinstance(value, str) and value and not _structural(key, top):
        inner = _inner_json(value)
        if inner is not None:
            yield from _expected_texts(inner, None, False)
        else:
            yield value
    elif _long_number(value):
        yield json.dumps(value)


def _transformed(value: object, changes, key: str | None = None, top: bool = True) -> object:
    """`value` with each scanned text replaced by the next of `changes` (None: kept), strings that hold JSON
    turned into what they hold."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            new_key = (next(changes) or k) if _scanned_key(k) else k
            out[new_key] = _transformed(v, changes, k, top)
        return out
    if isinstance(value, list):
        return [_transformed(item, changes, key, top) for item in value]
    if isinstance(value, str) and value and not _structural(key, top):
        inner = _inner_json(value)
        return _transformed(inner, changes, None, False) if inner is not None else (next(changes) or value)
    return (next(changes) or value) if _long_number(value) else value


def _inner_parsed(value: object, key: str | None = None, top: bool = True) -> object:
    if isinstance(value, dict):
        return {k: _inner_parsed(v, k, top) for k, v in value.items()}
    if isinstance(value, list):
        return [_inner_parsed(item, key, top) for item in value]
    if isinstance(value, str) and not _structural(key, top):
        inner = _inner_json(value)
        return _inner_parsed(inner, None, False) if inner is not None else value
    return value


@pytest.mark.parametrize(("path", "doc"), [
    ("completions", {"model": "auto", "prompt": [[2026, 2171, 2003, 2198, 3044]], "suffix": "\n"}),
    ("completions", {"model": "auto", "prompt": ["a text", [2026, 2171]]}),
    ("completions", {"model": "auto", "prompt": [2026, 2171, 2003]}),
    ("generic", {"model": "text-embedding-3-small", "input": [[2026, 2171, 2003]], "user": "someone"}),
    ("completions", {"model": "auto", "prompt": [2026.0, 2171.0, 2003.0], "stop": ["\n"]}),
    ("completions", {"model": "auto", "prompt": [[2026e0, 2171e0]], "suffix": "x"}),
    ("generic", {"input_ids": [2026, 2171], "text": "hi"}),
    ("generic", {"prompt_token_ids": [[2026, 2171]], "prompt": "hi"}),
])
def test_a_prompt_given_as_token_ids_is_refused_whatever_text_sits_beside_it(path, doc):
    from sidecar.errors import TokenIds

    with pytest.raises(TokenIds):
        parse_body(json.dumps(doc).encode(), path)


def test_numbers_elsewhere_and_nested_input_items_are_not_token_ids():
    body = {"model": "auto", "input": [{"role": "user", "content": "hi"}], "metadata": {"ids": [1, 2]},
            "max_output_tokens": 5}
    assert parse_body(json.dumps(body).encode(), "responses").texts() == ["hi"]


def test_a_messages_name_is_text_even_when_the_message_claims_a_tool_type():
    body = json.dumps({"model": "auto", "messages": [
        {"role": "user", "name": "John Smith", "type": "function", "content": "hi"}]}).encode()
    parsed = parse_body(body, "chat")
    assert "John Smith" in parsed.texts() and "John Smith" not in parsed.structural


def test_text_in_a_media_place_that_decodes_to_no_media_file_is_read():
    words = "JohnSmith/card/4111111111111111/SSN/078051120+callme"  # valid base64, decodes to no file
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + words}},
        {"type": "input_audio", "input_audio": {"data": words, "format": "wav"}},
        {"type": "file", "file": {"file_data": words}},
        {"type": "text", "text": "hi"}]}]}).encode()
    assert parse_body(body, "chat").texts() == ["data:image/png;base64," + words, words, words, "hi"]
    anthropic = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"data": words, "media_type": "text/plain", "type": "base64"}},
        {"type": "text", "text": "hi"}]}]}).encode()
    assert parse_body(anthropic, "messages").texts() == [words, "hi"]


def test_a_pdf_sent_as_a_data_url_in_file_data_is_a_document_not_text():
    body = json.dumps({"model": "auto", "input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64," + PDF},
        {"type": "input_text", "text": "summarise"}]}]}).encode()
    assert parse_body(body, "responses").texts() == ["a.pdf", "summarise"]


def test_images_audio_and_video_other_apis_carry_are_not_read_when_they_decode_to_media():
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    text_as_base64 = "Sm9obiBTbWl0aA=="  # "John Smith": valid base64, no image
    ollama = {"model": "llava", "messages": [{"role": "user", "content": "what is this", "images": [png, text_as_base64]}]}
    assert parse_body(json.dumps(ollama).encode(), "chat").texts() == ["what is this", text_as_base64]
    gemini = {"contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": png}},
                                      {"inlineData": {"data": text_as_base64}}, {"text": "describe"}]}]}
    assert parse_body(json.dumps(gemini).encode(), "generic").texts() == ["image/png", text_as_base64, "describe"]
    vllm = {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + WAV}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + text_as_base64}},
        {"type": "text", "text": "transcribe"}]}]}
    assert parse_body(json.dumps(vllm).encode(), "chat").texts() == ["data:video/mp4;base64," + text_as_base64, "transcribe"]


def test_tool_schema_enum_values_are_identifiers_not_text():
    body = {"model": "auto", "messages": [{"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {
        "name": "w", "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "kelvin"]}}}}}]}
    parsed = parse_body(json.dumps(body).encode(), "chat")
    assert "kelvin" not in parsed.texts() and "kelvin" in parsed.structural
