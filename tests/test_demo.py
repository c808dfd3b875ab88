"""`make demo` and its parts: the mock backend, the stack's config rewriting and clean-up, the demo's errors."""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from sidecar_demo import __main__ as demo
from sidecar_demo import stack as stack_module
from sidecar_demo.configs import ENVOY_CONFIG, REPO_ROOT, StackError, envoy_layout, local_envoy_config, merge
from sidecar_demo.mock_backend import make_app
from sidecar_demo.stack import MissingEnvoy, MissingModels, Stack
from tests.conftest import PII_LABELS, make_untrained_model_dir

SHIPPED_ENVOY = yaml.safe_load(ENVOY_CONFIG.read_text(encoding="utf-8"))


def children_of_this_process() -> list[str]:
    """Command lines of live processes whose parent is this test process (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.append(cmdline)
    return out


# --- the mock backend ----------------------------------------------------------------------------------------

@pytest.fixture
async def mock():
    client = TestClient(TestServer(make_app("math-expert")))
    await client.start_server()
    yield client
    await client.close()


async def test_mock_answers_a_chat_completion_naming_itself_and_quoting_the_user(mock):
    body = {"model": "math-expert", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Card ************1111, why?"}]}
    resp = await mock.post("/v1/chat/completions", json=body, headers={"x-router-category": "math"})
    answer = await resp.json()
    assert resp.status == 200 and answer["object"] == "chat.completion" and answer["model"] == "math-expert"
    assert answer["choices"][0]["message"]["content"] == "[math-expert] received: Card ************1111, why?"
    assert resp.headers["x-mock-backend"] == "math-expert" and resp.headers["x-router-category"] == "math"


async def test_mock_records_raw_bodies_and_forgets_them_on_delete(mock):
    raw = b'{"model": "auto", "messages": [{"role": "user", "content": "caf\xe9"}]}'
    resp = await mock.post("/v1/chat/completions", data=raw, headers={"x-test": "1"})
    assert resp.status == 400  # not UTF-8: the answer an OpenAI server gives
    [record] = (await (await mock.get("/_received")).json())["received"]
    assert base64.b64decode(record["body_b64"]) == raw and record["body"] is None
    assert record["path"] == "/v1/chat/completions" and record["headers"]["x-test"] == "1"
    await mock.delete("/_received")
    assert (await (await mock.get("/_received")).json())["received"] == []


async def test_mock_streams_server_sent_events_when_asked(mock):
    body = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
    text = await (await mock.post("/v1/chat/completions", json=body)).text()
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "[math-expert] received: hi"


def sse(text: str) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = block.split("\n")
            name = next((line[7:] for line in lines if line.startswith("event: ")), None)
            data = next(line[6:] for line in lines if line.startswith("data: "))
            out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


async def test_mock_streams_deltas_of_the_requested_size_and_echoes_a_tool_call(mock):
    body = {"stream": True, "messages": [{"role": "user", "content": "hello there"}]}
    resp = await mock.post("/v1/chat/completions", json=body,
                           headers={"x-mock-chunk-chars": "4", "x-mock-tool-call": "lookup"})
    events = sse(await resp.text())
    deltas = [e["choices"][0]["delta"] for _, e in events[:-1]]
    content = [d["content"] for d in deltas if "content" in d]
    assert content == ["[mat", "h-ex", "pert", "] re", "ceiv", "ed: ", "hell", "o th", "ere"]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "lookup", "arguments": ""} and calls[0]["id"].startswith("call_")
    assert all(len(c["function"]["arguments"]) <= 4 for c in calls)
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"text": "hello there"}
    assert events[-2][1]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == (None, "[DONE]")
    answer = await (await mock.post("/v1/chat/completions", json={"messages": body["messages"]},
                                    headers={"x-mock-tool-call": "lookup"})).json()
    [call] = answer["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"text": "hello there"}
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("value", ["0", "-2", "x"])
async def test_mock_refuses_a_bad_chunk_size(mock, value):
    resp = await mock.post("/v1/chat/completions", json={"messages": []}, headers={"x-mock-chunk-chars": value})
    assert resp.status == 400 and "x-mock-chunk-chars" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("input_", ["earlier", [{"role": "user", "content": "earlier"},
                                                {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                                                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]])
async def test_mock_answers_the_responses_api_whole_and_streamed(mock, input_):
    quoted = "earlier" if isinstance(input_, str) else "hi"
    answer = await (await mock.post("/v1/responses", json={"model": "m", "input": input_})).json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    [message] = answer["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": f"[math-expert] received: {quoted}",
                                   "annotations": []}]
    resp = await mock.post("/v1/responses", json={"input": input_, "stream": True}, headers={"x-mock-chunk-chars": "5"})
    events = sse(await resp.text())
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert all(name == e["type"] for name, e in events)
    kinds = [name for name, _ in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["response.output_text.done", "response.completed"]
    deltas = [e for _, e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and all(len(d["delta"]) <= 5 and d["output_index"] == d["content_index"] == 0 for d in deltas)
    text = "".join(d["delta"] for d in deltas)
    assert text == f"[math-expert] received: {quoted}" == events[-2][1]["text"]
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == text


async def test_mock_answers_the_messages_api_whole_and_streamed(mock):
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    answer = await (await mock.post("/v1/messages", json={"model": "m", "max_tokens": 9, "messages": messages})).json()
    assert (answer["type"], answer["role"], answer["stop_reason"]) == ("message", "assistant", "end_turn")
    assert answer["content"] == [{"type": "text", "text": "[math-expert] received: one\ntwo"}]
    resp = await mock.post("/v1/messages", json={"messages": messages, "stream": True}, headers={"x-mock-chunk-chars": "1"})
    events = sse(await resp.text())
    assert all(name == e["type"] for name, e in events)
    assert [n for n, _ in events if n != "content_block_delta"] == [
        "message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop"]
    deltas = [e["delta"]["text"] for _, e in events if e["type"] == "content_block_delta"]
    assert deltas == list("[math-expert] received: one\ntwo")
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    resp = await mock.post("/v1/messages", data=b"not json")
    assert resp.status == 400 and (await resp.json())["type"] == "error"


async def test_mock_lists_its_model(mock):
    answer = await (await mock.get("/v1/models")).json()
    assert [m["id"] for m in answer["data"]] == ["math-expert"]


# --- config rewriting ----------------------------------------------------------------------------------------

def test_layout_of_the_shipped_envoy_config():
    layout = envoy_layout(SHIPPED_ENVOY)
    assert layout.sidecar_cluster == "semantic_sidecar" and layout.default_cluster == "general"
    assert set(layout.routes) == set(layout.backend_clusters) - {"general"}


def test_local_envoy_config_changes_only_addresses():
    layout = envoy_layout(SHIPPED_ENVOY)
    names = [layout.sidecar_cluster, *layout.backend_clusters]
    endpoints = {name: ("127.0.0.1", 20000 + i) for i, name in enumerate(names)}
    local = local_envoy_config(SHIPPED_ENVOY, endpoints)
    for i, cluster in enumerate(local["static_resources"]["clusters"]):
        [group] = cluster["load_assignment"]["endpoints"]
        [lb] = group["lb_endpoints"]
        assert lb["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 20000 + i}
    assert local["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}

    def without_addresses(config: dict) -> dict:
        config = copy.deepcopy(config)
        del config["admin"]["address"]
        for listener in config["static_resources"]["listeners"]:
            del listener["address"]
        for cluster in config["static_resources"]["clusters"]:
            del cluster["load_assignment"]["endpoints"]
        return config

    assert without_addresses(local) == without_addresses(SHIPPED_ENVOY)


def test_local_envoy_config_refuses_a_cluster_without_a_local_address():
    with pytest.raises(StackError, match="no local address for Envoy cluster .math-expert."):
        local_envoy_config(SHIPPED_ENVOY, {"semantic_sidecar": ("127.0.0.1", 1)})


def test_overrides_merge_mappings_and_replace_everything_else():
    base = {"routing": {"default_model": "general", "categories": {"math": "m"}}, "pii": {"roles": ["user"]}}
    out = merge(base, {"routing": {"categories": {"law": "l"}}, "pii": {"roles": ["system"]}})
    assert out == {"routing": {"default_model": "general", "categories": {"math": "m", "law": "l"}},
                   "pii": {"roles": ["system"]}}
    assert base["routing"]["categories"] == {"math": "m"}


# --- errors and clean-up -------------------------------------------------------------------------------------

def test_missing_model_directories_are_named_before_anything_starts(tmp_path):
    with pytest.raises(MissingModels) as caught:
        Stack(router_overrides={"models": {"pii": {"path": str(tmp_path / "nope")}}}, workdir=tmp_path).start()
    assert caught.value.missing["pii"] == tmp_path / "nope"
    assert children_of_this_process() == []


@pytest.mark.envoy
def test_a_sidecar_that_cannot_start_fails_the_stack_with_its_log_and_stops_the_rest(tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    overrides = {"models": {"category": {"path": str(not_a_model)}, "pii": None}}
    with pytest.raises(StackError) as caught, Stack(router_overrides=overrides, workdir=tmp_path / "run"):
        pytest.fail("the stack started without a usable model")
    assert "sidecar exited with status 2" in str(caught.value) and "models.category" in str(caught.value)
    assert children_of_this_process() == []


def test_demo_explains_how_to_get_the_bundled_models():
    message = demo.missing_models_message(MissingModels({"category": REPO_ROOT / "models" / "category"}))
    assert "make models" in message and "--models-dir" in message


def test_demo_without_models_exits_with_one_line_not_a_traceback(tmp_path, capsys):
    assert demo.main(["--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model directory not found") and "Traceback" not in err


def test_demo_spots_models_that_are_git_lfs_pointers(tmp_path, capsys):
    for name in ("category", "pii"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.int8.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    assert demo.main(["--models-dir", str(tmp_path)]) == 2
    assert "git lfs pull" in capsys.readouterr().err


def test_demo_without_envoy_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    for name in ("category", "pii"):
        (tmp_path / name).mkdir()

    def no_envoy(_explicit=None):
        raise MissingEnvoy("no envoy binary found: `make install` installs one")

    monkeypatch.setattr(stack_module, "find_envoy", no_envoy)
    assert demo.main(["--models-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no envoy binary found")
    assert children_of_this_process() == []


def fields(out: str, label: str) -> list[str]:
    """Every `label` field of the demo's output, its wrapped continuation lines joined back."""
    found, lines = [], out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(label):
            parts = [line.strip()]
            for more in lines[i + 1:]:
                if not more.startswith(" " * 7):
                    break
                parts.append(more.strip())
            found.append(" ".join(parts))
    return found


