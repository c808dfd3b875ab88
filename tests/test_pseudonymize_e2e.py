"""Pseudonymization end to end through the real Envoy (deploy/envoy.yaml) and the sidecar as its own process.

Every policy of router.yaml is switched to ``action: pseudonymize`` (business-expert keeps its block list),
so every request asks Envoy for its answer (mode_override) and the same ext_proc stream restores it. The
mock backends quote the last user text they received, so each answer carries exactly the placeholders the
backend saw, and the client must get the original values back in their place: in JSON answers and in the
server-sent events of chat completions, the Responses API and the Messages API, whatever the chunking.

As in test_e2e_envoy.py the models are tiny and untrained: ``score_threshold: 0.99`` drops the model's own
spans, so what is pseudonymized is exactly what the pattern recognizers (always on) find: the planted email
addresses. ``routing.confidence_threshold: 0`` routes by the category the model reports; every backend's
policy pseudonymizes, so the backend chosen does not matter (the answer names it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import aiohttp
import pytest
import yaml

from sidecar_demo.configs import ROUTER_CONFIG
from sidecar_demo.stack import Received, Stack

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(300)]

CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
APIS = (CHAT, RESPONSES, MESSAGES)
API_IDS = {CHAT: "chat", RESPONSES: "responses", MESSAGES: "messages"}
ROUTER_YAML = yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8"))
TABLE: dict[str, str] = ROUTER_YAML["routing"]["categories"]

JANE, BOB = "jane.roe@example.org", "bob.stone@example.net"
SHORT = "al@ex.io"  # shorter than its placeholder: the restored answer shrinks
P1, P2 = "<EMAIL_ADDRESS_1>", "<EMAIL_ADDRESS_2>"
CHUNK = "x-mock-chunk-chars"
TOOL = "x-mock-tool-call"


# --- the stack -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(stack_category_dir, stack_pii_dir):
    policy = {"action": "pseudonymize", "score_threshold": 0.99}
    overrides = {
        "models": {"category": {"path": str(stack_category_dir)}, "pii": {"path": str(stack_pii_dir)}},
        "routing": {"confidence_threshold": 0.0},
        "pii": {"default_policy": policy, "policies": {m: policy for m in ROUTER_YAML["pii"]["policies"]}},
        # 16 streams at once on a busy 2-core CI machine: the shipped 250 ms deadline could refuse one (503,
        # as designed); this suite is about the values, not about overload.
        "failure": {"timeout_ms": 2000},
    }
    with Stack(router_overrides=overrides, ready_timeout_s=180) as running:
        assert running.config.pii.pseudonymizes
        assert running.config.pii.policies["business-expert"].block_entities  # kept from router.yaml
        yield running


@pytest.fixture
def gateway(stack):
    if not stack.sidecar_running:
        stack.start_sidecar()
    stack.wait_envoy_sees_sidecar(healthy=True)
    stack.clear_received()
    return stack


# --- requests and answers of the three APIs ------------------------------------------------------------------

def body_for(api: str, *texts: str, stream: bool = False, roles: tuple[str, ...] | None = None) -> bytes:
    """A request whose turns are `texts` (all user turns unless `roles` says otherwise)."""
    roles = roles or ("user",) * len(texts)
    turns = list(zip(roles, texts, strict=True))
    if api == CHAT:
        doc: dict = {"model": "auto", "messages": [{"role": r, "content": t} for r, t in turns]}
    elif api == RESPONSES:  # input items with text parts (a bare string is checked below too)
        doc = {"model": "auto", "input": [
            {"role": r, "content": [{"type": "output_text" if r == "assistant" else "input_text", "text": t}]}
            for r, t in turns]}
    else:
        doc = {"model": "auto", "max_tokens": 256,
               "messages": [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]}
    if stream:
        doc["stream"] = True
    return json.dumps(doc).encode()


def call(stack: Stack, path: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(stack.url + path, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def json_text(api: str, answer: dict) -> str:
    if api == CHAT:
        return answer["choices"][0]["message"]["content"]
    if api == RESPONSES:
        return answer["output"][0]["content"][0]["text"]
    return answer["content"][0]["text"]


def sse_events(stream: bytes) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of each server-sent event; data is JSON, or the raw text (``[DONE]``)."""
    out = []
    for block in stream.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        data = "\n".join(line[5:].removeprefix(" ") for line in lines if line.startswith("data:"))
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def stream_text(api: str, stream: bytes) -> tuple[str, list[str]]:
    """The text the client assembles from the deltas, and the deltas themselves. Also checks the events
    that repeat the whole text (Responses) say the same."""
    events = sse_events(stream)
    deltas = []
    if api == CHAT:
        assert events[-1] == (None, "[DONE]")
        for _, e in events[:-1]:
            content = e["choices"][0]["delta"].get("content")
            if content is not None:
                deltas.append(content)
        return "".join(deltas), deltas
    for name, e in events:
        assert name == e["type"], "the event: line and the data's type disagree"
        if api == RESPONSES and e["type"] == "response.output_text.delta":
            deltas.append(e["delta"])
        if api == MESSAGES and e["type"] == "content_block_delta":
            deltas.append(e["delta"]["text"])
    text = "".join(deltas)
    if api == RESPONSES:
        [done] = [e for _, e in events if e["type"] == "response.output_text.done"]
        [completed] = [e for _, e in events if e["type"] == "response.completed"]
        assert done["text"] == text
        assert completed["response"]["output"][0]["content"][0]["text"] == text
        assert [e["type"] for _, e in events][-1] == "response.completed"
    else:
        assert [e["type"] for _, e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    return text, deltas


def only(received: list[Received]) -> Received:
    assert len(received) == 1, [(r.backend, r.path) for r in received]
    return received[0]


def received_user_text(api: str, got: Received) -> str:
    """The last user text the backend received (what the mock quotes)."""
    doc = got.json()
    items = doc["messages"] if api != RESPONSES else doc["input"]
    if isinstance(items, str):
        return items
    content = [m for m in items if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def check_pseudonymized(got: Received, planted: tuple[str, ...], placeholders: tuple[str, ...]) -> None:
    """The backend got placeholders, never a planted value, and the sidecar's headers say so."""
    for value in planted:
        assert value.encode() not in got.body, f"{value} reached the backend"
    for placeholder in placeholders:
        assert placeholder.encode() in got.body
    assert got.headers["x-router-action"] == "pseudonymize"
    assert got.headers["x-router-pii"] == "EMAIL_ADDRESS"


# --- 1. the backend never sees a value; the client gets them back --------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_the_backend_sees_only_placeholders_and_the_client_gets_the_values_back(gateway, api, stream):
    text = f"Forward the minutes to {JANE}, copy {BOB}, and reply to {JANE} once done."
    status, headers, answer = call(gateway, api, body_for(api, text, stream=stream))
    got = only(gateway.received())
    assert status == 200, answer
    check_pseudonymized(got, (JANE, BOB), (P1, P2))
    assert received_user_text(api, got) == f"Forward the minutes to {P1}, copy {P2}, and reply to {P1} once done."
    assert headers["x-router-action"] == "pseudonymize" and headers["x-mock-backend"] == got.backend
    expected = f"[{got.backend}] received: {text}"
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        assert stream_text(api, answer)[0] == expected
    else:
        assert json_text(api, json.loads(answer)) == expected
    assert P1 not in answer.decode() and P2 not in answer.decode()


def test_a_responses_input_given_as_a_bare_string_is_pseudonymized_and_restored(gateway):
    text = f"Say hello to {BOB}."
    status, _, answer = call(gateway, RESPONSES, json.dumps({"model": "auto", "input": text}).encode())
    got = only(gateway.received())
    assert status == 200 and got.json()["input"] == f"Say hello to {P1}."
    check_pseudonymized(got, (BOB,), (P1,))
    assert json_text(RESPONSES, json.loads(answer)) == f"[{got.backend}] received: {text}"


# --- 2. event boundaries at every offset of every placeholder ------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, 7])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_streamed_deltas_cut_anywhere_in_a_placeholder_reassemble_to_the_restored_reply(gateway, api, size):
    text = f"{JANE} wrote to {BOB}; answer {JANE}, not {BOB}."
    status, _, answer = call(gateway, api, body_for(api, text, stream=True), {CHUNK: str(size)})
    got = only(gateway.received())
    assert status == 200
    check_pseudonymized(got, (JANE, BOB), (P1, P2))
    assembled, deltas = stream_text(api, answer)
    assert assembled == f"[{got.backend}] received: {text}"
    quoted = f"[{got.backend}] received: {P1} wrote to {P2}; answer {P1}, not {P2}."
    # Every event the mock sent reaches the client (one whose piece is held back carries an empty delta) ...
    assert len(deltas) >= -(-len(quoted) // size)
    # ... no piece of a placeholder ever does ...
    assert not any("<" in d or ">" in d for d in deltas)
    # ... and what is held back is at most a partial placeholder, never the stream.
    assert longest_run(deltas, "") <= len(P1) // size + 1


def longest_run(items: list[str], value: str) -> int:
    best = run = 0
    for item in items:
        run = run + 1 if item == value else 0
        best = max(best, run)
    return best


# --- 3. tool-call arguments ----------------------------------------------------------------------------------

def test_tool_call_arguments_in_a_json_answer_are_restored_and_valid_json(gateway):
    text = f"Send the invoice to {JANE} and {BOB}."
    status, _, answer = call(gateway, CHAT, body_for(CHAT, text), {TOOL: "send_mail"})
    got = only(gateway.received())
    assert status == 200
    check_pseudonymized(got, (JANE, BOB), (P1, P2))
    message = json.loads(answer)["choices"][0]["message"]
    [call_] = message["tool_calls"]
    assert call_["function"]["name"] == "send_mail"
    assert json.loads(call_["function"]["arguments"]) == {"text": text}
    assert message["content"] == f"[{got.backend}] received: {text}"


@pytest.mark.parametrize("size", [1, 4])
def test_streamed_tool_call_arguments_are_restored_and_valid_json(gateway, size):
    text = f"Send the invoice to {JANE} and {BOB}."
    status, _, answer = call(gateway, CHAT, body_for(CHAT, text, stream=True), {CHUNK: str(size), TOOL: "send_mail"})
    got = only(gateway.received())
    assert status == 200
    check_pseudonymized(got, (JANE, BOB), (P1, P2))
    events = sse_events(answer)
    assert events[-1] == (None, "[DONE]")
    names, arguments, content = [], [], []
    for _, e in events[:-1]:
        delta = e["choices"][0]["delta"]
        content.append(delta.get("content") or "")
        for call_ in delta.get("tool_calls") or []:
            assert call_["index"] == 0
            names.append(call_["function"].get("name") or "")
            arguments.append(call_["function"].get("arguments") or "")
    assert "".join(names) == "send_mail"
    assert json.loads("".join(arguments)) == {"text": text}
    assert "".join(content) == f"[{got.backend}] received: {text}"
    assert events[-2][1]["choices"][0]["finish_reason"] == "tool_calls"


# --- 4. a conversation keeps its placeholders ----------------------------------------------------------------

@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_a_conversation_that_resends_its_history_gets_the_same_placeholders_each_turn(gateway, api):
    first = f"I am Jane, {JANE}. Please remember my address."
    status, _, answer1 = call(gateway, api, body_for(api, first))
    turn1 = only(gateway.received())
    assert status == 200
    check_pseudonymized(turn1, (JANE,), (P1,))
    reply1 = json_text(api, json.loads(answer1))
    assert reply1 == f"[{turn1.backend}] received: {first}"  # the client's copy of the history has the value

    gateway.clear_received()
    second = f"Now copy {BOB} on the mail to {JANE}."
    status, _, answer2 = call(gateway, api, body_for(api, first, reply1, second, roles=("user", "assistant", "user")))
    turn2 = only(gateway.received())
    assert status == 200
    check_pseudonymized(turn2, (JANE, BOB), (P1, P2))
    items1 = turn1.json()["messages" if api != RESPONSES else "input"]
    items2 = turn2.json()["messages" if api != RESPONSES else "input"]
    assert items2[0] == items1[0]  # the re-sent first turn, exactly as the backend saw it the first time
    assert P1 in json.dumps(items2[1]) and JANE not in json.dumps(items2[1])  # the assistant's echo of it
    assert received_user_text(api, turn2) == f"Now copy {P2} on the mail to {P1}."
    assert json_text(api, json.loads(answer2)) == f"[{turn2.backend}] received: {second}"


# --- 5. concurrent streams never mix -------------------------------------------------------------------------

async def test_concurrent_streams_with_different_values_each_get_only_their_own(gateway):
    """Every request gets <EMAIL_ADDRESS_1> for its own address: a map shared or swapped between ext_proc
    streams would show up as another request's address in an answer."""
    values = [f"user{i:02d}.{name}@example.org" for i, name in enumerate(["ann", "bo", "cy", "di"] * 4)]
    apis = [APIS[i % len(APIS)] for i in range(len(values))]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def post(api: str, value: str) -> tuple[int, str, bytes]:
            text = f"Only {value} may read this: reply to {value}."
            async with session.post(gateway.url + api, data=body_for(api, text, stream=True),
                                    headers={"content-type": "application/json", CHUNK: "1"}) as r:
                return r.status, r.headers.get("x-mock-backend", ""), await r.read()

        answers = await asyncio.gather(*(post(api, v) for api, v in zip(apis, values, strict=True)))
    for api, value, (status, backend, answer) in zip(apis, values, answers, strict=True):
        assert status == 200
        assert stream_text(api, answer)[0] == f"[{backend}] received: Only {value} may read this: reply to {value}."
        others = [v for v in values if v != value]
        assert not any(v.encode() in answer for v in others), "another request's value leaked into this answer"
    received = gateway.received()
    assert len(received) == len(values)
    for got in received:
        assert not any(v.encode() in got.body for v in values)
        assert got.headers["x-router-action"] == "pseudonymize"


def test_two_streams_on_threads_see_only_their_own_value(gateway):
    results: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def run(value: str) -> None:
        text = f"Reply to {value} and nobody else."
        results[value] = call(gateway, CHAT, body_for(CHAT, text, stream=True), {CHUNK: "1"})

    threads = [threading.Thread(target=run, args=(v,)) for v in (JANE, BOB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for value, other in ((JANE, BOB), (BOB, JANE)):
        status, headers, answer = results[value]
        assert status == 200
        assert stream_text(CHAT, answer)[0] == f"[{headers['x-mock-backend']}] received: Reply to {value} and nobody else."
        assert other.encode() not in answer


# --- 6. a JSON answer whose length changed -------------------------------------------------------------------

@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
@pytest.mark.parametrize("value", [JANE, SHORT], ids=["longer", "shorter"])
def test_a_restored_json_answer_is_whole_valid_json_with_a_correct_length(gateway, api, value):
    """The restored body is longer or shorter than the one the backend sent: the client must not get the
    backend's content-length (a client trusting it would wait for bytes that never come, or cut the JSON)."""
    text = f"Write to {value}, then to {value} again."
    status, headers, answer = call(gateway, api, body_for(api, text))
    got = only(gateway.received())
    assert status == 200
    check_pseudonymized(got, (value,), (P1,))
    assert "content-length" not in headers or int(headers["content-length"]) == len(answer)
    assert json_text(api, json.loads(answer)) == f"[{got.backend}] received: {text}"
    # the same answer over a client that reads by the length framing, as aiohttp does
    async def fetch() -> tuple[int, bytes, int | None]:
        async with aiohttp.ClientSession() as session, session.post(
                gateway.url + api, data=body_for(api, text), headers={"content-type": "application/json"}) as r:
            return r.status, await r.read(), r.content_length

    status, again, length = asyncio.run(fetch())
    assert status == 200 and (length is None or length == len(again))
    assert json_text(api, json.loads(again)) == f"[{got.backend}] received: {text}"


# --- 7. text the client wrote is never rewritten -------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_a_placeholder_the_client_wrote_itself_comes_back_as_written(gateway, api, stream):
    text = f"Keep the literal {P1} as it is; my address is {JANE}."
    status, _, answer = call(gateway, api, body_for(api, text, stream=stream), {CHUNK: "1"} if stream else None)
    got = only(gateway.received())
    assert status == 200
    check_pseudonymized(got, (JANE,), (P1, P2))
    assert received_user_text(api, got) == f"Keep the literal {P1} as it is; my address is {P2}."
    expected = f"[{got.backend}] received: {text}"
    assert (stream_text(api, answer)[0] if stream else json_text(api, json.loads(answer))) == expected
