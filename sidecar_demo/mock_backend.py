"""A mock OpenAI-compatible backend that says who it is and remembers exactly what it received.

    python -m sidecar_demo.mock_backend --model math-expert --port 8000

It stands in for a real model server behind Envoy (docker-compose, the local demo, the end-to-end tests),
so every route has somewhere to land and every claim about masking can be checked against the bytes that
actually arrived. Every reply is ``[NAME] received: TEXT``, TEXT being the last user text as received
(masked or pseudonymized by the sidecar, if it was):

- ``POST /v1/chat/completions``: a chat completion; ``"stream": true`` gets server-sent events (a role
  chunk, the content, then ``finish_reason`` and ``[DONE]``).
- ``POST /v1/completions``: the same for prompts (never streamed).
- ``POST /v1/responses`` (OpenAI Responses API): TEXT is the last user input (``input`` as a string, or
  items whose ``content`` is a string or ``input_text`` parts); ``"stream": true`` gets the named events
  ``response.created``, ``response.output_text.delta``..., ``response.output_text.done`` and
  ``response.completed``.
- ``POST /v1/messages`` (Anthropic Messages): TEXT is the last user message (a string or text blocks);
  ``"stream": true`` gets ``message_start``, ``content_block_start``, ``content_block_delta``...,
  ``content_block_stop``, ``message_delta`` and ``message_stop``.
- ``GET /v1/models``: this backend's one model.
- ``GET /_received``: every request received so far (method, path, headers, raw body as base64 and, when it
  is UTF-8, as text), oldest first; ``DELETE /_received`` forgets them.

Request headers that shape the reply (the tests' knobs):

- ``x-mock-chunk-chars: N`` (an integer >= 1): a streamed reply's text goes in deltas of N characters,
  one event each, each written and flushed on its own (N=1 puts an event boundary at every offset of the
  text). Without it a streamed text is one delta.
- ``x-mock-say: BASE64``: the reply adds this text (base64 of UTF-8) after the quote: personal data the
  model "says" that the request did not carry (the response scan's tests).
- ``x-mock-tool-call: NAME`` (chat completions): the reply also calls function NAME with the arguments
  ``{"text": TEXT}`` (a JSON string; streamed, in pieces of N characters too), ``finish_reason: tool_calls``.

A body that is not a JSON object, or a bad knob, gets the API's 400 error shape, as a real server would
answer. Every answer carries ``x-mock-backend: NAME`` and echoes the routing headers the sidecar set on the
request (``x-selected-model``, ``x-router-*``), so ``curl -i`` through Envoy shows the sidecar's decision.
Once listening it prints one line, ``listening http://HOST:PORT``, so a parent that asked for port 0 learns
the port without a race.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import web

BACKEND_HEADER = "x-mock-backend"
CHUNK_CHARS_HEADER = "x-mock-chunk-chars"
TOOL_CALL_HEADER = "x-mock-tool-call"
SAY_HEADER = "x-mock-say"
ECHOED_PREFIXES = ("x-selected-model", "x-router-")
MAX_BODY_BYTES = 64 * 1024 * 1024
"""Far above Envoy's buffer limit, so the mock never refuses a body Envoy let through."""
TEXT_PART_TYPES = ("text", "input_text")

NAME_KEY = web.AppKey("name", str)
RECEIVED_KEY = web.AppKey("received", list)


class BadRequest(Exception):
    """The request cannot be answered: a 400 in the API's error shape."""


def received_record(request: web.Request, body: bytes) -> dict[str, Any]:
    """What arrived, byte for byte: the tests compare it with what the client sent."""
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "time": time.time(),
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": text,
        "body_b64": base64.b64encode(body).decode("ascii"),
    }


def echo_headers(request: web.Request, name: str) -> dict[str, str]:
    headers = {BACKEND_HEADER: name}
    for key, value in request.headers.items():
        if key.lower().startswith(ECHOED_PREFIXES):
            headers[key.lower()] = value
    return headers


def openai_error(status: int, message: str, headers: dict[str, str]) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None, "param": None}}
    return web.json_response(body, status=status, headers=headers)


def anthropic_error(status: int, message: str, headers: dict[str, str]) -> web.Response:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return web.json_response(body, status=status, headers=headers)


def dumps(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False)


