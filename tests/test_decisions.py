"""DecisionMaker: bodies in, Decisions out, against the deterministic FakeEngine."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.config import Config, parse_config
from sidecar.decisions import DecisionMaker, TextDecision
from sidecar.errors import (
    BodyTooLarge,
    ConfigError,
    InferenceError,
    InferenceTimeout,
    NoText,
    NotJson,
    Overloaded,
    PiiInField,
)
from tests.fakes import FakeEngine

CARD = "4111 1111 1111 1111"  # Luhn-valid Visa test number
OPEN = {"inference": "fail_open"}


def make_config(**sections) -> Config:
    data = {"routing": {"default_model": "small", "confidence_threshold": 0.5,
                        "categories": {"math": "math-llm", "law": "law-llm"}}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


def chat(*messages: tuple[str, str], model: str | None = "auto", **extra) -> bytes:
    body = {"messages": [{"role": r, "content": c} for r, c in messages], **extra}
    if model is not None:
        body = {"model": model, **body}
    return json.dumps(body, ensure_ascii=False).encode()


def router(engine: FakeEngine | None = None, **sections) -> DecisionMaker:
    return DecisionMaker(make_config(**sections), engine or FakeEngine())


async def test_routes_by_category_and_masks_every_scanned_role():
    body = chat(("system", "Assistant for John Smith."), ("user", "Solve the integral; reply to js@example.com"),
                stream=True, tools=[{"type": "function", "function": {"name": "f"}}])
    d = await router().decide(body, "chat")
    assert (d.action, d.model, d.rewrite_model, d.route_reason) == ("mask", "math-llm", True, "category")
    assert (d.category, d.confidence) == ("math", pytest.approx(0.95))
    assert d.entity_types == ("EMAIL_ADDRESS", "PERSON")
    assert d.entity_counts == {"PERSON": 1, "EMAIL_ADDRESS": 1}
    out = json.loads(d.body)
    assert out["model"] == "math-llm" and out["stream"] is True and out["tools"] == json.loads(body)["tools"]
    assert [m["content"] for m in out["messages"]] == ["Assistant for [PERSON].",
                                                       "Solve the integral; reply to [EMAIL_ADDRESS]"]
    assert set(d.timings) == {"parse", "classify", "pii", "total"} and d.error is None


async def test_low_confidence_falls_back_to_default_model():
    d = await router().decide(chat(("user", "Tell me a story")), "chat")
    assert (d.model, d.route_reason, d.category) == ("small", "low_confidence", "other")
    assert json.loads(d.body)["model"] == "small" and d.action == "allow"


async def test_unknown_category_falls_back_to_default_model():
    d = await router().decide(chat(("user", "Which organelle makes ATP in a cell?")), "chat")
    assert (d.model, d.route_reason, d.category) == ("small", "unknown_category", "biology")


async def test_client_model_is_kept_but_pii_still_masked_and_classifier_skipped():
    engine = FakeEngine()
    body = chat(("user", "Solve this for Jane Doe"), model="gpt-4o")
    d = await router(engine).decide(body, "chat")
    assert (d.model, d.rewrite_model, d.route_reason, d.category) == ("gpt-4o", False, "client_model", None)
    assert engine.calls["classify"] == 0 and engine.calls["detect_pii"] == 1
    assert d.action == "mask"
    assert d.body == body.replace(b"Jane Doe", b"[PERSON]")


async def test_client_model_without_pii_leaves_the_body_alone():
    d = await router().decide(chat(("user", "Solve 2x = 4"), model="gpt-4o"), "chat")
    assert (d.action, d.body, d.entity_types) == ("allow", None, ())


async def test_missing_model_is_routed_and_inserted():
    d = await router().decide(chat(("user", "The court held the contract void"), model=None), "chat")
    assert d.model == "law-llm" and json.loads(d.body)["model"] == "law-llm"


async def test_block_names_entity_types_never_values():
    r = router(pii={"default_policy": {"action": "block"}})
    d = await r.decide(chat(("user", "Solve it, I am John Smith, john@corp.example")), "chat")
    assert d.action == "block" and d.body is None and not d.rewrite_model
    assert d.entity_types == ("EMAIL_ADDRESS", "PERSON")
    assert "John Smith" not in repr(d) and "john@corp.example" not in repr(d)


async def test_a_refused_type_refuses_even_where_a_higher_scored_type_covers_it():
    # the fake model reads the SSN as a phone number (0.9); the SSN recognizer beside it scores 0.85, so the
    # masked span is the phone's: the request is refused all the same, naming both types
    r = router(pii={"default_policy": {"action": "mask", "block_entities": ["US_SSN"]}})
    d = await r.decide(chat(("user", "My SSN is 536-22-8714, thanks")), "chat")
    assert (d.action, d.body, d.entity_types) == ("block", None, ("PHONE_NUMBER", "US_SSN"))
    d = await r.decide(chat(("user", "Call 415 555 0100, thanks")), "chat")
    assert d.action == "mask" and d.entity_types == ("PHONE_NUMBER",)


async def test_allow_list_and_score_threshold_filter_spans():
    # FakeEngine scores: EMAIL 0.99, PHONE 0.9, PERSON 0.85.
    r = router(pii={"default_policy": {"action": "block", "score_threshold": 0.86, "allow_entities": ["EMAIL_ADDRESS"]}})
    d = await r.decide(chat(("user", "John Smith at js@x.org")), "chat")
    assert (d.action, d.entity_types) == ("allow", ())
    d = await r.decide(chat(("user", "John Smith at +1 415 555 0100")), "chat")
    assert (d.action, d.entity_types) == ("block", ("PHONE_NUMBER",))


async def test_policy_follows_the_selected_model():
    r = router(pii={"policies": {"law-llm": {"action": "block"}, "gpt-4o": {"action": "allow"}}})
    law = await r.decide(chat(("user", "Can the tenant Jane Doe sue in court?")), "chat")
    math = await r.decide(chat(("user", "Solve the equation Jane Doe wrote")), "chat")
    client = await r.decide(chat(("user", "Jane Doe"), model="gpt-4o"), "chat")
    assert (law.action, math.action, client.action) == ("block", "mask", "allow")
    assert client.body is None and client.entity_types == ("PERSON",)


async def test_operators_from_config_are_applied():
    r = router(pii={"default_policy": {"operators": {"EMAIL_ADDRESS": {"type": "mask", "chars_to_mask": 3}}}})
    d = await r.decide(chat(("user", "abc@d.io")), "chat")
    assert json.loads(d.body)["messages"][0]["content"] == "***@d.io"


async def test_multibyte_text_is_masked_at_exact_offsets():
    text = "😀 我是张伟, 邮箱 zw@mail.cn 👍🏽 谢谢"
    d = await router().decide(chat(("user", text)), "chat")
    assert json.loads(d.body)["messages"][0]["content"] == "😀 我是[PERSON], 邮箱 [EMAIL_ADDRESS] 👍🏽 谢谢"


async def test_every_role_and_tool_call_argument_is_scanned():
    body = json.dumps({"model": "gpt-4o", "messages": [
        {"role": "assistant", "content": "Hi John Smith", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "mail", "arguments": json.dumps({"to": "js@x.org"})}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sent to Jane Doe"},
        {"role": "User", "content": "hello"}]}).encode()
    d = await router().decide(body, "chat")
    out = json.loads(d.body)
    assert d.action == "mask" and b"John Smith" not in d.body and b"Jane Doe" not in d.body
    assert json.loads(out["messages"][0]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL_ADDRESS]"}
    assert out["messages"][1]["content"] == "sent to [PERSON]"


async def test_pattern_recognizers_run_beside_the_model():
    """An SSN and an IP the (fake) model does not know are masked by the pattern recognizers."""
    engine = FakeEngine(pii_scores={"EMAIL_ADDRESS": 0.99, "CREDIT_CARD": 0.95, "PHONE_NUMBER": 0.1, "PERSON": 0.85})
    d = await router(engine).decide(chat(("user", "SSN 536-22-8714 from 10.1.2.3")), "chat")
    assert json.loads(d.body)["messages"][0]["content"] == "SSN [US_SSN] from [IP_ADDRESS]"
    off = await router(engine, pii={"patterns": "off"}).decide(chat(("user", "SSN 536-22-8714 from 10.1.2.3")), "chat")
    assert b"536-22-8714" in off.body and b"10.1.2.3" in off.body


async def test_a_short_value_reaches_the_pii_model_after_its_key_and_spans_land_on_the_value():
    engine = FakeEngine()
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                       "metadata": {"customer": "Jane Doe", "note": "x" * 80}}).encode()
    d = await router(engine).decide(body, "chat")
    assert "customer: Jane Doe" in engine.texts and "x" * 80 in engine.texts and "hi" in engine.texts
    assert json.loads(d.body)["metadata"]["customer"] == "[PERSON]"


async def test_a_long_number_under_a_key_that_names_it_is_masked_as_what_the_key_says():
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "update my record"}],
                       "metadata": {"ssn": 536222026, "phone": "4155550125", "order": 123456789}}).encode()
    engine = FakeEngine(pii_scores={"EMAIL_ADDRESS": 0.99, "CREDIT_CARD": 0.95, "PHONE_NUMBER": 0.1, "PERSON": 0.85})
    d = await router(engine).decide(body, "chat")
    meta = json.loads(d.body)["metadata"]
    assert meta == {"ssn": "[US_SSN]", "phone": "[PHONE_NUMBER]", "order": 123456789}


@pytest.mark.parametrize("field", ['"model": "bob@example.com"', '"tool_call_id": "4111 1111 1111 1111"',
                                   '"role": "user 536-22-8714"'])
async def test_personal_data_in_a_structural_field_is_refused(field):
    body = ('{' + field + ', "messages": [{"role": "user", "content": "hi"}]}').encode()
    if '"role"' in field:
        body = b'{"messages": [{' + field.encode() + b', "content": "hi"}]}'
    with pytest.raises(PiiInField) as info:
        await router().decide(body, "chat")
    assert "example.com" not in str(info.value) and "4111" not in str(info.value)


@pytest.mark.parametrize("key", ["ssn_078-05-1120", "cc_4111_1111_1111_1111", "tel_415_555_0132", "acct_078_05_1120",
                                 "visa4111111111111111", "ssn078051120", "refund_card4111111111111111"])
async def test_a_field_name_with_a_number_glued_by_underscores_is_refused(key):
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {key: {}}}}}]})
    with pytest.raises(PiiInField):
        await router().decide(body.encode(), "chat")


async def test_field_names_with_underscores_and_short_numbers_are_not_refused():
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                       "metadata": {"customer_id_2024": 1, "page_size_50": 2, "v_1_2_3": 3}})
    assert (await router().decide(body.encode(), "chat")).body is not None


async def test_a_body_on_another_api_is_scanned_but_not_routed():
    d = await router().decide(b'{"model": "embed", "input": ["mail js@x.org"]}', "generic")
    assert (d.model, d.route_reason, d.rewrite_model) == (None, "unrouted", False)
    assert d.body == b'{"model": "embed", "input": ["mail [EMAIL_ADDRESS]"]}'


async def test_a_gzip_body_is_read_and_forwarded_decompressed():
    """Decompressed even when nothing changed: the gzip header's file name and comment fields, which nobody
    reads, never go on."""
    import gzip

    body = chat(("user", "mail js@x.org"), model="gpt-4o")
    d = await router().decide(gzip.compress(body), "chat", "gzip")
    assert d.decompressed and d.body == body.replace(b"js@x.org", b"[EMAIL_ADDRESS]")
    plain = chat(("user", "hello"), model="gpt-4o")
    clean = await router().decide(gzip.compress(plain), "chat", "gzip")
    assert (clean.body, clean.decompressed) == (plain, True)


async def test_a_persons_name_is_grown_over_the_capitalised_words_after_it():
    engine = FakeEngine(names=("Margaret",))
    d = await router(engine).decide(chat(("user", "The account manager is Margaret Campbell Smith, ok?"),
                                         model="gpt-4o"), "chat")
    assert json.loads(d.body)["messages"][0]["content"] == "The account manager is [PERSON], ok?"


async def test_lone_surrogates_reach_the_models_as_replacement_characters_at_the_same_offsets():
    engine = FakeEngine()
    d = await router(engine).decide(b'{"model": "gpt-4o", "messages": [{"role": "user", "content": '
                                    b'"\\ud800 mail js@x.org"}]}', "chat")
    assert "\ufffd mail js@x.org" in engine.texts
    assert json.loads(d.body)["messages"][0]["content"] == "\ud800 mail [EMAIL_ADDRESS]"


async def test_the_deadline_grows_with_the_body_up_to_its_cap():
    engine = FakeEngine()
    r = router(engine, failure={"timeout_ms": 100, "timeout_ms_per_kib": 10, "max_timeout_ms": 500})
    loop = asyncio.get_running_loop()
    for size, budget in ((100, 0.1), (20_000, 0.1 + 0.01 * 20_000 / 1024), (200_000, 0.5)):
        before = loop.time()
        await r.decide(chat(("user", "x" * size), model="gpt-4o"), "chat")
        assert before + budget - 0.05 < engine.deadlines[-1] <= loop.time() + budget


async def test_category_input_all_user_classifies_every_user_message():
    engine = FakeEngine()
    r = router(engine, routing={"category_input": "all_user"})
    d = await r.decide(chat(("user", "about the court"), ("assistant", "ok"), ("user", "and the contract")), "chat")
    assert d.category == "law"
    assert "about the court\nand the contract" in engine.texts


async def test_latest_user_message_is_what_gets_classified():
    engine = FakeEngine()
    d = await router(engine).decide(chat(("user", "about the court"), ("user", "solve this")), "chat")
    assert d.category == "math" and "about the court" not in engine.texts[:1]


async def test_without_a_category_model_requests_go_to_default():
    engine = FakeEngine(has_category_model=False)
    d = await router(engine).decide(chat(("user", "Solve the integral")), "chat")
    assert (d.model, d.route_reason, d.category) == ("small", "no_category_model", None)
    assert engine.calls["classify"] == 0


async def test_an_engine_that_detects_no_pii_is_not_asked():
    engine = FakeEngine(detects_pii=False)
    d = await router(engine).decide(chat(("system", "You are terse, Bob."), ("user", "Solve the integral")), "chat")
    assert (d.model, d.route_reason, d.action, d.entity_types) == ("math-llm", "category", "allow", ())
    assert engine.calls["detect_pii"] == 0 and engine.calls["classify"] == 1 and "pii" not in d.timings


async def test_a_single_call_still_meets_the_deadline_and_is_cancelled():
    engine = FakeEngine(has_category_model=False, pii_delay_s=60)
    d = await router(engine, failure={"timeout_ms": 20, **OPEN}).decide(chat(("user", "Solve it")), "chat")
    assert (d.action, d.error, d.model) == ("degraded", "timeout", "small")
    assert engine.calls["cancelled:detect_pii"] == 1


async def test_without_user_text_the_classifier_is_skipped():
    engine = FakeEngine()
    d = await router(engine).decide(chat(("system", "You are terse, Bob.")), "chat")
    assert (d.model, d.route_reason) == ("small", "no_user_text")
    assert engine.calls["classify"] == 0 and d.entity_types == ("PERSON",)


async def test_completions_prompts_are_routed_and_masked():
    body = b'{"model": "auto", "prompt": ["Solve for Bob", "sum of primes"], "max_tokens": 7}'
    d = await router().decide(body, "completions")
    assert d.model == "math-llm"
    assert d.body == b'{"model": "math-llm", "prompt": ["Solve for [PERSON]", "sum of primes"], "max_tokens": 7}'


async def test_unreadable_body_raises_request_error():
    with pytest.raises(NotJson):
        await router().decide(b"{not json", "chat")


async def test_fail_open_degrades_to_default_and_masks_only_what_the_recognizers_find():
    engine = FakeEngine(error=InferenceError("model crashed"))
    body = chat(("user", f"Solve it. Card {CARD}, mail js@x.org, I'm John Smith"))
    d = await router(engine, failure=OPEN).decide(body, "chat")
    assert (d.action, d.model, d.rewrite_model, d.route_reason, d.error) == (
        "degraded", "small", True, "degraded", "inference_error")
    assert (d.category, d.confidence) == (None, None)
    assert d.entity_types == ("CREDIT_CARD", "EMAIL_ADDRESS")
    content = json.loads(d.body)["messages"][0]["content"]
    assert content == "Solve it. Card [CREDIT_CARD], mail [EMAIL_ADDRESS], I'm John Smith"


async def test_fail_open_keeps_the_client_model():
    engine = FakeEngine(error=Overloaded("queue full"))
    d = await router(engine, failure=OPEN).decide(chat(("user", "nothing sensitive"), model="gpt-4o"), "chat")
    assert (d.action, d.model, d.rewrite_model, d.error, d.body) == ("degraded", "gpt-4o", False, "overloaded", None)


async def test_fail_open_still_blocks_checksummed_numbers_under_block_policy():
    engine = FakeEngine(error=InferenceError("down"))
    d = await router(engine, failure=OPEN, pii={"default_policy": {"action": "block"}}).decide(
        chat(("user", f"card {CARD}")), "chat")
    assert (d.action, d.error, d.entity_types, d.body) == ("block", "inference_error", ("CREDIT_CARD",), None)


async def test_fail_open_without_recognizers_masks_nothing():
    engine = FakeEngine(error=InferenceError("down"))
    d = await router(engine, failure=OPEN, pii={"checksums": False, "patterns": "off"}).decide(
        chat(("user", f"card {CARD}")), "chat")
    assert d.entity_types == () and json.loads(d.body)["messages"][0]["content"] == f"card {CARD}"


@pytest.mark.parametrize("error", [InferenceError("down"), Overloaded("full")])
async def test_fail_closed_reraises_inference_errors(error):
    r = router(FakeEngine(pii_error=error), failure={"inference": "fail_closed"})
    with pytest.raises(type(error)):
        await r.decide(chat(("user", "Solve it")), "chat")


async def test_deadline_fails_closed_and_cancels_the_calls_in_flight():
    engine = FakeEngine(delay_s=60)
    r = router(engine, failure={"inference": "fail_closed", "timeout_ms": 20})
    with pytest.raises(InferenceTimeout, match="deadline"):
        await r.decide(chat(("system", "a"), ("user", "Solve it")), "chat")
    assert engine.calls["cancelled:classify"] == 1 and engine.calls["cancelled:detect_pii"] == 2


async def test_deadline_under_fail_open_gives_a_timeout_degraded_decision():
    engine = FakeEngine(pii_delay_s=60)
    d = await router(engine, failure={"timeout_ms": 20, **OPEN}).decide(chat(("user", "Solve it")), "chat")
    assert (d.action, d.error, d.model) == ("degraded", "timeout", "small")
    assert engine.calls["cancelled:detect_pii"] == 1


async def test_one_failed_call_cancels_the_others():
    engine = FakeEngine(classify_error=Overloaded("full"), pii_delay_s=60)
    d = await router(engine, failure={"timeout_ms": 60_000, "max_timeout_ms": 60_000, **OPEN}).decide(
        chat(("user", "Solve it")), "chat")
    assert d.error == "overloaded"
    assert engine.calls["cancelled:detect_pii"] == 1


async def test_decide_text_matches_the_chat_decision():
    r = router()
    t = await r.decide_text("Solve for Jane Doe")
    assert isinstance(t, TextDecision)
    assert (t.category, t.model, t.action, t.route_reason) == ("math", "math-llm", "mask", "category")
    assert t.pii == [{"start": 10, "end": 18, "label": "PERSON", "score": 0.85}]
    assert t.masked_text == "Solve for [PERSON]"


async def test_decide_text_with_client_model_and_empty_model():
    r = router()
    assert (await r.decide_text("Solve it", "gpt-4o")).route_reason == "client_model"
    assert (await r.decide_text("Solve it", "")).model == "math-llm"
    with pytest.raises(NoText):
        await r.decide_text("")


async def test_decide_text_follows_the_failure_policy():
    engine = FakeEngine(error=InferenceError("down"))
    t = await router(engine, failure=OPEN).decide_text(f"card {CARD}")
    assert (t.action, t.model, t.category, t.error, t.masked_text) == (
        "degraded", "small", None, "inference_error", "card [CREDIT_CARD]")
    with pytest.raises(InferenceError):
        await router(engine, failure={"inference": "fail_closed"}).decide_text("x")


def test_decide_texts_offline_output_shape():
    engine = FakeEngine()
    r = router(engine, pii={"policies": {"law-llm": {"action": "block"}}})
    texts = ["Solve the integral for Bob", "The court and Jane Doe", "", "héllo 😀 mail a@b.io"]
    decisions = r.decide_texts(texts)
    assert engine.calls["classify_many"] == 1 and engine.calls["detect_pii_many"] == 1
    assert engine.calls["classify"] == engine.calls["detect_pii"] == 0
    rows = [json.loads(d.to_json()) for d in decisions]
    assert all(list(row) == ["text", "category", "confidence", "model", "pii", "action", "masked_text"] for row in rows)
    assert rows[0] == {"text": texts[0], "category": "math", "confidence": 0.95, "model": "math-llm",
                       "pii": [{"start": 23, "end": 26, "label": "PERSON", "score": 0.85}],
                       "action": "mask", "masked_text": "Solve the integral for [PERSON]"}
    assert (rows[1]["action"], rows[1]["masked_text"], rows[1]["model"]) == ("block", None, "law-llm")
    assert (rows[2]["model"], rows[2]["pii"], rows[2]["action"]) == ("small", [], "allow")
    email = rows[3]["pii"][0]
    assert texts[3][email["start"]:email["end"]] == "a@b.io"
    assert rows[3]["masked_text"] == "héllo 😀 mail [EMAIL_ADDRESS]"
    assert "😀" in decisions[3].to_json()


def test_decide_texts_with_client_model_skips_classification():
    engine = FakeEngine()
    [d] = router(engine).decide_texts(["Solve it"], requested_model="gpt-4o")
    assert (d.model, d.category, d.route_reason) == ("gpt-4o", None, "client_model")
    assert engine.calls["classify_many"] == 0


async def test_a_cancelled_request_cancels_its_inference():
    engine = FakeEngine(delay_s=60)
    failure = {"timeout_ms": 60_000, "max_timeout_ms": 60_000}
    task = asyncio.ensure_future(router(engine, failure=failure).decide(chat(("user", "Solve")), "chat"))
    while engine.calls["detect_pii"] == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.calls["cancelled:classify"] == 1 and engine.calls["cancelled:detect_pii"] == 1


# --- big bodies: the size guard and the deadline ------------------------------------------------------------

def padded_chat(n_bytes: int, text: str = f"Solve it. Card {CARD}.") -> bytes:
    """A chat body of about `n_bytes`: prose, then `text` at the end of the last user message."""
    filler = "The court held that the contract was void for lack of consideration. "
    return chat(("user", filler * (n_bytes // len(filler)) + text))


async def test_a_body_over_max_inspect_bytes_is_degraded_at_once_without_the_models():
    engine = FakeEngine()
    r = router(engine, failure={"max_inspect_bytes": 4096, **OPEN})
    d = await r.decide(padded_chat(8192), "chat")
    assert (d.action, d.error, d.model, d.route_reason) == ("degraded", "too_large", "small", "degraded")
    assert engine.calls.total() == 0
    content = json.loads(d.body)["messages"][0]["content"]
    assert CARD not in content and content.endswith("Card [CREDIT_CARD].") and d.entity_types == ("CREDIT_CARD",)
    small = await r.decide(padded_chat(1024), "chat")
    assert small.error is None and engine.calls["detect_pii"] == 1


async def test_a_body_over_max_inspect_bytes_under_fail_closed_is_refused_unread():
    r = router(FakeEngine(), failure={"max_inspect_bytes": 4096, "inference": "fail_closed"})
    with pytest.raises(BodyTooLarge, match="4096 bytes"):
        await r.decide(b"{not json" + b" " * 8192, "chat")  # not even parsed
    with pytest.raises(NotJson):
        await r.decide(b"{not json", "chat")


async def test_decide_text_applies_the_size_guard_to_the_texts_utf8_length():
    engine = FakeEngine()
    t = await router(engine, failure={"max_inspect_bytes": 4096, **OPEN}).decide_text("é" * 2100 + f" {CARD}")
    assert (t.action, t.error, t.masked_text[-13:]) == ("degraded", "too_large", "[CREDIT_CARD]")
    assert engine.calls.total() == 0
    with pytest.raises(BodyTooLarge):
        await router(engine, failure={"max_inspect_bytes": 4096, "inference": "fail_closed"}).decide_text("x" * 5000)


def test_max_inspect_bytes_defaults_to_one_mebibyte_and_is_validated():
    assert make_config().failure.max_inspect_bytes == 1024 * 1024
    with pytest.raises(ConfigError, match="failure.max_inspect_bytes"):
        make_config(failure={"max_inspect_bytes": 10})
    with pytest.raises(ConfigError, match="failure.max_inspect_bytes"):
        make_config(failure={"max_inspect_bytes": "lots"})


async def test_parsing_counts_against_the_deadline():
    """The models get the deadline less what parsing took: a deadline already spent degrades at once."""
    engine = FakeEngine(delay_s=60)
    r = router(engine, failure={"timeout_ms": 1, "timeout_ms_per_kib": 0, **OPEN})
    d = await asyncio.wait_for(r.decide(padded_chat(300_000), "chat"), 5)
    assert (d.action, d.error) == ("degraded", "timeout")


@pytest.fixture(scope="module")
def tiny_engine(tiny_category_dir, tiny_pii_dir):
    """The tiny untrained models (PyTorch, CPU): real tokenization, windows and inference at real cost."""
    from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
    from sidecar.inference.engine import Engine

    engine = Engine.load(ModelsConfig(category=ModelConfig(path=str(tiny_category_dir), device="cpu"),
                                      pii=ModelConfig(path=str(tiny_pii_dir), device="cpu")), BatchingConfig())
    yield engine
    engine.close()


async def stalls_while(call) -> tuple[object, float]:
    """`call`'s result and the longest the event loop went without running a 5 ms heartbeat meanwhile."""
    longest = 0.0

    async def beat() -> None:
        nonlocal longest
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            longest = max(longest, loop.time() - before - 0.005)

    heart = asyncio.ensure_future(beat())
    await asyncio.sleep(0.01)
    try:
        return await call, longest
    finally:
        heart.cancel()


