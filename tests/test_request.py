"""Parsing OpenAI-style bodies and editing them byte-losslessly."""

from __future__ import annotations

import json

import pytest

from sidecar.errors import EmptyBody, NoText, NotJson, NotObject, NotUtf8, RequestError
from sidecar.request import encode_string, parse_body, rewrite

SECRET = "hunter2-secret"

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


def test_round_trip_changes_only_model_and_masked_strings():
    parsed = parse_body(MANY_FIELDS, "chat")
    assert parsed.requested_model == "auto"
    system, user = parsed.fields
    assert system.text == 'You help "Jane Doe" été 😀.'
    assert user.text == "Mail john@example.com please"

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


def test_duplicate_keys_follow_json_loads_last_wins():
    body = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "first"}],'
            b' "model": "auto", "messages": [{"role": "user", "content": "second"}]}')
    parsed = parse_body(body, "chat")
    assert parsed.requested_model == "auto"
    assert [f.text for f in parsed.fields] == ["second"]
    out = rewrite(body, parsed, "m", {0: "2nd"})
    assert out == (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "first"}],'
                   b' "model": "m", "messages": [{"role": "user", "content": "2nd"}]}')


def test_escaped_key_names_are_recognised():
    body = b'{"mod\\u0065l": "auto", "m\\u0065ssages": [{"r\\u006fle": "user", "content": "hi"}]}'
    parsed = parse_body(body, "chat")
    assert parsed.requested_model == "auto"
    assert parsed.fields[0].role == "user" and parsed.fields[0].text == "hi"


def test_content_parts_only_text_parts_are_read_and_changed():
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "text", "text": "first part"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}, "text": "not a text part"},
        {"type": "input_text", "text": "second part"},
        {"type": "text", "text": 42},
        "not an object",
    ]}]}).encode()
    parsed = parse_body(body, "chat")
    assert [(f.part_index, f.text) for f in parsed.fields] == [(1, "first part"), (3, "second part")]
    assert parsed.category_text() == "first part\nsecond part"
    out = json.loads(rewrite(body, parsed, None, {1: "2nd"}))
    parts = out["messages"][0]["content"]
    assert parts[3]["text"] == "2nd"
    assert parts[2]["text"] == "not a text part" and parts[0] == json.loads(body)["messages"][0]["content"][0]


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


def test_pii_fields_follow_roles_and_skip_empty_text():
    body = chat(("system", "s"), ("developer", "d"), ("user", "u"), ("assistant", "a"), ("tool", "t"), ("user", ""),
                ("assistant", None))
    parsed = parse_body(body, "chat")
    assert [f.role for f in parsed.pii_fields({"system", "developer", "user"})] == ["system", "developer", "user"]
    assert [f.text for f in parsed.pii_fields({"assistant", "tool"})] == ["a", "t"]
    assert [f.message_index for f in parsed.fields] == [0, 1, 2, 3, 4, 5]


def test_completions_prompt_string_and_list():
    single = parse_body(b'{"model": "auto", "prompt": "Once upon"}', "completions")
    assert [(f.role, f.part_index, f.text) for f in single.fields] == [(None, None, "Once upon")]
    many = parse_body(b'{"prompt": ["a", 7, "b"], "max_tokens": 5}', "completions")
    assert [(f.part_index, f.text) for f in many.fields] == [(0, "a"), (2, "b")]
    assert many.category_text() == "a\nb"
    assert [f.text for f in many.pii_fields(set())] == ["a", "b"]
    out = rewrite(b'{"prompt": ["a", 7, "b"], "max_tokens": 5}', many, "m", {1: "B"})
    assert out == b'{"model":"m","prompt": ["a", 7, "B"], "max_tokens": 5}'


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
        (b"\xef\xbb\xbf{}", NotJson, "not_json"),
        (b'{"prompt": "' + SECRET.encode() + b'"} trailing', NotJson, "not_json"),
        (b'{"n": ' + b"9" * 5000 + b"}", NotJson, "not_json"),
        (b"[" * 100000 + b"]" * 100000, NotJson, "not_json"),
        (b'["' + SECRET.encode() + b'"]', NotObject, "not_object"),
        (b'"' + SECRET.encode() + b'"', NotObject, "not_object"),
        (b"null", NotObject, "not_object"),
        (b'{"model": "auto"}', NoText, "no_text"),
        (b'{"messages": "' + SECRET.encode() + b'"}', NoText, "no_text"),
        (b'{"messages": []}', NoText, "no_text"),
        (b'{"messages": [{"role": "user", "content": null}, {"role": "user", "content": ""}]}', NoText, "no_text"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}',
         NoText, "no_text"),
    ],
)
def test_unreadable_chat_bodies_raise_the_matching_request_error(body, error, reason):
    with pytest.raises(error) as info:
        parse_body(body, "chat")
    assert isinstance(info.value, RequestError)
    assert info.value.reason == reason
    assert SECRET not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("body", [b'{"prompt": [1, 2, 3]}', b'{"prompt": [[1, 2], [3]]}', b'{"prompt": ""}',
                                  b'{"messages": [{"role": "user", "content": "hi"}]}'])
def test_completions_without_string_prompts_have_no_text(body):
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
        expected = []
        for m_index, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, str):
                expected.append((message["role"], m_index, None, content))
            else:
                expected += [(message["role"], m_index, p, part["text"]) for p, part in enumerate(content)
                             if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]
        assert [(f.role, f.message_index, f.part_index, f.text) for f in parsed.fields] == expected
        assert rewrite(body, parsed, None, {}) == body
        new_texts = {f.index: f"[{f.index}]{f.text[::-1]}" for f in parsed.fields if rng.random() < 0.7}
        out = rewrite(body, parsed, "routed", new_texts)
        changed = json.loads(body)
        changed["model"] = "routed"
        for f in parsed.fields:
            if f.index in new_texts:
                target = changed["messages"][f.message_index]
                if f.part_index is None:
                    target["content"] = new_texts[f.index]
                else:
                    target["content"][f.part_index]["text"] = new_texts[f.index]
        assert json.loads(out) == changed
        unchanged = [body.decode()[end:start] for (_, end), (start, _) in zip(
            [(0, 0)] + sorted([parsed.model_span] + [f.span for f in parsed.fields if f.index in new_texts]),
            sorted([parsed.model_span] + [f.span for f in parsed.fields if f.index in new_texts]) + [(len(body.decode()), 0)],
            strict=True)]
        assert all(piece in out.decode() for piece in unchanged)