# --- the demo itself -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models_dir(tiny_base, tmp_path_factory) -> Path:
    """category/ and pii/ as `--models-dir` expects them, with router.yaml's category labels."""
    root = tmp_path_factory.mktemp("demo_models")
    labels = list(yaml.safe_load(stack_module.ROUTER_CONFIG.read_text())["routing"]["categories"])
    make_untrained_model_dir(tiny_base, root / "category", "category", labels)
    make_untrained_model_dir(tiny_base, root / "pii", "pii", PII_LABELS)
    return root


@pytest.mark.envoy
@pytest.mark.timeout(300)
def test_demo_shows_each_sample_masks_the_card_and_stops_everything(models_dir, capsys):
    assert demo.main(["--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    for number in range(1, len(demo.SAMPLES) + 1):
        assert f"\n{number}. " in out
    received = fields(out, "received:")
    assert len(received) >= 3
    assert not any("4111 1111 1111 1111" in line or "5555 5555 5555 4444" in line for line in received)
    assert "answered by general" in out and "everything stopped" in out
    [saw] = fields(out, "backend saw:")
    [got] = fields(out, "client got:")
    assert "<EMAIL_ADDRESS_" in saw and "alice.johnson@example.org" not in saw  # pseudonymized on the way in
    assert "alice.johnson@example.org" in got and "<EMAIL_ADDRESS_" not in got  # restored on the way back
    assert children_of_this_process() == []


def test_an_installed_stack_reads_the_shipped_files_from_sidecar_deploy_dir(tmp_path, monkeypatch):
    from sidecar_demo.configs import StackError, deploy_dir

    monkeypatch.setenv("SIDECAR_DEPLOY_DIR", str(tmp_path))
    with pytest.raises(StackError, match="no envoy.yaml in .*SIDECAR_DEPLOY_DIR"):
        deploy_dir()
    (tmp_path / "envoy.yaml").write_text("static_resources: {}\n")
    assert deploy_dir() == tmp_path.resolve()
    monkeypatch.delenv("SIDECAR_DEPLOY_DIR")
    assert (deploy_dir() / "router.yaml").is_file()  # the checkout's
