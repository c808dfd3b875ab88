"""Typed, frozen configuration, validated once at start-up (and on reload).

Unknown keys are errors, and every error names the dotted key that caused it, e.g.
``routing.confidence_threshold: Input should be less than or equal to 1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_contract.tasks import get_task
from sidecar.errors import ConfigError
from sidecar.operators import OperatorConfig, Replace
from sidecar.pseudonyms import DEFAULT_FORMAT, check_format


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Section):
    """TLS on the gRPC server, so request bodies never cross the network in clear between Envoy and the
    sidecar. The files are re-read when they change (a rotated certificate needs no restart)."""

    cert_file: str
    """PEM certificate chain of the server."""
    key_file: str
    """PEM private key of the server."""
    client_ca_file: str | None = None
    """PEM CA bundle: when set, clients (Envoy) must present a certificate it signed (mutual TLS)."""


class ServerConfig(_Section):
    listen: str = "0.0.0.0:50051"
    """gRPC address for ext_proc, the Classify API, health checking and reflection."""
    tls: TlsConfig | None = None
    """null: plaintext HTTP/2 (loopback, or a Unix socket in Envoy's own pod); else TLS (see TlsConfig)."""
    health_listen: str | None = None
    """A second, plaintext gRPC address that serves only health checking (the same statuses): for probes that
    cannot speak TLS (Kubernetes' gRPC probes) when ``tls`` is on. Nothing else is reachable there."""
    classify_api: bool = True
    """The Classify API, gRPC service ``sidecar.api.v1.Router``, which answers with the PII it finds: turn it
    off where callers other than operators can reach the port."""
    metrics_listen: str | None = "0.0.0.0:9090"
    """HTTP address for Prometheus metrics; null turns the endpoint off."""
    max_message_bytes: Annotated[int, Field(ge=64 * 1024)] = 8 * 1024 * 1024
    """gRPC receive/send limit; keep it above Envoy's per-request buffer limit."""
    grace_period_s: Annotated[float, Field(ge=0)] = 10.0
    """How long in-flight streams get to finish on shutdown."""
    reflection: bool = True
    """gRPC server reflection (service discovery for grpcurl and the like)."""
    watch_config: bool = True
    """Reload when the config file changes (SIGHUP always reloads)."""


class ModelConfig(_Section):
    path: str
    """A model directory made by `trainer`, or a Hugging Face Hub id."""
    runtime: Literal["auto", "onnx", "onnx-int8", "torch"] = "auto"
    """auto: model.int8.onnx on CPU, model.onnx on GPU, PyTorch weights when no ONNX file exists."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: Annotated[int, Field(ge=16, le=8192)] | None = None
    """Tokens per window, special tokens included. Unset: the window the model was trained at (its
    ``sidecar_max_length``), else 512; never longer than its position embeddings. Static INT8 ranges were
    measured in the trained window: score a longer one as served before raising it (docs/training.md)."""
    stride: Annotated[int, Field(ge=0)] | None = None
    """PII windows overlap by this many tokens so entities on a window edge are seen whole. Unset: 64, at
    most a quarter of the window."""
    line_windows: bool = True
    """Token (PII) models: a multi-line text is also read line by line, each line (with the lines after it
    while it has under 16 tokens) in windows of its own, and what a line shows alone is masked too, so text
    before a line cannot hide a name in it. Costs about one more reading of a multi-line text (at most about
    2.5x for lines just over a window long; bench/line_windows.py); a request whose line windows the queue
    cannot take is read whole only. false: the whole text's windows only."""
    entity_bias: dict[str, Annotated[float, Field(ge=-20, le=20)]] = {}
    """Token (PII) models: added to the model's scores for an entity type's tags before each token's tag is
    chosen (``{PERSON: 1.5}``): above 0 the type is found more often, caught more and masked falsely more;
    below 0, less. Types the model lacks are refused at load. Unset: as trained (docs/operations.md has a
    measured table)."""
    threads: Annotated[int, Field(ge=0)] = 0
    """Intra-op threads for ONNX Runtime on CPU (or torch's process-wide count). 0: the runtime's default
    for a model that runs alone; two CPU models get half the usable cores each."""
    small_pass_tokens: Annotated[int, Field(ge=0)] = 256
    """On CPU with more than one thread: forward passes of at most this many padded tokens run on a second,
    one-thread ONNX Runtime session of the model (its weights held twice), where waking the thread pool
    would cost more than it saves. 0: every pass on ``threads``."""

    @model_validator(mode="after")
    def _stride_fits(self) -> ModelConfig:
        if self.max_length is not None and self.stride is not None and self.stride >= self.max_length - 2:
            raise ValueError("stride must be smaller than max_length - 2")
        return self


class ModelsConfig(_Section):
    """Task name -> model settings. ``category`` and ``pii`` are the ones the decisions use; any other
    registered task (`model_contract.tasks`) may be loaded too, for code that asks the engine for it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    category: ModelConfig | None = None
    """Subject classifier; without it every request goes to routing.default_model."""
    pii: ModelConfig | None = None
    """PII token classifier; without it only checksum recognizers find PII."""

    @model_validator(mode="after")
    def _registered_tasks(self) -> ModelsConfig:
        for name, value in (self.model_extra or {}).items():
            get_task(name)  # UnknownTask (a ValueError): the key names no task
            if value is not None and not isinstance(value, ModelConfig):
                self.model_extra[name] = ModelConfig.model_validate(value)
        return self

    def configured(self) -> dict[str, ModelConfig]:
        """Every task with a model, by name, category and pii first."""
        tasks = {"category": self.category, "pii": self.pii, **(self.model_extra or {})}
        return {name: config for name, config in tasks.items() if config is not None}


class BatchingConfig(_Section):
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 32
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 0.0
    """Extra time the first request in a batch waits for company. Requests queued in the same event-loop
    step always share a pass, and while the model is busy the next batch gathers by itself, so waiting
    only adds latency on CPU; a GPU, where a bigger batch costs little more, may gain from 1-5 ms."""
    max_batch_tokens: Annotated[int, Field(ge=16)] = 1024
    """Padded tokens one take of the queue may run (a window longer than this runs alone): how long a pass
    holds the model, so a short request waits for at most one such pass (about 80 ms for two 512-token
    windows on 2 CPU cores; 16384 held it 1.5 s), and the peak memory of a pass. On a GPU, raise it."""
    max_queue: Annotated[int, Field(ge=1)] = 1024
    """Windows waiting per model; beyond it requests are refused at once (overloaded)."""


class RoutingConfig(_Section):
    virtual_model: str = "auto"
    """Clients that ask for this model name get the router's choice written into the body."""
    default_model: str
    """Backend for low confidence, unknown categories, degraded mode, and when no model is loaded."""
    confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    category_input: Literal["latest_user", "all_user"] = "latest_user"
    categories: dict[str, str] = Field(default_factory=dict)
    """Category label -> backend model name."""

    @field_validator("categories")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for label, model in v.items():
            if not model.strip():
                raise ValueError(f"category '{label}' maps to an empty model name")
        return v


# What places a person in context without saying who they are: masked only where a policy asks.
CONTEXT_ENTITIES = ("LOCATION", "ORGANIZATION", "DATE_TIME", "NRP", "TITLE", "PREFIX", "DOMAIN_NAME")


def _yaml_off(value: object) -> object:
    """YAML reads a bare ``off`` as false: for the settings whose values include "off"."""
    return "off" if value is False else value


class PiiPolicyConfig(_Section):
    action: Literal["mask", "pseudonymize", "block", "allow"] = "mask"
    """mask: operators replace what is kept; pseudonymize: numbered placeholders (``<PERSON_1>``) that the
    answer gets back as the values (JSON and streamed answers); block: 403; allow: forwarded as is."""
    placeholder_format: str = DEFAULT_FORMAT
    """pseudonymize: ``{type}`` and ``{n}`` with fixed text before and after (``<PERSON_1>``)."""
    response_pii: Literal["off", "mask", "block"] = "off"
    """The backend's answer scanned for personal data the request did not carry (what it carried is a
    placeholder or a mask by then): mask it with this policy's operators, or withhold the answer (502; a
    streamed answer ends with an error event), or off. Types in `block_entities` block either way."""
    score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    allow_entities: list[str] = Field(default_factory=lambda: list(CONTEXT_ENTITIES))
    """Entity types this policy lets through untouched. Default: the context types, which say where, when
    or with what but not who (``allow_entities: []`` masks them too)."""
    block_entities: list[str] = Field(default_factory=list)
    """Entity types that block the request whatever `action` says, so one policy can block card numbers
    for a backend that must never see one and still mask names."""
    default_operator: OperatorConfig = Replace()
    operators: dict[str, OperatorConfig] = Field(default_factory=dict)
    """Entity type -> operator, overriding default_operator."""

    @model_validator(mode="before")
    @classmethod
    def _default_allow(cls, data: object) -> object:
        """Blocking a context type takes it off the default allow list."""
        if isinstance(data, dict) and "allow_entities" not in data and isinstance(data.get("block_entities"), list):
            blocked = set(data["block_entities"])
            data = {**data, "allow_entities": [e for e in CONTEXT_ENTITIES if e not in blocked]}
        return data

    @field_validator("placeholder_format")
    @classmethod
    def _format(cls, v: str) -> str:
        return check_format(v)

    _response_off = field_validator("response_pii", mode="before")(lambda v: _yaml_off(v))

    @model_validator(mode="after")
    def _allow_or_block(self) -> PiiPolicyConfig:
        both = sorted(set(self.allow_entities) & set(self.block_entities))
        if both:
            raise ValueError(f"{', '.join(both)} in both allow_entities and block_entities")
        return self


class PiiConfig(_Section):
    patterns: Literal["always", "fallback", "off"] = "always"
    """Fast pattern recognizers (email, phone, US SSN, IP address, URL credentials): ``always`` beside the
    model, so those types never depend on it; ``fallback`` only when the model cannot answer (degraded);
    ``off`` never."""
    default_policy: PiiPolicyConfig = PiiPolicyConfig()
    policies: dict[str, PiiPolicyConfig] = Field(default_factory=dict)
    """Selected backend model name -> policy, overriding default_policy."""
    checksums: bool = True
    """Confirm credit-card (Luhn) and IBAN (mod 97) spans, and catch well-formed numbers the model missed."""
    response_window_chars: Annotated[int, Field(ge=32, le=65536)] = 256
    """response_pii on streamed answers: each text of the stream is held back at most this many characters,
    scanned as one, and released but for its last half (context for what follows). Larger: more context per
    scan and fewer scans, later text; the first tokens reach the client once this many have arrived."""

    _patterns_off = field_validator("patterns", mode="before")(lambda v: _yaml_off(v))

    @property
    def pseudonymizes(self) -> bool:
        """Some policy pseudonymizes: its requests' answers come back to have the values restored."""
        return any(p.action == "pseudonymize" for p in self.all_policies)

    @property
    def reads_answers(self) -> bool:
        """Some policy pseudonymizes or scans answers: requests ask Envoy for their answers."""
        return any(p.action == "pseudonymize" or p.response_pii != "off" for p in self.all_policies)

    @property
    def all_policies(self) -> tuple[PiiPolicyConfig, ...]:
        return (self.default_policy, *self.policies.values())

    def policy_for(self, model: str | None) -> PiiPolicyConfig:
        return self.policies.get(model, self.default_policy) if model is not None else self.default_policy


class FailureConfig(_Section):
    inference: Literal["fail_open", "fail_closed"] = "fail_closed"
    """fail_closed: 503 with Retry-After when the models cannot decide (error, overload, deadline), so no
    body goes on unread. fail_open (availability first): route to routing.default_model, x-router-action:
    degraded, with only the checksum and pattern recognizers masking."""
    timeout_ms: Annotated[float, Field(gt=0)] = 250.0
    """Deadline for the whole decision of a small request (parse, models, masking, rewrite); the models stop
    early enough for the no-model fallback to answer in time."""
    timeout_ms_per_kib: Annotated[float, Field(ge=0)] = 30.0
    """Added to timeout_ms for every KiB of body, so a long prompt is read whole instead of timing out."""
    max_timeout_ms: Annotated[float, Field(gt=0)] = 2600.0
    """Cap of the grown deadline. Keep it below Envoy's message_timeout (3 s in envoy.yaml): an answer Envoy
    no longer waits for is lost."""
    max_inspect_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    """Bodies larger than this (after decompression) never reach the models: fail_closed answers 413 at
    once; fail_open routes them to the default model, degraded, with only the recognizers masking."""
    bad_body: Literal["pass", "reject"] = "reject"
    """Bodies the sidecar cannot read whole (not JSON, no text, duplicated keys, unknown encodings, bodies
    Envoy streams in chunks): reject with 400 (415 for encodings, 413 for size), or pass them on unread
    (availability first: x-router-action: skipped)."""
    retry_after_s: Annotated[int, Field(ge=0, le=3600)] = 1
    """``Retry-After`` on 503 answers (overload, timeouts, model failure)."""

    @model_validator(mode="after")
    def _cap_covers_base(self) -> FailureConfig:
        if self.max_timeout_ms < self.timeout_ms:
            raise ValueError("max_timeout_ms must be at least timeout_ms")
        return self

    def timeout_s(self, size: int) -> float:
        """The decision deadline for a body of `size` bytes, in seconds."""
        grown = self.timeout_ms + self.timeout_ms_per_kib * size / 1024
        return min(grown, self.max_timeout_ms) / 1000


class PathsConfig(_Section):
    """Request paths (after normalisation) per API. A body on any other path is still scanned for PII
    (every string), but not routed."""

    chat: list[str] = ["/v1/chat/completions"]
    completions: list[str] = ["/v1/completions"]
    responses: list[str] = ["/v1/responses"]
    messages: list[str] = ["/v1/messages"]


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Config(_Section):
    server: ServerConfig = ServerConfig()
    models: ModelsConfig = ModelsConfig()
    batching: BatchingConfig = BatchingConfig()
    routing: RoutingConfig
    pii: PiiConfig = PiiConfig()
    failure: FailureConfig = FailureConfig()
    paths: PathsConfig = PathsConfig()
    logging: LoggingConfig = LoggingConfig()
    source: Path | None = Field(default=None, exclude=True)
    """The file this config came from (not a YAML key)."""


def parse_config(data: object, base_dir: Path | None = None, source: Path | None = None) -> Config:
    """Validate a mapping; relative model paths resolve against `base_dir` when they exist there."""
    if not isinstance(data, dict):
        raise ConfigError("", "the config must be a YAML mapping")
    pii = data.get("pii")
    if isinstance(pii, dict) and "roles" in pii:
        raise ConfigError("pii.roles", "no longer a setting: every text in a request is scanned, whatever its "
                                       "role or field (remove the key)")
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(key, err["msg"] + more) from None
    models = {}
    for name in ("category", "pii"):
        m: ModelConfig | None = getattr(config.models, name)
        if m is not None and base_dir is not None and not Path(m.path).is_absolute():
            candidate = base_dir / m.path
            if candidate.exists():
                m = m.model_copy(update={"path": str(candidate.resolve())})
        models[name] = m
    return config.model_copy(update={"models": ModelsConfig(**models), "source": source})


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML ({e})") from None
    return parse_config(data, base_dir=path.parent.resolve(), source=path.resolve())
