"""The observability surface: Prometheus collectors and endpoint, and the log scrubbing that keeps content out."""

from __future__ import annotations

import io
import json
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import LoggingConfig
from sidecar.errors import ConfigError
from sidecar.logs import configure_logging, drop_sensitive, exception_fields, get_logger
from sidecar.metrics import Metrics, parse_listen, start_metrics_server
from tests.grpc_helpers import make_decision


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_metrics_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.observe_outcome("skipped", "not_json")
    assert sample(a, "sidecar_requests_total", action="skipped", category="none", model="none") == 1
    assert sample(b, "sidecar_requests_total", action="skipped", category="none", model="none") is None


def test_decision_counts_request_entities_and_latency():
    metrics = Metrics(CollectorRegistry())
    decision = make_decision(action="mask", model="math-expert", category="math", confidence=0.9,
                             entity_types=("EMAIL_ADDRESS", "PERSON"), entity_counts={"EMAIL_ADDRESS": 2, "PERSON": 1})
    metrics.observe_decision(decision, 0.004, frozenset({"math-expert"}))
    assert sample(metrics, "sidecar_requests_total", action="mask", category="math", model="math-expert") == 1
    assert sample(metrics, "sidecar_pii_entities_total", type="EMAIL_ADDRESS") == 2
    assert sample(metrics, "sidecar_pii_entities_total", type="PERSON") == 1
    assert sample(metrics, "sidecar_decision_seconds_count") == 1
    assert sample(metrics, "sidecar_request_errors_total", reason="timeout") is None


def test_degraded_decision_counts_its_error_reason():
    metrics = Metrics()
    metrics.observe_decision(make_decision(action="degraded", model="general", route_reason="degraded",
                                           error="timeout"), 0.3, frozenset({"general"}))
    assert sample(metrics, "sidecar_requests_total", action="degraded", category="none", model="general") == 1
    assert sample(metrics, "sidecar_request_errors_total", reason="timeout") == 1


def test_model_names_the_config_does_not_know_share_one_label():
    metrics = Metrics()
    for i in range(400):
        metrics.observe_decision(make_decision(model=f"client-{i}", route_reason="client_model"), 0.01,
                                 frozenset({"general"}))
    assert sample(metrics, "sidecar_requests_total", action="allow", category="none", model="other") == 400
    series = [s for m in metrics.registry.collect() if m.name == "sidecar_requests" for s in m.samples]
    assert len(series) <= 3  # the _total sample and its _created twin, one label set


def test_batch_observations_feed_size_and_latency_histograms():
    metrics = Metrics()
    metrics.observe_batch("pii", batch_size=8, tokens=512, infer_ms=12.5)
    metrics.observe_batch("pii", batch_size=1, tokens=64, infer_ms=2.0)
    assert sample(metrics, "sidecar_batch_size_count", model="pii") == 2
    assert sample(metrics, "sidecar_batch_size_sum", model="pii") == 9
    assert sample(metrics, "sidecar_batch_tokens_total", model="pii") == 576
    assert sample(metrics, "sidecar_inference_seconds_sum", model="pii") == pytest.approx(0.0145)


def test_metrics_endpoint_serves_the_registry_over_http():
    metrics = Metrics()
    metrics.observe_outcome("rejected", "not_json")
    server = start_metrics_server("127.0.0.1:0", metrics)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.close()
    assert 'sidecar_request_errors_total{reason="not_json"} 1.0' in text


@pytest.mark.parametrize("listen, expected", [("0.0.0.0:9090", ("0.0.0.0", 9090)), ("[::1]:80", ("::1", 80)),
                                              (":9090", ("0.0.0.0", 9090))])
def test_listen_addresses_parse(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9090", "host:port", "host:70000"])
def test_bad_listen_address_names_the_key(listen):
    with pytest.raises(ConfigError) as e:
        parse_listen(listen)
    assert e.value.key == "server.metrics_listen"


def test_log_scrubbing_drops_content_fields_at_any_depth():
    event = drop_sensitive(None, "info", {"event": "request", "text": "my secret", "nested": {"body": "x", "n": 1},
                                          "items": [{"value": "v"}], "request_id": "r1"})
    assert "my secret" not in json.dumps(event)
    assert event["nested"]["n"] == 1 and event["request_id"] == "r1"
    assert event["items"][0]["value"] != "v"


def test_json_logs_render_events_with_fields_and_no_content():
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream)
    get_logger("test").info("request", request_id="r1", text="john@example.com", pii_types=["EMAIL_ADDRESS"])
    get_logger("test").debug("not_shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["request"]
    assert lines[0]["pii_types"] == ["EMAIL_ADDRESS"]
    assert "john@example.com" not in stream.getvalue()


def test_exceptions_are_logged_by_type_and_place_not_message():
    try:
        {}["user secret"]
    except KeyError as e:
        fields = exception_fields(e)
    assert fields["error_type"] == "builtins.KeyError"
    assert "user secret" not in json.dumps(fields)
    assert any("test_metrics.py" in frame for frame in fields["error_at"])


def test_requests_shed_at_admission_are_counted_by_model_and_reason():
    metrics = Metrics()
    metrics.observe_shed("pii", "deadline")
    metrics.observe_shed("pii", "deadline")
    metrics.observe_shed("category", "queue_full")
    assert sample(metrics, "sidecar_shed_total", model="pii", reason="deadline") == 2
    assert sample(metrics, "sidecar_shed_total", model="category", reason="queue_full") == 1
