"""The `sidecar` command: classify offline (order kept, batched), check-config, serve, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.v1 import router_pb2, router_pb2_grpc
from sidecar.cli import main
from sidecar_demo.stack import free_port
from tests.factories import write_jsonl

OUTPUT_KEYS = {"text", "category", "confidence", "model", "pii", "action", "masked_text"}
CATEGORIES = {"math": "math-expert", "law": "humanities-expert", "biology": "science-expert"}
REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, category_dir: Path | None, pii_dir: Path | None, **overrides) -> Path:
    models = {}
    if category_dir is not None:
        models["category"] = {"path": str(category_dir), "max_length": 64, "stride": 0}
    if pii_dir is not None:
        models["pii"] = {"path": str(pii_dir), "max_length": 64, "stride": 16}
    data = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": None, "grace_period_s": 1, "watch_config": False},
        "models": models,
        "routing": {"default_model": "general", "confidence_threshold": 0.0, "categories": CATEGORIES},
        "logging": {"level": "warning"},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path, tiny_category_dir, tiny_pii_dir) -> Path:
    return write_config(tmp_path / "router.yaml", tiny_category_dir, tiny_pii_dir)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- classify ----------------------------------------------------------------------------------------------


def test_classify_input_file_keeps_order_across_batches(config_file, tmp_path):
    card = "4111 1111 1111 1111"
    texts = [f"Text number {i} about {['cells', 'contracts', 'integrals'][i % 3]}" for i in range(7)]
    texts[3] = f"Pay with {card}, 谢谢 😀"
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    src.write_text(src.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are skipped
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--config", str(config_file), "--input", str(src), "--output", str(out),
                 "--chunk-size", "3"]) == 0
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in results] == texts
    for r in results:
        assert set(r) == OUTPUT_KEYS
        assert r["category"] in CATEGORIES and r["model"] == CATEGORIES[r["category"]]
        assert 0.0 <= r["confidence"] <= 1.0
        assert r["action"] in ("allow", "mask")
    card_row = results[3]
    assert card_row["action"] == "mask" and card not in card_row["masked_text"]
    [span] = [p for p in card_row["pii"] if p["label"] == "CREDIT_CARD"]
    assert texts[3][span["start"]:span["end"]] == card


def test_classify_one_text_prints_one_json_line(config_file, capsys):
    assert main(["classify", "--config", str(config_file), "Which enzyme makes ATP?"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert set(json.loads(line)) == OUTPUT_KEYS


def test_classify_keeps_a_client_model(config_file, capsys):
    assert main(["classify", "--config", str(config_file), "--model", "gpt-4o", "Solve x."]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "gpt-4o" and row["category"] is None


@pytest.mark.parametrize("line, problem", [
    ('{"id": 2}', "line 2: no 'text' field"),
    ('{"text": 3}', "line 2: 'text' must be a string"),
    ("not json", "line 2: not valid JSON"),
    ('["text"]', "line 2: no 'text' field"),
])
def test_bad_input_line_is_named_by_number(config_file, tmp_path, capsys, line, problem):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    assert main(["classify", "--config", str(config_file), "--input", str(src)]) == 2
    [error] = error_lines(capsys.readouterr().err)
    assert error.startswith("error: --input:") and problem in error


def test_classify_needs_text_or_input(config_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["classify", "--config", str(config_file)])
    assert e.value.code == 2
    assert "TEXT or --input" in capsys.readouterr().err


# --- configuration errors ----------------------------------------------------------------------------------


def test_bad_config_key_is_one_line_naming_it(tmp_path, capsys):
    path = write_config(tmp_path / "router.yaml", None, None, routing={"confidence_threshold": 2})
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: routing.confidence_threshold: ")


def test_missing_model_directory_is_one_line_naming_the_model(tmp_path, capsys):
    path = write_config(tmp_path / "router.yaml", tmp_path / "nowhere", None)
    assert main(["classify", "--config", str(path), "hello"]) == 2
    [error] = error_lines(capsys.readouterr().err)
    assert error.startswith("error: models.category:") and "nowhere" in error


def test_category_not_in_the_model_is_a_config_error(tmp_path, tiny_category_dir, capsys):
    path = write_config(tmp_path / "router.yaml", tiny_category_dir, None,
                        routing={"categories": {**CATEGORIES, "astronomy": "science-expert"}})
    assert main(["check-config", str(path)]) == 2
    [error] = error_lines(capsys.readouterr().err)
    assert error.startswith("error: routing.categories.astronomy: not a label of the category model")


def test_check_config_loads_models_and_prints_a_summary(config_file, capsys):
    assert main(["check-config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "(valid)" in out
    assert "model category: path=" in out and "3 labels" in out
    assert "model pii: path=" in out
    assert "routing: 3 categories -> 4 backends" in out


def test_unreadable_config_file_is_one_line(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- serve, end to end in a subprocess ---------------------------------------------------------------------


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("the sidecar did not report SERVING in time")


def test_serve_answers_reloads_on_sighup_and_exits_cleanly_on_sigterm(config_file, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(config_file),
                             "--listen", target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        wait_serving(target, proc)
        with grpc.insecure_channel(target) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            assert stub.Classify(router_pb2.ClassifyRequest(text="Solve x.", model="m1"), timeout=30).model == "m1"
            data = yaml.safe_load(config_file.read_text())
            data["routing"]["confidence_threshold"] = 1.0  # nothing clears it: everything goes to the default
            config_file.write_text(yaml.safe_dump(data))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if stub.Classify(router_pb2.ClassifyRequest(text="Solve x."), timeout=30).route_reason == "low_confidence":
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("SIGHUP did not reload the config")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
