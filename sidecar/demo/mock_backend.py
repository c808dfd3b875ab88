"""A mock OpenAI-compatible backend that says who it is and remembers exactly what it received.

    python -m sidecar.demo.mock_backend --model math-expert --port 8000

It stands in for a real model server behind Envoy (docker-compose, the local demo, the end-to-end tests),
so every route has somewhere to land and every claim about masking can be checked against the bytes that
actually arrived:

- ``POST /v1/chat/completions``: a chat completion whose reply names this backend and quotes the last
  user message as received (masked by the sidecar, if it was); ``"stream": true`` gets server-sent events.
  A body that is not a JSON object gets OpenAI's 400 error shape, as a real server would answer.
- ``POST /v1/completions``: the same for prompts.
- ``GET /v1/models``: this backend's one model.
- ``GET /_received``: every request received so far (method, path, headers, raw body as base64 and, when it
  is UTF-8, as text), oldest first; ``DELETE /_received`` forgets them.

Every answer carries ``x-mock-backend: NAME`` and echoes the routing headers the sidecar set on the request
(``x-selected-model``, ``x-router-*``), so ``curl -i`` through Envoy shows the sidecar's decision.
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
from typing import Any

from aiohttp import web

BACKEND_HEADER = "x-mock-backend"
ECHOED_PREFIXES = ("x-selected-model", "x-router-")
MAX_BODY_BYTES = 64 * 1024 * 1024
"""Far above Envoy's buffer limit, so the mock never refuses a body Envoy let through."""

NAME_KEY = web.AppKey("name", str)
RECEIVED_KEY = web.AppKey("received", list)


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


def last_user_text(document: dict[str, Any]) -> str:
    """The text the reply quotes: the last user message (string or text parts), or the prompt."""
    if "prompt" in document:
        prompt = document["prompt"]
        return prompt if isinstance(prompt, str) else "\n".join(p for p in prompt or [] if isinstance(p, str))
    for message in reversed(document.get("messages") or []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def completion(name: str, document: dict[str, Any], chat: bool) -> dict[str, Any]:
    quoted = last_user_text(document)
    reply = f"[{name}] received: {quoted}"
    usage = {"prompt_tokens": len(quoted.split()), "completion_tokens": len(reply.split()),
             "total_tokens": len(quoted.split()) + len(reply.split())}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": reply, "finish_reason": "stop", "logprobs": None}
        kind = "text_completion"
    return {"id": f"mock-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
            "model": name, "choices": [choice], "usage": usage}


async def stream_completion(request: web.Request, response_body: dict[str, Any],
                            headers: dict[str, str]) -> web.StreamResponse:
    """The same reply as server-sent events: one role chunk, one content chunk, then [DONE]."""
    response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
    await response.prepare(request)
    base = {k: response_body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    content = response_body["choices"][0]["message"]["content"]
    for delta, finish in (({"role": "assistant"}, None), ({"content": content}, None), ({}, "stop")):
        chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
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

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await record(request)
        headers = echo_headers(request, name)
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            return openai_error(400, "the body is not valid JSON", headers)
        if not isinstance(document, dict):
            return openai_error(400, "the body must be a JSON object", headers)
        response_body = completion(name, document, chat)
        if chat and document.get("stream") is True:
            return await stream_completion(request, response_body, headers)
        return web.json_response(response_body, headers=headers, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, chat=False)

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
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo.mock_backend",
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
