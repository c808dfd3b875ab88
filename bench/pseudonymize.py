"""What pseudonymization costs: placeholders in the request, the values restored in the answer.

1. The restoring itself (no network): microseconds per server-sent event of a streamed answer and per JSON
   answer, in the sidecar's own code (`sidecar.pseudonyms`).
2. Through the real Envoy with the bundled models: the same requests with every policy on ``mask`` and on
   ``pseudonymize``: requests/s and latency at a few clients, for JSON answers and for streamed answers of
   many small events (where each event crosses the sidecar once more), and from the streamed runs the time
   added per event.
3. The answer scan (``response_pii: mask``) against none, on longer answers (the mock adds a paragraph with
   an email address the request did not carry): what a scanned JSON answer and a scanned stream cost, and
   whether the address ever reached a client.

    .venv/bin/python bench/pseudonymize.py [--requests 200] [--clients 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

# The repository, not this script's folder, leads sys.path: bench/envoy.py would otherwise shadow Envoy's proto
# package `envoy`, which the sidecar's modules import (as in bench/request_path.py).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import RESULTS, machine, write_json  # noqa: E402
from sidecar.answers import AnswerStream  # noqa: E402
from sidecar.pseudonyms import Pseudonyms, restore_body  # noqa: E402
from sidecar_demo.configs import ROUTER_CONFIG  # noqa: E402
from sidecar_demo.stack import Stack  # noqa: E402

CHAT = "/v1/chat/completions"
TEXT = ("Please tell Dana Whitfield (dana.whitfield@example.org, +1 415-555-0142) how photosynthesis turns light "
        "into chemical energy, and copy marco.rossi@example.net.")
CHUNK_CHARS = 4
SAID_EMAIL = "sam.leak@example.com"
SAID = ("The light reactions split water and make ATP and NADPH; the Calvin cycle then fixes carbon dioxide "
        "into sugars. ") * 6 + f"For the lab notes, write to {SAID_EMAIL} before Friday."
SAY = {"x-mock-say": base64.b64encode(SAID.encode()).decode()}


async def _restore_streams(p: Pseudonyms, stream: list[bytes], times: int) -> None:
    for _ in range(times):
        r = AnswerStream(p)
        for chunk in stream:
            await r.feed(chunk)
        await r.finish()


def micro(rounds: int = 2000) -> dict:
    """The sidecar's restoring cost alone, on an answer of about 200 tokens with three placeholders."""
    p = Pseudonyms()
    names = [p.placeholder("PERSON", "Dana Whitfield"), p.placeholder("EMAIL_ADDRESS", "dana.whitfield@example.org"),
             p.placeholder("PHONE_NUMBER", "+1 415-555-0142")]
    reply = (f"Dear {names[0]}, here is the answer you asked for. " * 8 + f"Write to {names[1]} or call {names[2]}. ") * 3
    events = [json.dumps({"choices": [{"index": 0, "delta": {"content": reply[i:i + CHUNK_CHARS]}}]})
              for i in range(0, len(reply), CHUNK_CHARS)]
    stream = [f"data: {e}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
    started = time.perf_counter()
    asyncio.run(_restore_streams(p, stream, max(rounds // 50, 5)))
    per_event_us = (time.perf_counter() - started) / (max(rounds // 50, 5) * len(stream)) * 1e6
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
    started = time.perf_counter()
    for _ in range(rounds):
        restore_body(body, p)
    per_json_us = (time.perf_counter() - started) / rounds * 1e6
    return {"answer_chars": len(reply), "events": len(stream), "placeholders": 3,
            "us_per_sse_event": round(per_event_us, 1), "us_per_json_answer": round(per_json_us, 1),
            "json_answer_bytes": len(body)}


def call(url: str, stream: bool, say: bool = False) -> tuple[int, float, bytes]:
    body = json.dumps({"model": "auto", "stream": stream,
                       "messages": [{"role": "user", "content": TEXT}]}).encode()
    headers = {"content-type": "application/json", "x-mock-chunk-chars": str(CHUNK_CHARS), **(SAY if say else {})}
    request = urllib.request.Request(url + CHAT, data=body, method="POST", headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        data = response.read()
        return response.status, time.perf_counter() - started, data


def load(stack: Stack, stream: bool, requests: int, clients: int, say: bool = False) -> dict:
    """`requests` requests from `clients` threads; every answer must be 200 and free of placeholders when
    pseudonymizing (the values came back) or of the planted email when masking."""
    for _ in range(3):
        call(stack.url, stream, say)  # warm up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: call(stack.url, stream, say), range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(r[1] * 1000 for r in results)
    return {"requests": requests, "clients": clients, "ok": sum(r[0] == 200 for r in results),
            "requests_per_s": round(requests / wall, 1), "p50_ms": round(statistics.median(latencies), 2),
            "p95_ms": round(latencies[int(len(latencies) * 0.95) - 1], 2),
            "answers_with_values": sum("dana.whitfield@example.org" in client_text(r[2], stream) for r in results),
            "answers_with_said_email": sum(SAID_EMAIL in client_text(r[2], stream) for r in results)}


def client_text(answer: bytes, stream: bool) -> str:
    """What the client reads: a JSON answer as it is, a stream's deltas joined (a value cut across events is
    whole only there)."""
    if not stream:
        return answer.decode("utf-8", "replace")
    pieces = []
    for line in answer.decode("utf-8", "replace").splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or []:
                pieces.append((choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


def policy_overrides(action: str, response_pii: str = "off") -> dict:
    policies = (yaml.safe_load(ROUTER_CONFIG.read_text(encoding="utf-8")) or {}).get("pii", {}).get("policies") or {}
    policy = {"action": action, "response_pii": response_pii}
    return {"pii": {"default_policy": policy, "policies": {n: policy for n in policies}}}


def answer_scan(stack: Stack, requests: int, clients: int) -> dict:
    out: dict = {}
    for response_pii in ("off", "mask"):
        stack.reload_sidecar(policy_overrides("mask", response_pii))
        out[response_pii] = {"json": load(stack, False, requests, clients, say=True),
                             "stream": load(stack, True, requests, clients, say=True)}
    answer = call(stack.url, True, say=True)[2]
    out["answer_chars"] = len(SAID) + len(TEXT)
    out["window_chars"] = stack.config.pii.response_window_chars
    out["stream_events_per_answer"] = answer.count(b"data:")
    for kind in ("json", "stream"):
        out[f"added_ms_per_{kind}_answer_p50"] = round(out["mask"][kind]["p50_ms"] - out["off"][kind]["p50_ms"], 2)
    return out


def through_envoy(requests: int, clients: int) -> dict:
    out: dict = {}
    with Stack(router_overrides=policy_overrides("mask")) as stack:
        for action in ("mask", "pseudonymize"):
            stack.reload_sidecar(policy_overrides(action))
            out[action] = {"json": load(stack, False, requests, clients),
                           "stream": load(stack, True, requests, clients)}
        events = call(stack.url, True)[2].count(b"data:")  # the mock quotes the text back in 4-char deltas
        out["answer_scan"] = answer_scan(stack, requests, clients)
    added = out["pseudonymize"]["stream"]["p50_ms"] - out["mask"]["stream"]["p50_ms"]
    out["stream_events_per_answer"] = events
    out["added_ms_per_sse_event_p50"] = round(added / events, 3)
    out["added_ms_per_json_answer_p50"] = round(out["pseudonymize"]["json"]["p50_ms"] - out["mask"]["json"]["p50_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "pseudonymize.json")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "restoring": micro(), "through_envoy": through_envoy(args.requests, args.clients)}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
