"""End to end through the real Envoy with the shipped deploy/envoy.yaml and deploy/router.yaml.

One stack per module (Envoy, the sidecar as its own process, a recording mock per backend cluster), on
loopback ports chosen at run time. The models are tiny and untrained, so the sidecar's config is changed in
two places only, both to make outcomes exact rather than to change behaviour:

- ``routing.confidence_threshold: 0``: every request routes by the category the model reports (an untrained
  model is never confident); routing is checked against that reported category and router.yaml's table;
- PII ``score_threshold: 0.99``: the untrained model's spans (scores below 0.7) are dropped, so what is
  masked is exactly what the checksum recognizers find (Luhn-valid cards, valid IBANs, score 1.0).

Tests that restart the sidecar restore it before they end.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from sidecar.checksums import find_checksum_spans
from sidecar.mutations import OWNED_HEADERS
from sidecar_demo.configs import ROUTER_CONFIG
from sidecar_demo.stack import Received, Stack, json_lines
from tests.factories import gb_iban, luhn_card

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(300)]

CHAT = "/v1/chat/completions"
ROUTER_YAML = yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8"))
TABLE: dict[str, str] = ROUTER_YAML["routing"]["categories"]
DEFAULT_MODEL: str = ROUTER_YAML["routing"]["default_model"]
BLOCKING = {m for m, p in ROUTER_YAML["pii"]["policies"].items() if "CREDIT_CARD" in p.get("block_entities", [])}
MASKING = sorted(set(TABLE.values()) - BLOCKING | {DEFAULT_MODEL})
CARD_MASK = "*" * 12  # router.yaml's CREDIT_CARD operator (chars_to_keep: 4) on a 16-digit card
BUFFER_LIMIT = 4 * 1024 * 1024  # envoy.yaml per_connection_buffer_limit_bytes

SUBJECTS = [
    "What is the derivative of x^3 at x = 2?", "How do mitochondria make ATP?",
    "Was the contract void for lack of consideration?", "What caused the fall of the Western Roman Empire?",
    "How should a company book a duplicate supplier payment?", "What is Kant's categorical imperative?",
    "Balance the equation for burning methane.", "How does a transistor amplify a signal?",
    "What does inflation do to real wages?", "Which cognitive biases affect eyewitness memory?",
    "What is the time complexity of quicksort?", "How is type 2 diabetes treated?",
]


# --- data whose masking is exactly predictable -------------------------------------------------------------



def chat(*contents: str, model: str = "auto", roles: tuple[str, ...] | None = None) -> bytes:
    roles = roles or ("user",) * len(contents)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    return json.dumps({"model": model, "messages": messages}, ensure_ascii=False).encode("utf-8")


def masked(body: bytes, cards: list[str], ibans: list[str]) -> bytes:
    """What router.yaml's default policy turns `body` into: cards keep their last 4, IBANs are replaced."""
    for card in cards:
        body = body.replace(card.encode(), ("*" * (len(card) - 4) + card[-4:]).encode())
    for iban in ibans:
        body = body.replace(iban.encode(), b"[IBAN_CODE]")
    return body


# --- the stack -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(stack_category_dir, stack_pii_dir):
    overrides = {
        "models": {"category": {"path": str(stack_category_dir)}, "pii": {"path": str(stack_pii_dir)}},
        "routing": {"confidence_threshold": 0.0},
        "pii": {"default_policy": {"score_threshold": 0.99},
                "policies": {m: {"score_threshold": 0.99} for m in ROUTER_YAML["pii"]["policies"]}},
    }
    with Stack(router_overrides=overrides, ready_timeout_s=180) as running:
        yield running


@pytest.fixture
def gateway(stack):
    """The shared stack with every mock's record cleared, and its sidecar up (a failed test may have left
    it down) and seen healthy by Envoy: a test right after a sidecar restart must not start while Envoy's
    health check still holds the old, dead process against it."""
    if not stack.sidecar_running:
        stack.start_sidecar()
    stack.wait_envoy_sees_sidecar(healthy=True)
    stack.clear_received()
    return stack