def content_text(content: Any) -> str | None:
    """A message's text: a string, or its text parts joined by newlines; None when it has neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type", "text") in TEXT_PART_TYPES)
    return None


def last_user_text(document: dict[str, Any]) -> str:
    """The text the reply quotes: the last user message (string or text parts) of ``messages`` (chat,
    Messages) or ``input`` (Responses), or the prompt."""
    if "prompt" in document:
        prompt = document["prompt"]
        return prompt if isinstance(prompt, str) else "\n".join(p for p in prompt or [] if isinstance(p, str))
    items = document.get("messages")
    if items is None:
        items = document.get("input")
        if isinstance(items, str):
            return items
    for message in reversed(items if isinstance(items, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            text = content_text(message.get("content"))
            if text is not None:
                return text
    return ""


def chunk_chars(request: web.Request) -> int | None:
    """``x-mock-chunk-chars`` as an integer >= 1, or None without the header."""
    raw = request.headers.get(CHUNK_CHARS_HEADER)
    if raw is None:
        return None
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise BadRequest(f"{CHUNK_CHARS_HEADER} must be an integer >= 1, not {raw!r}")
    return size


def said(request: web.Request) -> str:
    """``x-mock-say``: base64 of UTF-8 text the reply adds after the quote (what a model says that the request
    did not carry; base64, so the gateway's header check does not see it on the way in)."""
    raw = request.headers.get(SAY_HEADER)
    if raw is None:
        return ""
    try:
        return " " + base64.b64decode(raw, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{SAY_HEADER} must be base64 of UTF-8 text") from None


def pieces(text: str, size: int | None) -> list[str]:
    """`text` in pieces of `size` characters (one piece without a size, or for an empty text)."""
    if size is None or not text:
        return [text]
    return [text[i:i + size] for i in range(0, len(text), size)]


def usage(quoted: str, reply: str) -> dict[str, int]:
    return {"prompt_tokens": len(quoted.split()), "completion_tokens": len(reply.split()),
            "total_tokens": len(quoted.split()) + len(reply.split())}


def completion(name: str, document: dict[str, Any], chat: bool, tool: str | None = None,
               extra: str = "") -> dict[str, Any]:
    quoted = last_user_text(document)
    reply = f"[{name}] received: {quoted}{extra}"
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        finish = "stop"
        if tool is not None:
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                                      "function": {"name": tool, "arguments": dumps({"text": quoted})}}]
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": reply, "finish_reason": "stop", "logprobs": None}
        kind = "text_completion"
    return {"id": f"mock-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
            "model": name, "choices": [choice], "usage": usage(quoted, reply)}


def responses_answer(name: str, document: dict[str, Any], extra: str = "") -> dict[str, Any]:
    """An OpenAI Responses API answer: one assistant message with one output_text."""
    quoted = last_user_text(document)
    reply = f"[{name}] received: {quoted}{extra}"
    message = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": reply, "annotations": []}]}
    return {"id": f"resp_{uuid.uuid4().hex[:12]}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": name, "output": [message],
            "usage": {"input_tokens": len(quoted.split()), "output_tokens": len(reply.split()),
                      "total_tokens": len(quoted.split()) + len(reply.split())}}


def messages_answer(name: str, document: dict[str, Any], extra: str = "") -> dict[str, Any]:
    """An Anthropic Messages answer: one text block."""
    quoted = last_user_text(document)
    reply = f"[{name}] received: {quoted}{extra}"
    return {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant", "model": name,
            "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": len(quoted.split()), "output_tokens": len(reply.split())}}


def chat_events(answer: dict[str, Any], size: int | None) -> Iterable[str]:
    """A chat completion as chunks: role, content pieces, then each tool call (its name, then its arguments in
    pieces), then the finish."""
    base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = answer["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return "data: " + dumps(base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    yield chunk({"role": "assistant"})
    for piece in pieces(message["content"], size):
        yield chunk({"content": piece})
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                     "function": {"name": function["name"], "arguments": ""}}]})
        for piece in pieces(function["arguments"], size):
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
    yield chunk({}, choice["finish_reason"])
    yield "data: [DONE]"


