"""The gRPC server: Classify API, health, reflection, message limits, reload without dropping streams, drain."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.api.v1 import router_pb2
from sidecar.app import build_app
from sidecar.config import LoggingConfig, load_config
from sidecar.errors import ConfigError, InferenceTimeout, Overloaded
from sidecar.logs import configure_logging
from sidecar.metrics import Metrics
from sidecar.server import EXT_PROC_SERVICE, ROUTER_SERVICE, SidecarServer
from tests.fakes import FakeEngine
from tests.grpc_helpers import (
    CATEGORIES,
    Exchange,
    body_msg,
    chat_body,
    chat_request,
    headers_msg,
    make_config,
    new_body,
    set_headers,
    start_server,
    stop_server,
)


@pytest.fixture
async def start():
    running = []

    async def _start(config=None, engine=None, engine_factory=None, **kwargs):
        factory = engine_factory or (lambda _c, _m: engine if engine is not None else FakeEngine())
        r = await start_server(config or make_config(), factory, **kwargs)
        running.append(r)
        return r

    yield _start
    for r in running:
        await stop_server(r)


def write_config(path: Path, **overrides) -> Path:
    data = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": None, "watch_config": False, "grace_period_s": 5},
        "routing": {"default_model": "general", "categories": dict(CATEGORIES)},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data))
    return path


# --- Classify API ------------------------------------------------------------------------------------------


async def test_classify_returns_the_decision_with_code_point_offsets(start):
    sc = await start()
    text = "张伟 wants to solve the integral; mail zw@example.com"
    resp = await sc.router_api.Classify(router_pb2.ClassifyRequest(text=text))
    assert (resp.category, resp.model, resp.action, resp.route_reason) == ("math", "math-expert", "mask", "category")
    assert resp.confidence > 0.5
    spans = {(p.label, text[p.start:p.end]) for p in resp.pii}
    assert spans == {("PERSON", "张伟"), ("EMAIL_ADDRESS", "zw@example.com")}
    assert resp.masked_text == "[PERSON] wants to solve the integral; mail [EMAIL_ADDRESS]"


async def test_classify_keeps_a_client_chosen_model(start):
    sc = await start()
    resp = await sc.router_api.Classify(router_pb2.ClassifyRequest(text="Solve it.", model="gpt-4o"))
    assert (resp.model, resp.route_reason, resp.action) == ("gpt-4o", "client_model", "allow")
    assert resp.masked_text == "Solve it."


@pytest.mark.parametrize("text", ["", "   \n"])
async def test_classify_empty_text_is_invalid_argument(start, text):
    sc = await start()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sc.router_api.Classify(router_pb2.ClassifyRequest(text=text))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("error, code", [(Overloaded("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
                                         (InferenceTimeout("slow"), grpc.StatusCode.UNAVAILABLE)])
async def test_classify_inference_failures_map_to_grpc_codes(start, error, code):
    sc = await start(make_config(failure={"inference": "fail_closed"}), engine=FakeEngine(error=error))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sc.router_api.Classify(router_pb2.ClassifyRequest(text="Solve it."))
    assert e.value.code() == code


async def test_classify_text_over_max_inspect_bytes_is_invalid_argument_under_fail_closed(start):
    sc = await start(make_config(failure={"inference": "fail_closed", "max_inspect_bytes": 4096}))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sc.router_api.Classify(router_pb2.ClassifyRequest(text="Solve it. " * 500))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "4096 bytes" in e.value.details()
    assert sc.engine.calls.total() == 0


async def test_classify_under_fail_open_answers_degraded(start):
    sc = await start(make_config(failure={"inference": "fail_open"}), engine=FakeEngine(error=InferenceTimeout("slow")))
    resp = await sc.router_api.Classify(router_pb2.ClassifyRequest(text="Solve it."))
    assert (resp.action, resp.model) == ("degraded", "general")


# --- health, reflection, limits ----------------------------------------------------------------------------


async def test_health_reports_serving_for_every_service_once_models_are_loaded(start):
    sc = await start()
    stub = health_pb2_grpc.HealthStub(sc.channel)
    for service in ("", EXT_PROC_SERVICE, ROUTER_SERVICE):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_the_services(start):
    sc = await start()
    stub = reflection_pb2_grpc.ServerReflectionStub(sc.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {EXT_PROC_SERVICE, ROUTER_SERVICE, "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_turned_off(start):
    sc = await start(make_config(server={"reflection": False}))
    stub = reflection_pb2_grpc.ServerReflectionStub(sc.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stub.ServerReflectionInfo(ask()):
            pass
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_bodies_above_grpcs_default_4mib_are_accepted_and_returned(start):
    # No inference on the big text (no category model, over max_inspect_bytes under fail_open: the recognizers
    # alone scan it): this is about message sizes.
    sc = await start(make_config(failure={"inference": "fail_open"}), engine=FakeEngine(has_category_model=False))
    text = "Solve the equation. " + "lorem ipsum " * (5 * 1024 * 1024 // 12)
    _, resp = await chat_request(sc.ext_proc, chat_body(text))
    assert set_headers(resp)["x-selected-model"] == "general"
    assert len(new_body(resp)) > 5 * 1024 * 1024


async def test_metrics_endpoint_starts_with_the_server(start):
    import urllib.request

    sc = await start(make_config(server={"metrics_listen": "127.0.0.1:0"}))
    await chat_request(sc.ext_proc, chat_body("Solve it."))
    url = f"http://127.0.0.1:{sc.server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'sidecar_requests_total{action="allow",category="math",model="math-expert"} 1.0' in text


async def test_busy_listen_address_is_a_config_error_naming_the_key(start):
    sc = await start()
    engine = FakeEngine()
    server = SidecarServer(make_config(), listen=f"127.0.0.1:{sc.server.port}", engine_factory=lambda _c, _m: engine)
    with pytest.raises(ConfigError) as e:
        await server.start()
    assert e.value.key == "server.listen"
    assert engine.closed


def test_routing_categories_must_be_labels_of_the_category_model():
    config = make_config(routing={"categories": {"math": "math-expert", "astronomy": "science-expert"}})
    engine = FakeEngine()
    with pytest.raises(ConfigError) as e:
        build_app(config, engine_factory=lambda _c, _m: engine)
    assert e.value.key == "routing.categories.astronomy"
    assert engine.closed


# --- reload and drain --------------------------------------------------------------------------------------


async def test_reload_swaps_config_without_dropping_an_in_flight_stream(start, tmp_path):
    path = write_config(tmp_path / "router.yaml", failure={"timeout_ms": 5000, "max_timeout_ms": 5000})
    engines = []

    def factory(_c, _m):
        engines.append(FakeEngine(delay_s=0.3))
        return engines[-1]

    sc = await start(load_config(path), engine_factory=factory)
    in_flight = Exchange(sc.ext_proc)
    await in_flight.send(headers_msg(request_id="in-flight"))
    pending = asyncio.ensure_future(in_flight.send(body_msg(chat_body("Solve the integral."))))
    await asyncio.wait_for(engines[0].called.wait(), 5)  # the request is inside the old engine

    write_config(path, routing={"categories": {**CATEGORIES, "math": "math-v2"}}, failure={"timeout_ms": 5000, "max_timeout_ms": 5000})
    assert await sc.server.reload()

    old_answer = await pending
    assert set_headers(old_answer)["x-selected-model"] == "math-expert"
    assert await in_flight.close() is None
    _, new_answer = await chat_request(sc.ext_proc, chat_body("Solve the integral."))
    assert set_headers(new_answer)["x-selected-model"] == "math-v2"
    assert sc.server.app.generation == 1
    for _ in range(100):
        if engines[0].closed:
            break
        await asyncio.sleep(0.02)
    assert engines[0].closed and not engines[1].closed


@pytest.mark.parametrize("bad, key", [
    ({"routing": {"confidence_threshold": 3}}, "routing.confidence_threshold"),
    ({"routing": {"categories": {"astronomy": "x"}}}, "routing.categories.astronomy"),
    ({"surprise": {"a": 1}}, "surprise"),
])
async def test_bad_reload_is_logged_and_the_old_config_keeps_serving(start, tmp_path, bad, key):
    logs = io.StringIO()
    configure_logging(LoggingConfig(), logs)
    path = write_config(tmp_path / "router.yaml")
    metrics = Metrics()
    sc = await start(load_config(path), metrics=metrics)
    write_config(path, **bad)
    assert not await sc.server.reload()
    assert sc.server.app.generation == 0
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve it."))
    assert set_headers(resp)["x-selected-model"] == "math-expert"
    assert metrics.registry.get_sample_value("sidecar_reloads_total", {"result": "error"}) == 1
    [event] = [json.loads(line) for line in logs.getvalue().splitlines() if "reload_failed" in line]
    assert event["key"] == key


async def test_reload_that_crashes_while_loading_models_keeps_the_old_state(start, tmp_path):
    path = write_config(tmp_path / "router.yaml")
    calls = []

    def factory(_c, _m):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the runtime fell over")
        return FakeEngine()

    sc = await start(load_config(path), engine_factory=factory)
    assert not await sc.server.reload()
    _, resp = await chat_request(sc.ext_proc, chat_body("Solve it."))
    assert set_headers(resp)["x-selected-model"] == "math-expert"


async def test_not_yaml_reload_keeps_the_old_config(start, tmp_path):
    path = write_config(tmp_path / "router.yaml")
    sc = await start(load_config(path))
    path.write_text("routing: [unclosed")
    assert not await sc.server.reload()
    assert sc.server.app.config.routing.default_model == "general"


async def test_config_file_change_triggers_a_reload(start, tmp_path):
    path = write_config(tmp_path / "router.yaml")
    sc = await start(load_config(path), watch_interval_s=0.02)
    watcher = asyncio.ensure_future(sc.server.watch_config())
    try:
        write_config(path, routing={"default_model": "fallback"})
        os.utime(path, (1, 1))
        for _ in range(200):
            if sc.server.app.generation == 1:
                break
            await asyncio.sleep(0.02)
        assert sc.server.app.config.routing.default_model == "fallback"
    finally:
        watcher.cancel()


async def test_sighup_reloads_and_sigterm_drains(tmp_path):
    path = write_config(tmp_path / "router.yaml", server={"grace_period_s": 0})
    server = SidecarServer(load_config(path), engine_factory=lambda _c, _m: FakeEngine())
    await server.start()
    engine = server.app.engine
    runner = asyncio.ensure_future(server.run())
    await asyncio.wait_for(server.signals_ready.wait(), 5)
    write_config(path, routing={"default_model": "fallback"}, server={"grace_period_s": 0})
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(200):
        if server.app.generation == 1:
            break
        await asyncio.sleep(0.02)
    assert server.app.config.routing.default_model == "fallback"
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 10)
    assert engine.closed and server.app.engine.closed
    status = await server.health.Check(health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_drain_lets_an_in_flight_stream_finish(start):
    engine = FakeEngine(delay_s=0.3)
    sc = await start(make_config(failure={"timeout_ms": 5000, "max_timeout_ms": 5000}), engine=engine)
    ex = Exchange(sc.ext_proc)
    await ex.send(headers_msg())
    pending = asyncio.ensure_future(ex.send(body_msg(chat_body("Solve it."))))
    await asyncio.wait_for(engine.called.wait(), 5)  # in flight: the drain must wait for it
    stopping = asyncio.ensure_future(sc.server.stop(grace_s=5))
    resp = await pending
    assert set_headers(resp)["x-selected-model"] == "math-expert"
    await ex.call.done_writing()
    await stopping
    assert sc.engine.closed


async def test_check_config_summary_lists_models_and_routing(tmp_path):
    from sidecar.cli import summary

    path = write_config(tmp_path / "router.yaml")
    config = load_config(path)
    lines = summary(config, FakeEngine().describe(), path)
    text = "\n".join(lines)
    assert "model category: runtime=fake" in text
    assert "3 categories -> 4 backends" in text
    assert json.dumps(str(path))[1:-1] in text
