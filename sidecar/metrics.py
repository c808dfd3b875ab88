"""Prometheus metrics, all in one place, on a registry of their own (tests and reloads stay isolated).

Label values come from bounded sets only (actions: `sidecar.vocabulary.Action`; configured categories and
models, entity types, reason codes), never from request content.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sidecar.decisions import Decision
    from sidecar.vocabulary import Action

NONE_LABEL = "none"
OTHER_LABEL = "other"
"""The model label for a backend model the config does not name (a client's choice): labels stay bounded."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The sidecar's collectors. One instance per process; the server wires it to the engine and processor."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests decided, by action, category and selected model.",
            ["action", "category", "model"], registry=r)
        self.pii_entities = Counter(
            "sidecar_pii_entities", "PII entities kept by policy, by entity type.", ["type"], registry=r)
        self.request_errors = Counter(
            "sidecar_request_errors", "Requests not decided normally, by reason code.", ["reason"], registry=r)
        self.inference_seconds = Histogram(
            "sidecar_inference_seconds", "Forward-pass time per batch, by model.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "sidecar_batch_size", "Windows per forward pass, by model.", ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.batch_tokens = Counter(
            "sidecar_batch_tokens", "Padded tokens run through each model.", ["model"], registry=r)
        self.decision_seconds = Histogram(
            "sidecar_decision_seconds", "Time from a complete request body to the sidecar's answer.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge(
            "sidecar_active_streams", "ext_proc streams open now.", registry=r)
        self.shed = Counter(
            "sidecar_shed", "Requests refused at admission, by model and reason (deadline: the queue could not "
            "meet it; queue_full).", ["model", "reason"], registry=r)
        self.reloads = Counter(
            "sidecar_reloads", "Config and model reloads, by result.", ["result"], registry=r)
        self.answers = Counter(
            "sidecar_answers_scanned", "Backend answers scanned (response_pii), by result: passed (masked or "
            "clean), pii_in_answer (withheld), answer_not_inspected (withheld unread).", ["result"], registry=r)

    def observe_decision(self, decision: Decision, seconds: float, known_models: frozenset[str] = frozenset()) -> None:
        category = decision.category or NONE_LABEL
        model = NONE_LABEL if decision.model is None else decision.model if decision.model in known_models \
            else OTHER_LABEL
        self.requests.labels(action=decision.action, category=category, model=model).inc()
        for entity_type, count in decision.entity_counts.items():
            self.pii_entities.labels(type=entity_type).inc(count)
        if decision.error:
            self.request_errors.labels(reason=decision.error).inc()
        self.decision_seconds.observe(seconds)

    def observe_outcome(self, action: Action, reason: str, seconds: float | None = None,
                        model: str | None = None) -> None:
        """A request answered without a decision: skipped, rejected, or degraded (`reason` is the code)."""
        self.requests.labels(action=action, category=NONE_LABEL, model=model or NONE_LABEL).inc()
        self.request_errors.labels(reason=reason).inc()
        if seconds is not None:
            self.decision_seconds.observe(seconds)

    def observe_answer(self, result: str) -> None:
        self.answers.labels(result=result).inc()

    def observe_shed(self, model: str, reason: str) -> None:
        """The Engine's ``on_shed`` callback: a request refused at admission."""
        self.shed.labels(model=model, reason=reason).inc()

    def observe_batch(self, model: str, batch_size: int, tokens: int, infer_ms: float) -> None:
        """The Engine's ``on_batch`` callback; called from batcher worker threads (collectors are thread-safe)."""
        self.batch_size.labels(model=model).observe(batch_size)
        self.batch_tokens.labels(model=model).inc(tokens)
        self.inference_seconds.labels(model=model).observe(infer_ms / 1000.0)


def parse_listen(listen: str, key: str = "server.metrics_listen") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); a bad value is a ConfigError naming `key`."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"'{listen}' is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class MetricsServer:
    """The running /metrics endpoint (a daemon thread); ``port`` is the bound port, useful with port 0."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(listen: str, metrics: Metrics) -> MetricsServer:
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise ConfigError("server.metrics_listen", f"cannot listen on {listen} ({e.strerror})") from None
    return MetricsServer(server, thread)