def call(stack: Stack, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(stack.url + path, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def only(received: list[Received]) -> Received:
    assert len(received) == 1, [(r.backend, r.path) for r in received]
    return received[0]


def router_headers(received: Received) -> dict[str, str]:
    return {k: v for k, v in received.headers.items() if k in OWNED_HEADERS}


# --- routing -------------------------------------------------------------------------------------------------

def test_each_request_reaches_the_backend_its_category_maps_to(gateway):
    reached = Counter()
    for text in SUBJECTS:
        gateway.clear_received()
        status, headers, _ = call(gateway, CHAT, chat(text))
        got = only(gateway.received())
        category = got.headers["x-router-category"]
        assert status == 200
        assert got.headers["x-router-action"] == "allow" and got.headers["x-router-reason"] == "category"
        assert got.backend == TABLE[category] == got.headers["x-selected-model"] == headers["x-mock-backend"]
        assert got.json()["model"] == got.backend  # "auto" rewritten to the chosen backend
        reached[got.backend] += 1
    assert len(reached) >= 2, f"the untrained model sent every subject to one backend: {reached}"


@pytest.mark.parametrize("backend", sorted(set(TABLE.values()) | {DEFAULT_MODEL}))
def test_a_client_named_backend_model_is_routed_to_that_backend(gateway, backend):
    status, _, _ = call(gateway, CHAT, chat("Tell me something.", model=backend))
    got = only(gateway.received())
    assert status == 200 and got.backend == backend
    assert got.headers["x-router-reason"] == "client_model" and "x-router-category" not in got.headers


def test_an_unknown_client_model_goes_to_the_default_backend(gateway):
    status, _, _ = call(gateway, CHAT, chat("Tell me something.", model="gpt-4o"))
    got = only(gateway.received())
    assert status == 200 and got.backend == DEFAULT_MODEL
    assert got.json()["model"] == "gpt-4o"


def test_completions_prompts_are_routed_and_masked(gateway):
    card = luhn_card(random.Random(7))
    body = json.dumps({"model": "auto", "prompt": f"Charge {card} for {SUBJECTS[0]}"}).encode()
    status, _, _ = call(gateway, "/v1/completions", body)
    if status == 403:  # the category maps to a backend whose policy blocks cards
        assert gateway.received() == []
        return
    got = only(gateway.received())
    assert status == 200 and got.backend == TABLE[got.headers["x-router-category"]]
    assert card not in got.json()["prompt"] and CARD_MASK + card[12:] in got.json()["prompt"]


# --- PII -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", MASKING)
def test_the_backend_receives_masked_text_and_never_the_original_values(gateway, backend):
    rng = random.Random(backend)
    cards, ibans = [luhn_card(rng), luhn_card(rng)], [gb_iban(rng)]
    spaced = " ".join(cards[1][i:i + 4] for i in range(0, 16, 4))
    body = chat(f"You help {backend} users. Never repeat {ibans[0]}.",
                f"Pay with {cards[0]}, or my other card {spaced}, as you think best.",
                model=backend, roles=("system", "user"))
    status, _, answer = call(gateway, CHAT, body)
    got = only(gateway.received())
    assert status == 200 and got.backend == backend
    assert got.headers["x-router-action"] == "mask"
    assert set(got.headers["x-router-pii"].split(",")) == {"CREDIT_CARD", "IBAN_CODE"}
    for value in [*cards, spaced, *ibans]:
        assert value.encode() not in got.body and value.encode() not in answer
    text = " ".join(m["content"] for m in got.json()["messages"])
    assert find_checksum_spans(text) == [], "a checksum-valid number reached the backend"
    assert CARD_MASK + cards[0][12:] in text and "[IBAN_CODE]" in text


@pytest.mark.parametrize("value", ["card", "iban"])
def test_a_blocked_request_gets_403_and_never_reaches_a_backend(gateway, value):
    rng = random.Random(value)
    secret = luhn_card(rng) if value == "card" else gb_iban(rng)
    [backend] = sorted(BLOCKING)
    status, headers, answer = call(gateway, CHAT, chat(f"Book the refund to {secret}.", model=backend))
    error = json.loads(answer)["error"]
    assert status == 403 and headers["x-router-action"] == "block"
    assert error["code"] == "pii_detected" and ("CREDIT_CARD" if value == "card" else "IBAN_CODE") in error["message"]
    assert secret not in answer.decode()
    assert gateway.received() == []
    status, _, _ = call(gateway, CHAT, chat("Book the refund to the usual account.", model=backend))
    assert status == 200 and only(gateway.received()).backend == backend


# --- headers the sidecar owns --------------------------------------------------------------------------------

def test_a_client_cannot_choose_the_backend_with_router_headers(gateway):
    reached = set()
    for spoof in ("math-expert", "humanities-expert"):
        gateway.clear_received()
        forged = {h: "forged" for h in OWNED_HEADERS} | {"x-selected-model": spoof, "x-router-action": "allow"}
        status, _, _ = call(gateway, CHAT, chat(SUBJECTS[1]), headers=forged)
        got = only(gateway.received())
        assert status == 200
        assert got.backend == TABLE[got.headers["x-router-category"]] == got.headers["x-selected-model"]
        assert "forged" not in router_headers(got).values()
        reached.add(got.backend)
    assert len(reached) == 1  # the same backend whichever one the client named


@pytest.mark.parametrize("path, body", [("/v1/models", None),
                                        ("/v1/embeddings", b'{"model": "e", "input": "plain text"}')])
def test_forged_router_headers_are_dropped_on_unrouted_requests(gateway, path, body):
    forged = {h: "forged" for h in OWNED_HEADERS} | {"x-selected-model": "math-expert"}
    call(gateway, path, body, headers=forged)
    got = only(gateway.received())
    assert got.backend == DEFAULT_MODEL
    assert "forged" not in router_headers(got).values() and "x-selected-model" not in got.headers


# --- paths the sidecar does not analyse ----------------------------------------------------------------------

def test_get_models_passes_through_to_the_default_backend(gateway):
    status, headers, answer = call(gateway, "/v1/models")
    got = only(gateway.received())
    assert status == 200 and got.backend == DEFAULT_MODEL and got.method == "GET"
    assert json.loads(answer)["data"][0]["id"] == DEFAULT_MODEL
    assert router_headers(got) == {}


def test_bodies_on_other_paths_are_scanned_and_masked_but_not_routed(gateway):
    card = luhn_card(random.Random(11))
    body = json.dumps({"model": "embed", "input": [f"card {card}", "plain"]}).encode()
    call(gateway, "/v1/embeddings", body)  # the mock serves no embeddings (404): what it received is the point
    got = only(gateway.received())
    assert got.backend == DEFAULT_MODEL and got.body == masked(body, [card], [])
    assert router_headers(got) == {"x-router-action": "mask", "x-router-reason": "unrouted",
                                   "x-router-pii": "CREDIT_CARD"}


@pytest.mark.parametrize("path", ["//v1/chat/completions", "/v1/./chat/completions", "/v1/chat%2Fcompletions"])
def test_paths_envoy_normalises_to_chat_are_routed_as_chat(gateway, path):
    status, _, _ = call(gateway, path, chat(SUBJECTS[0]))
    got = only(gateway.received())
    assert status == 200 and got.path == CHAT and got.headers["x-router-reason"] == "category"


# --- bodies the sidecar cannot read --------------------------------------------------------------------------

BAD_BODIES = {
    "not_json": b'{"model": "auto", "messages": [{"role": "user", "content": "unterminated',
    "not_utf8": b'{"model": "auto", "messages": [{"role": "user", "content": "caf\xe9"}]}',
    "not_object": b'["a", "list"]',
    "no_text": b'{"model": "auto", "messages": []}',
    "empty_body": b"",
}


def test_unreadable_bodies_pass_unchanged_marked_skipped_under_bad_body_pass(gateway):
    """The availability-first opt-in (bad_body: pass): the backend decides what to answer (OpenAI servers:
    400). Under the shipped config these are refused (below)."""
    gateway.reload_sidecar({"failure": {"bad_body": "pass"}})
    try:
        for reason, body in BAD_BODIES.items():
            gateway.clear_received()
            status, _, _ = call(gateway, CHAT, body)
            got = only(gateway.received())
            assert got.backend == DEFAULT_MODEL and got.body == body
            assert router_headers(got) == {"x-router-action": "skipped", "x-router-reason": reason}
            assert status == (200 if reason == "no_text" else 400)  # the mock answers like an OpenAI server
    finally:
        gateway.reload_sidecar()


def test_a_body_over_envoys_buffer_limit_gets_413_and_reaches_no_backend(gateway):
    body = chat("x" * (BUFFER_LIMIT + 1024))
    status, _, answer = call(gateway, CHAT, body)
    assert status == 413 and answer == b"Payload Too Large"
    assert gateway.received() == []


def test_a_2mb_body_is_refused_413_unread_under_the_shipped_config(gateway):
    body = chat("The court held that the contract was void. " * 50_000 + luhn_card(random.Random(5)))
    assert 2 * 1024 * 1024 < len(body) < BUFFER_LIMIT
    status, headers, answer = call(gateway, CHAT, body)
    assert (status, headers["x-router-reason"], json.loads(answer)["error"]["code"]) == (413, "too_large", "too_large")
    assert gateway.received() == []


def test_a_2mb_body_under_fail_open_reaches_the_backend_with_its_cards_masked_never_in_clear(gateway):
    """Over failure.max_inspect_bytes (1 MiB) and under Envoy's buffer limit (4 MiB), availability first: the
    sidecar answers at once, degraded, masking what the recognizers find."""
    gateway.reload_sidecar({"failure": {"inference": "fail_open"}})
    try:
        _check_2mb_body_degraded(gateway)
    finally:
        gateway.reload_sidecar()


def _check_2mb_body_degraded(gateway: Stack) -> None:
    rng = random.Random(4)
    card, spaced_card = luhn_card(rng), luhn_card(rng)
    spaced = " ".join(spaced_card[i:i + 4] for i in range(0, 16, 4))
    filler = "The court held that the contract was void for lack of consideration. "
    padding = filler * (1024 * 1024 // len(filler) + 100)  # two messages: about 2 MiB in all
    body = chat(f"Charge {card} please. {padding}", f"{padding} Or my other card {spaced}, thanks.",
                model=MASKING[0])
    assert 2 * 1024 * 1024 < len(body) < BUFFER_LIMIT
    status, _, _ = call(gateway, CHAT, body)
    got = only(gateway.received())
    assert status == 200 and got.backend == MASKING[0]
    assert (got.headers["x-router-action"], got.headers["x-router-reason"]) == ("degraded", "too_large")
    assert got.headers["x-router-pii"] == "CREDIT_CARD"
    text = " ".join(m["content"] for m in got.json()["messages"])
    assert card not in text and spaced not in text and spaced_card not in text.replace(" ", "")
    assert find_checksum_spans(text) == [], "a checksum-valid number reached the backend"
    assert f"Charge {CARD_MASK}{card[-4:]} please." in text and f"card {'*' * 15}{spaced_card[-4:]}, thanks." in text
    assert len(got.body) == len(body)  # masked in place, nothing else changed


def test_an_answer_later_than_message_timeout_is_refused_by_envoy_and_logged_unanswered(gateway):
    """With the deadline raised past Envoy's message_timeout (3 s) and every batch held back longer than
    that, Envoy stops waiting and resets the stream; with the shipped failure_mode_allow: false it refuses
    the request instead of forwarding it unread. The sidecar must log that request as unanswered."""
    sidecar_log = gateway.logs()["sidecar"]
    gateway.reload_sidecar({"failure": {"timeout_ms": 20_000, "max_timeout_ms": 20_000,
                                        "max_inspect_bytes": 8 * 1024 * 1024},
                            "batching": {"max_wait_ms": 1000, "max_batch_size": 1024}})
    try:
        body = chat("The court held that the contract was void. " * 25_000, model=MASKING[0])
        status, _, _ = call(gateway, CHAT, body, headers={"x-request-id": "too-late-1"})
        assert status >= 500 and gateway.received() == []  # Envoy gave up on the answer and forwarded nothing
        deadline = time.monotonic() + 30
        while not (events := [e for e in sidecar_events(sidecar_log) if e.get("request_id") == "too-late-1"]):
            assert time.monotonic() < deadline, "the sidecar never logged the request"
            time.sleep(0.1)
        [event] = events
        assert (event["action"], event["reason"], event["level"]) == ("unanswered", "stream_closed", "warning")
        assert event["body_bytes"] == len(body)
    finally:
        gateway.reload_sidecar()


def test_a_request_refused_for_personal_data_in_its_url_or_a_header_leaves_it_in_neither_log(gateway):
    email = "wilhelmina.zorn@example.org"
    status, headers, _ = call(gateway, f"/v1/files/{email}")
    assert (status, headers["x-router-reason"]) == (400, "pii_in_url")
    status, headers, _ = call(gateway, CHAT, chat("Solve 2+2."), headers={"x-request-id": email})
    assert (status, headers["x-router-reason"]) == (400, "pii_in_header")
    assert gateway.received() == []
    deadline = time.monotonic() + 30
    while len(withheld := [e for e in gateway.access_log() if e.get("request_id") == "(withheld)"]) < 2:
        assert time.monotonic() < deadline, "Envoy never logged the refused requests"
        time.sleep(0.1)
    assert {e["status"] for e in withheld} == {400} and all(e["path"].startswith("(withheld") for e in withheld)
    assert sorted(e["reason"] for e in withheld[-2:]) == ["pii_in_header", "pii_in_url"]
    for name, log in gateway.logs().items():
        assert "wilhelmina.zorn" not in log.read_text(encoding="utf-8", errors="replace"), name


def sidecar_events(log: Path) -> list[dict]:
    return json_lines(log)


def test_unreadable_bodies_are_refused_400_and_reach_no_backend(gateway):
    for reason, body in BAD_BODIES.items():
        status, headers, answer = call(gateway, CHAT, body)
        assert (status, headers["x-router-action"], headers["x-router-reason"]) == (400, "rejected", reason)
        assert json.loads(answer)["error"]["code"] == reason
    assert call(gateway, CHAT, chat("x" * (BUFFER_LIMIT + 1024)))[0] == 413
    assert gateway.received() == []


# --- the sidecar down ----------------------------------------------------------------------------------------

def test_with_the_sidecar_killed_envoy_refuses_requests_then_recovers(gateway):
    """envoy.yaml's failure_mode_allow: false: with no sidecar, requests are refused, never forwarded
    unread; once the sidecar is back, requests are classified and masked again."""
    card = luhn_card(random.Random(1))
    body = chat(f"{SUBJECTS[0]} Pay with {card}.", model="auto")
    gateway.kill_sidecar()
    try:
        status, _, _ = call(gateway, CHAT, body, headers={"x-selected-model": "math-expert"})
        assert status >= 500 and gateway.received() == []
        assert call(gateway, "/v1/models")[0] >= 500
    finally:
        gateway.start_sidecar()
    gateway.wait_envoy_sees_sidecar(healthy=True)
    gateway.clear_received()
    body = chat(f"{SUBJECTS[0]} Pay with {card}.", model=MASKING[0])
    status, _, _ = call(gateway, CHAT, body)
    got = only(gateway.received())
    assert status == 200 and got.headers["x-router-action"] == "mask"
    assert got.body == masked(body, [card], [])


async def test_requests_in_flight_when_the_sidecar_dies_are_masked_or_refused(gateway):
    """Each request is either processed (masked) or, once the sidecar is gone, refused by Envoy: never
    forwarded unread, never a mixture."""
    rng = random.Random(2)
    cards = [luhn_card(rng) for _ in range(60)]
    bodies = [chat(f"Request {i}: pay with {c}. {SUBJECTS[i % len(SUBJECTS)]}", model=MASKING[i % len(MASKING)])
              for i, c in enumerate(cards)]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def post(body: bytes) -> int:
                async with session.post(gateway.url + CHAT, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.ensure_future(post(b)) for b in bodies]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(gateway.kill_sidecar)
            statuses = await asyncio.gather(*tasks)
    finally:
        gateway.start_sidecar()
    received = Counter(r.body for r in gateway.received())
    for body, card, status in zip(bodies, cards, statuses, strict=True):
        assert received[body] == 0, "a body went on unread"
        assert received[masked(body, [card], [])] == (1 if status == 200 else 0), status


# --- load ----------------------------------------------------------------------------------------------------

async def test_200_concurrent_requests_each_reach_their_backend_with_their_own_masked_body(gateway):
    """Many requests in flight at once (at most 64) each get their own routing and masking, or a 503 the
    client may retry when the sidecar sheds load; none goes on unread."""
    rng = random.Random(3)
    requests = []
    for i in range(200):
        card, iban, backend = luhn_card(rng), gb_iban(rng), MASKING[i % len(MASKING)]
        body = chat(f"Request {i:03d} for {backend}: {SUBJECTS[i % len(SUBJECTS)]} Card {card}, IBAN {iban}.",
                    model=backend)
        requests.append((backend, body, masked(body, [card], [iban])))
    in_flight = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def post(body: bytes) -> tuple[int, str, bytes]:
            async with in_flight, session.post(gateway.url + CHAT, data=body,
                                               headers={"content-type": "application/json"}) as r:
                return r.status, r.headers.get("x-mock-backend", ""), await r.read()

        answers = await asyncio.gather(*(post(body) for _, body, _ in requests))
    ext_proc = {k: v for k, v in gateway.envoy_stats("http.llm_gateway.ext_proc").items() if v}
    served = []
    for (backend, _, expected), (status, answered_by, answer) in zip(requests, answers, strict=True):
        if status == 503:  # shed, or past its deadline: refused, never forwarded unread
            assert json.loads(answer)["error"]["code"] in ("overloaded", "timeout"), ext_proc
            continue
        assert (status, answered_by) == (200, backend), ext_proc
        quoted = json.loads(expected)["messages"][0]["content"]
        assert json.loads(answer)["choices"][0]["message"]["content"] == f"[{backend}] received: {quoted}"
        served.append((backend, expected))
    assert served, "every request was refused"
    received = gateway.received()
    assert {(r.backend, r.body) for r in received} == set(served) and len(received) == len(served)
    assert {r.headers["x-router-action"] for r in received} == {"mask"}