@pytest.mark.parametrize("shape", ["one message", "4000 messages"])
@pytest.mark.parametrize("max_inspect", [8 << 20, None], ids=["models tried", "over max_inspect_bytes"])
async def test_a_4mb_body_is_answered_degraded_with_the_card_masked_within_the_deadline_budget(
        tiny_engine, shape, max_inspect):
    """With timeout_ms 250 the answer used to take 8-10 s (tokenizing 4 MB with the GIL held, a Python loop
    per digit group in the fallback), and the event loop stood still for most of it. Bounds are generous:
    this machine may be busy; a bound that is hit is a regression, not noise."""
    failure = {"timeout_ms": 250, "timeout_ms_per_kib": 0, **OPEN} | (
        {"max_inspect_bytes": max_inspect} if max_inspect else {})
    r = DecisionMaker(make_config(failure=failure, pii={"default_policy": {"score_threshold": 0.99}}), tiny_engine)
    filler = "The court held that the contract was void for lack of consideration, said John Smith. "
    text = filler * (4_000_000 // len(filler))
    if shape == "one message":
        body = chat(("user", text + f" Pay with {CARD} today."))
    else:
        parts = [text[i:i + 1000] for i in range(0, len(text), 1000)]
        body = chat(*[("user", part) for part in parts], ("user", f"Pay with {CARD} today."))
    started = asyncio.get_running_loop().time()
    d, stalled = await stalls_while(asyncio.wait_for(r.decide(body, "chat"), 5))
    elapsed = asyncio.get_running_loop().time() - started
    assert d.action == "degraded"
    assert d.error in (("timeout", "overloaded") if max_inspect else ("too_large",))
    assert d.entity_counts == {"CREDIT_CARD": 1}
    last = json.loads(d.body)["messages"][-1]["content"]
    assert CARD not in d.body.decode() and last.endswith("Pay with [CREDIT_CARD] today.")
    assert elapsed < 5 and stalled < 1.0, (elapsed, stalled)


def test_the_removed_pii_roles_setting_is_refused_with_a_migration_hint():
    with pytest.raises(ConfigError, match="pii.roles: no longer a setting: every text"):
        make_config(pii={"roles": ["user"]})


def test_the_decision_deadline_grows_per_kib_up_to_its_cap_which_must_cover_the_base():
    failure = make_config(failure={"timeout_ms": 100, "timeout_ms_per_kib": 10, "max_timeout_ms": 300}).failure
    assert (failure.timeout_s(0), failure.timeout_s(10 * 1024), failure.timeout_s(10 << 20)) == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match="max_timeout_ms must be at least timeout_ms"):
        make_config(failure={"timeout_ms": 5000})


