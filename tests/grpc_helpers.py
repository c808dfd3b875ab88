"""Drive the sidecar the way Envoy does: an in-process grpc.aio server on a loopback port, a real channel,
and ext_proc streams that send one phase, wait for its answer, then send the next."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)

from sidecar.api.v1 import router_pb2_grpc
from sidecar.config import Config, parse_config
from sidecar.metrics import Metrics
from sidecar.server import SidecarServer

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
CATEGORIES = {"math": "math-expert", "law": "humanities-expert", "biology": "science-expert"}
DEFAULT_MODEL = "general"


def make_config(**sections: Any) -> Config:
    """A test config: loopback on a free port, no metrics endpoint, no file watching; `sections` override."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": None, "watch_config": False, "grace_period_s": 0},
        "routing": {"default_model": DEFAULT_MODEL, "categories": dict(CATEGORIES)},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


def make_decision(**overrides: Any):
    """A Decision with neutral defaults (allow, default model, nothing found)."""
    from sidecar.decisions import Decision

    fields: dict[str, Any] = dict(action="allow", model=DEFAULT_MODEL, rewrite_model=False, route_reason="category",
                                  category=None, confidence=None, entity_types=(), entity_counts={}, body=None,
                                  timings={"parse": 0.1, "classify": 1.0, "pii": 1.0, "total": 2.1})
    fields.update(overrides)
    return Decision(**fields)


def chat_body(*contents: str, model: str = "auto", role: str = "user", **extra: Any) -> bytes:
    messages = [{"role": role, "content": c} for c in contents]
    return json.dumps({"model": model, "messages": messages, **extra}, ensure_ascii=False).encode("utf-8")


def headers_msg(path: str = CHAT_PATH, extra: dict[str, str] | None = None, *, end_of_stream: bool = False,
                request_id: str = "req-1", method: str = "POST", body_mode: int | None = None,
                observability: bool = False) -> ProcessingRequest:
    values = {":method": method, ":path": path, ":authority": "gateway", "content-type": "application/json",
              "x-request-id": request_id, **(extra or {})}
    headers = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])
    msg = ProcessingRequest(request_headers=HttpHeaders(headers=headers, end_of_stream=end_of_stream),
                            observability_mode=observability)
    if body_mode is not None:
        msg.protocol_config.CopyFrom(ProtocolConfiguration(request_body_mode=body_mode))
    return msg


def body_msg(body: bytes | str, *, end_of_stream: bool = True, observability: bool = False) -> ProcessingRequest:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return ProcessingRequest(request_body=HttpBody(body=data, end_of_stream=end_of_stream),
                             observability_mode=observability)


def other_phase_msgs() -> list[ProcessingRequest]:
    """Every phase after the request body, as Envoy sends them when all are enabled."""
    response_headers = HeaderMap(headers=[HeaderValue(key=":status", raw_value=b"200")])
    return [
        ProcessingRequest(request_trailers=HttpTrailers()),
        ProcessingRequest(response_headers=HttpHeaders(headers=response_headers)),
        ProcessingRequest(response_body=HttpBody(body=b'{"ok": true}', end_of_stream=True)),
        ProcessingRequest(response_trailers=HttpTrailers()),
    ]


BUFFERED = ProcessingMode.BUFFERED
STREAMED = ProcessingMode.STREAMED
BUFFERED_PARTIAL = ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def common(resp: ProcessingResponse):
    """The CommonResponse inside a headers or body answer."""
    kind = resp.WhichOneof("response")
    return getattr(resp, kind).response


def set_headers(resp: ProcessingResponse) -> dict[str, str]:
    """Headers an answer sets (immediate responses included), asserting Envoy's raw_value-only rule."""
    kind = resp.WhichOneof("response")
    if kind == "immediate_response":
        mutation = resp.immediate_response.headers
    elif kind in ("request_trailers", "response_trailers"):
        mutation = getattr(resp, kind).header_mutation
    else:
        mutation = common(resp).header_mutation
    out = {}
    for option in mutation.set_headers:
        assert option.header.value == "", f"{option.header.key} uses `value`; Envoy needs raw_value only"
        out[option.header.key] = option.header.raw_value.decode("utf-8")
    return out


def removed_headers(resp: ProcessingResponse) -> list[str]:
    return list(common(resp).header_mutation.remove_headers)


def new_body(resp: ProcessingResponse) -> bytes | None:
    c = common(resp)
    return c.body_mutation.body if c.HasField("body_mutation") else None


def immediate(resp: ProcessingResponse) -> tuple[int, dict]:
    """Status code and decoded JSON body of an ImmediateResponse."""
    assert resp.WhichOneof("response") == "immediate_response", resp
    return resp.immediate_response.status.code, json.loads(resp.immediate_response.body)


class Exchange:
    """One ext_proc stream, used like Envoy: write a message, read its answer."""

    def __init__(self, stub: external_processor_pb2_grpc.ExternalProcessorStub):
        self.call = stub.Process()

    async def send(self, msg: ProcessingRequest) -> ProcessingResponse | None:
        await self.call.write(msg)
        if msg.observability_mode:
            return None
        resp = await self.call.read()
        assert resp is not grpc.aio.EOF, "stream closed without an answer"
        return resp

    async def close(self) -> ProcessingResponse | None:
        """Half-close like Envoy at the end of a request; returns any unexpected extra message."""
        await self.call.done_writing()
        extra = await self.call.read()
        if extra is grpc.aio.EOF:
            assert await self.call.code() == grpc.StatusCode.OK
            return None
        return extra


async def run_stream(stub, msgs: Iterable[ProcessingRequest]) -> list[ProcessingResponse]:
    """Send `msgs` one by one, waiting for each answer; returns the answers (none for observability mode)."""
    ex = Exchange(stub)
    out = [r for r in [await ex.send(m) for m in msgs] if r is not None]
    assert await ex.close() is None
    return out


async def chat_request(stub, body: bytes, path: str = CHAT_PATH, headers: dict[str, str] | None = None,
                       request_id: str = "req-1") -> tuple[ProcessingResponse, ProcessingResponse]:
    """headers → body, as Envoy sends a buffered chat request; returns both answers."""
    head, body_resp = await run_stream(stub, [headers_msg(path, headers, request_id=request_id), body_msg(body)])
    return head, body_resp


@dataclass
class Running:
    server: SidecarServer
    channel: grpc.aio.Channel
    engine: Any

    @property
    def ext_proc(self) -> external_processor_pb2_grpc.ExternalProcessorStub:
        return external_processor_pb2_grpc.ExternalProcessorStub(self.channel)

    @property
    def router_api(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel)


async def start_server(config: Config, engine_factory, metrics: Metrics | None = None, **kwargs: Any) -> Running:
    """A started SidecarServer on a loopback port plus a channel to it; stop with `stop_server`."""
    engines: list[Any] = []

    def factory(cfg: Config, m: Metrics | None) -> Any:
        engines.append(engine_factory(cfg, m))
        return engines[-1]

    server = SidecarServer(config, metrics=metrics or Metrics(), engine_factory=factory, **kwargs)
    port = await server.start()
    limit = config.server.max_message_bytes  # Envoy's gRPC client has no 4 MiB cap; the test client neither
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    return Running(server, channel, engines[0])


async def stop_server(running: Running) -> None:
    await running.channel.close()
    await running.server.stop(grace_s=0)