def named(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {dumps({'type': kind, **data})}"


def responses_events(answer: dict[str, Any], size: int | None) -> Iterable[str]:
    """A Responses API answer as its named events (one output_text)."""
    message = answer["output"][0]
    text = message["content"][0]["text"]
    seq = iter(range(1_000_000))
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    yield named("response.created", {"sequence_number": next(seq),
                                     "response": answer | {"status": "in_progress", "output": [],
                                                                          "usage": None}})
    for piece in pieces(text, size):
        yield named("response.output_text.delta", {"sequence_number": next(seq), **at, "delta": piece})
    yield named("response.output_text.done", {"sequence_number": next(seq), **at, "text": text})
    yield named("response.completed", {"sequence_number": next(seq), "response": answer})


def messages_events(answer: dict[str, Any], size: int | None) -> Iterable[str]:
    """An Anthropic Messages answer as its named events (one text block)."""
    text = answer["content"][0]["text"]
    start = answer | {"content": [], "stop_reason": None, "usage": answer["usage"] | {"output_tokens": 0}}
    yield named("message_start", {"message": start})
    yield named("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for piece in pieces(text, size):
        yield named("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
    yield named("content_block_stop", {"index": 0})
    yield named("message_delta", {"delta": {"stop_reason": answer["stop_reason"], "stop_sequence": None},
                                  "usage": {"output_tokens": answer["usage"]["output_tokens"]}})
    yield named("message_stop", {})


async def stream_events(request: web.Request, events: Iterable[str], headers: dict[str, str]) -> web.StreamResponse:
    """Server-sent events, each written (and drained) on its own."""
    response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream",
                                           "cache-control": "no-cache"})
    await response.prepare(request)
    for event in events:
        await response.write(f"{event}\n\n".encode())
    await response.write_eof()
    return response


def make_app(name: str) -> web.Application:
    """The mock for backend `name`; `app[RECEIVED_KEY]` holds what it received."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[NAME_KEY] = name
    app[RECEIVED_KEY] = []

    async def record(request: web.Request) -> bytes:
        body = await request.read()
        app[RECEIVED_KEY].append(received_record(request, body))
        return body

    async def generate(request: web.Request, kind: str) -> web.StreamResponse:
        body = await record(request)
        headers = echo_headers(request, name)
        error = anthropic_error if kind == "messages" else openai_error
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            return error(400, "the body is not valid JSON", headers)
        if not isinstance(document, dict):
            return error(400, "the body must be a JSON object", headers)
        try:
            size = chunk_chars(request)
            extra = said(request)
        except BadRequest as e:
            return error(400, str(e), headers)
        if kind == "responses":
            answer, events = responses_answer(name, document, extra), responses_events
        elif kind == "messages":
            answer, events = messages_answer(name, document, extra), messages_events
        else:
            answer = completion(name, document, kind == "chat", request.headers.get(TOOL_CALL_HEADER) or None,
                                extra)
            events = chat_events if kind == "chat" else None
        if events is not None and document.get("stream") is True:
            return await stream_events(request, events(answer, size), headers)
        return web.json_response(answer, headers=headers, dumps=dumps)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, "chat")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, "completions")

    async def responses(request: web.Request) -> web.StreamResponse:
        return await generate(request, "responses")

    async def messages(request: web.Request) -> web.StreamResponse:
        return await generate(request, "messages")

    async def models(request: web.Request) -> web.Response:
        await record(request)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "mock"}]
        return web.json_response({"object": "list", "data": data}, headers=echo_headers(request, name))

    async def other(request: web.Request) -> web.Response:
        await record(request)
        return openai_error(404, f"unknown path {request.path}", echo_headers(request, name))

    async def list_received(_request: web.Request) -> web.Response:
        return web.json_response({"backend": name, "received": app[RECEIVED_KEY]})

    async def clear_received(_request: web.Request) -> web.Response:
        app[RECEIVED_KEY].clear()
        return web.json_response({"backend": name, "received": []})

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_received", list_received)
    app.router.add_delete("/_received", clear_received)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


async def serve(name: str, host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT; print the bound address once ready."""
    # auto_decompress off: the record is the bytes as they arrived (a gzip body stays gzip), not what aiohttp made of them.
    runner = web.AppRunner(make_app(name), access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    print(f"listening http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar_demo.mock_backend",
                                     description="Mock OpenAI-compatible backend that records what it receives.")
    parser.add_argument("--model", required=True, help="the backend's name (reported in every answer)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.model, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