@pytest.mark.parametrize("path", ["/v1/chat/completions?ref=4111.1111.1111.1111", "/v1/chat/completions?ref=4111,1111,1111,1111",
                                  "/v1/files/4111/1111/1111/1111", "/v1/x?id=cc_4111_1111_1111_1111",
                                  "/v1/x?ref=card4111111111111111"])
def test_a_card_in_a_url_is_found_whatever_punctuation_separates_its_groups(path):
    assert "CREDIT_CARD" in router().url_pii(path)


@pytest.mark.parametrize("path", ["/v1/models/v1.2.3?limit=10", "/v1/x?date=2024/01/15", "/v1/x?ip_v=10.0.0.1&t=12:30:45"])
def test_versions_dates_and_times_in_a_url_are_not_cards(path):
    assert "CREDIT_CARD" not in router().url_pii(path)


@pytest.mark.parametrize(("value", "found"), [
    ("4111, 1111, 1111, 1111", "CREDIT_CARD"), ("4111\t1111\t1111\t1111", "CREDIT_CARD"), ("078 - 05 - 1120", "US_SSN"),
    ("415 - 555 - 0132", "PHONE_NUMBER"), ("GB82-WEST-1234-5698-7654-32", "IBAN_CODE"), ("accGB82WEST12345698765432", "IBAN_CODE"),
])
def test_a_value_that_cannot_be_masked_is_read_with_wider_separators_and_glued_ibans(value, found):
    assert found in router().recognized_types([value])


@pytest.mark.parametrize("value", ["1000 - 2000 - 3000 - 4000", "47.360000, 7.330000", "2024-12-05T10:30:00Z", "v1.22.333",
                                   "36, 218, 604, 712, 139", "0f8fad5b-d9cb-469f-a165-70867728950e"])
def test_ordinary_header_values_are_not_personal_data(value):
    assert router().recognized_types([value]) == ()


async def test_an_ssn_sent_as_a_json_number_that_lost_its_leading_zero_is_masked():
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "update my record"}],
                       "metadata": {"ssn": 78051120, "count": 12345678}}).encode()
    d = await router(FakeEngine(pii_scores={"PERSON": 0.1})).decide(body, "chat")
    assert json.loads(d.body)["metadata"] == {"ssn": "[US_SSN]", "count": 12345678}
