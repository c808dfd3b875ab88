"""The answer scan (``response_pii``) end to end through the real Envoy and the sidecar as its own process.

The mock backends add text the request did not carry (``x-mock-say``): an email address and a card number
"the model said". Policies by backend (the client names the backend, so the policy is known):

- math-expert: ``action: mask``, ``response_pii: mask``: new personal data in the answer is masked;
- science-expert: ``action: pseudonymize``, ``response_pii: mask``: the request's own values come back
  restored, the new ones masked;
- humanities-expert: ``response_pii: block``: an answer with new personal data is withheld (502; a stream
  ends with an error event and nothing of the held text);
- general (the default policy): ``response_pii: off``: the answer passes as the backend wrote it, the control
  that shows the mock really says what the others mask.

As in the other Envoy suites the models are tiny and untrained (``score_threshold: 0.99``): what is found is
what the pattern and checksum recognizers find: email addresses and card numbers.
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from sidecar_demo.configs import ROUTER_CONFIG
from sidecar_demo.stack import Stack, json_lines
from tests.test_pseudonymize_e2e import (
    API_IDS,
    APIS,
    CHAT,
    CHUNK,
    MESSAGES,
    RESPONSES,
    body_for,
    call,
    json_text,
    only,
    sse_events,
    stream_text,
)

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(300)]

ROUTER_YAML = yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8"))
SAID_EMAIL, SAID_CARD = "leak.person@example.com", "4111 1111 1111 1111"
SAID = f"For details write to {SAID_EMAIL} or pay with {SAID_CARD} today."
MASKED = "For details write to [EMAIL_ADDRESS] or pay with [CREDIT_CARD] today."
SAY = {"x-mock-say": base64.b64encode(SAID.encode()).decode()}
JANE = "jane.roe@example.org"


@pytest.fixture(scope="module")
def stack(stack_category_dir, stack_pii_dir):
    base = {"score_threshold": 0.99}
    overrides = {
        "models": {"category": {"path": str(stack_category_dir)}, "pii": {"path": str(stack_pii_dir)}},
        "failure": {"timeout_ms": 2000},  # about the answers, not about overload on a busy CI machine
        "pii": {"response_window_chars": 48, "default_policy": {**base, "response_pii": "off"}, "policies": {
            "math-expert": {**base, "action": "mask", "response_pii": "mask"},
            "science-expert": {**base, "action": "pseudonymize", "response_pii": "mask"},
            "humanities-expert": {**base, "action": "mask", "response_pii": "block"},
        }},
    }
    with Stack(router_overrides=overrides, ready_timeout_s=180) as running:
        assert running.config.pii.reads_answers and running.config.pii.default_policy.response_pii == "off"
        yield running


@pytest.fixture
def gateway(stack):
    stack.clear_received()
    return stack


def ask(api: str, model: str, text: str, stream: bool = False) -> bytes:
    doc = json.loads(body_for(api, text, stream=stream))
    doc["model"] = model
    return json.dumps(doc).encode()


def answer_text(api: str, answer: bytes, stream: bool) -> str:
    return stream_text(api, answer)[0] if stream else json_text(api, json.loads(answer))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_personal_data_the_backend_adds_is_masked_in_the_answer(gateway, api, stream):
    status, _, answer = call(gateway, api, ask(api, "math-expert", "What is two plus two?", stream), SAY)
    assert status == 200, answer
    assert SAID_EMAIL.encode() not in answer and SAID_CARD.encode() not in answer
    assert answer_text(api, answer, stream) == f"[math-expert] received: What is two plus two? {MASKED}"


@pytest.mark.parametrize("size", [1, 5, 17])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_a_streamed_answer_cut_anywhere_is_masked_and_arrives_whole(gateway, api, size):
    text = "Please summarise the meeting notes from Tuesday for the whole team."
    status, _, answer = call(gateway, api, ask(api, "math-expert", text, True), {**SAY, CHUNK: str(size)})
    assert status == 200, answer
    assert SAID_EMAIL.encode() not in answer and SAID_CARD.encode() not in answer
    assert stream_text(api, answer)[0] == f"[math-expert] received: {text} {MASKED}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_the_requests_own_values_come_back_and_new_ones_are_masked(gateway, api, stream):
    text = f"Send the report to {JANE} please."
    status, _, answer = call(gateway, api, ask(api, "science-expert", text, stream), {**SAY, CHUNK: "3"})
    got = only(gateway.received())
    assert JANE.encode() not in got.body and b"<EMAIL_ADDRESS_1>" in got.body
    assert status == 200, answer
    assert answer_text(api, answer, stream) == f"[science-expert] received: {text} {MASKED}"
    assert SAID_EMAIL.encode() not in answer


@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_a_json_answer_with_personal_data_under_block_is_withheld(gateway, api):
    status, headers, answer = call(gateway, api, ask(api, "humanities-expert", "Who wrote Hamlet?"), SAY)
    assert status == 502, answer
    assert SAID_EMAIL.encode() not in answer and SAID_CARD.encode() not in answer
    assert (headers["x-router-action"], headers["x-router-reason"]) == ("rejected", "pii_in_answer")
    error = json.loads(answer)
    assert "EMAIL_ADDRESS" in json.dumps(error)
    if api == MESSAGES:
        assert error["type"] == "error"


@pytest.mark.parametrize("api", APIS, ids=API_IDS.get)
def test_a_stream_with_personal_data_under_block_ends_with_an_error_event(gateway, api):
    status, _, answer = call(gateway, api, ask(api, "humanities-expert", "Who wrote Hamlet?", True),
                             {**SAY, CHUNK: "4"})
    assert status == 200  # the stream had begun
    assert SAID_EMAIL.encode() not in answer and SAID_CARD.encode() not in answer
    name, last = sse_events(answer)[-1]
    if api == CHAT:
        assert last["error"]["code"] == "pii_in_answer"
    elif api == RESPONSES:
        assert (name, last["type"], last["code"]) == ("error", "error", "pii_in_answer")
    else:
        assert (name, last["type"]) == ("error", "error")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_clean_answer_under_block_passes_unchanged(gateway, stream):
    status, _, answer = call(gateway, CHAT, ask(CHAT, "humanities-expert", "Who wrote Hamlet?", stream))
    assert status == 200, answer
    assert answer_text(CHAT, answer, stream) == "[humanities-expert] received: Who wrote Hamlet?"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_without_response_pii_the_answer_passes_as_the_backend_wrote_it(gateway, stream):
    status, _, answer = call(gateway, CHAT, ask(CHAT, "general", "What is two plus two?", stream), SAY)
    assert status == 200, answer
    assert answer_text(CHAT, answer, stream) == f"[general] received: What is two plus two? {SAID}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_sidecar_logs_the_scan_by_type_and_never_the_values(gateway: Stack, stream):
    call(gateway, CHAT, ask(CHAT, "math-expert", "What is two plus two?", stream), {**SAY, CHUNK: "5"})
    request_id = only(gateway.received()).headers["x-request-id"]
    log = gateway.workdir / "logs" / "sidecar.log"
    assert SAID_EMAIL not in log.read_text(encoding="utf-8") and SAID_CARD not in log.read_text(encoding="utf-8")
    [answer] = [a for a in json_lines(log) if a.get("event") == "answer" and a.get("request_id") == request_id]
    assert answer["masked"] == {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 1} and answer["streamed"] is stream
