"""The assembled, swappable application state: config + engine + decision maker, built together and replaced together.

A stream takes the state current when it starts and keeps it to its end, so a reload never changes the
rules (or models) under a request in flight. Building happens off the event loop; swapping is one
attribute assignment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from sidecar.config import Config
from sidecar.decisions import DecisionMaker
from sidecar.errors import ConfigError
from sidecar.logs import get_logger
from sidecar.metrics import Metrics
from sidecar.vocabulary import Kind

log = get_logger("sidecar.app")


def normalize_path(path: str) -> str:
    """The path as a backend's router would see it: no query or fragment, percent-escapes decoded, empty
    and ``.`` segments dropped, ``..`` applied, no trailing slash. Envoy normalises too (envoy.yaml), so
    this is a second line: ``//v1/./chat/completions`` is still the chat API."""
    path = unquote(path.split("?", 1)[0].split("#", 1)[0])
    segments: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)

EngineFactory = Callable[[Config, Metrics | None], Any]
"""Builds the engine for a config (tests pass one that returns a FakeEngine)."""


@dataclass(frozen=True)
class App:
    """Everything one request needs, immutable once built."""

    config: Config
    engine: Any
    decider: DecisionMaker
    generation: int = 0
    loaded_at: float = field(default_factory=time.time)
    kinds: dict[str, Kind] = field(default_factory=dict)
    """Normalised request path → processor kind, from ``config.paths``."""
    model_names: frozenset[str] = frozenset()
    """Backend model names the config knows: the only ones used as metric labels."""

    def kind_for(self, path: str | None) -> Kind | None:
        """The API kind of a request path; `Kind.GENERIC` for any other path, None without a path."""
        if not path:
            return None
        return self.kinds.get(normalize_path(path), Kind.GENERIC)

    def close(self) -> None:
        self.engine.close()


def load_engine(config: Config, metrics: Metrics | None) -> Any:
    """The real Engine for `config`, with batch observations wired to `metrics`."""
    from sidecar.inference.engine import Engine

    if metrics is None:
        return Engine.load(config.models, config.batching, checksums=config.pii.checksums)
    return Engine.load(config.models, config.batching, checksums=config.pii.checksums,
                       on_batch=metrics.observe_batch, on_shed=metrics.observe_shed)


def check_categories(config: Config, labels: list[str] | None) -> None:
    """Every ``routing.categories`` key must be a label the category model can produce."""
    if labels is None:
        if config.routing.categories:
            log.warning("categories_without_model", categories=len(config.routing.categories),
                        default_model=config.routing.default_model)
        return
    known = set(labels)
    for label in config.routing.categories:
        if label not in known:
            raise ConfigError(f"routing.categories.{label}",
                              f"not a label of the category model (labels: {', '.join(labels)})")


def build_app(config: Config, metrics: Metrics | None = None, *, engine_factory: EngineFactory = load_engine,
              generation: int = 0) -> App:
    """Load models and assemble the state; blocking (run it in a thread from async code). The engine is
    closed again when the config turns out not to fit it."""
    engine = engine_factory(config, metrics)
    try:
        check_categories(config, engine.category_labels)
        decider = DecisionMaker(config, engine)
    except BaseException:
        engine.close()
        raise
    paths = config.paths
    kinds = {normalize_path(p): kind for kind, group in (
        (Kind.CHAT, paths.chat), (Kind.COMPLETIONS, paths.completions), (Kind.RESPONSES, paths.responses),
        (Kind.MESSAGES, paths.messages)) for p in group}
    return App(config=config, engine=engine, decider=decider, generation=generation, kinds=kinds,
               model_names=model_names(config))


def model_names(config: Config) -> frozenset[str]:
    """Every backend model the config names (routing table, default, per-model policies)."""
    routing = config.routing
    return frozenset(routing.categories.values()) | {routing.default_model} | frozenset(config.pii.policies)


class AppHolder:
    """The one mutable reference to the current App. Streams take it once (``use``), reload replaces it,
    and the count of users per generation tells when a replaced App can be closed."""

    def __init__(self, app: App):
        self._app = app
        self._users: dict[int, int] = {}

    @property
    def current(self) -> App:
        return self._app

    @contextmanager
    def use(self) -> Iterator[App]:
        """The current App, held for the duration of the block (a stream, an RPC)."""
        app = self._app
        self._users[app.generation] = self._users.get(app.generation, 0) + 1
        try:
            yield app
        finally:
            left = self._users[app.generation] - 1
            if left:
                self._users[app.generation] = left
            else:
                del self._users[app.generation]

    def users(self, app: App) -> int:
        return self._users.get(app.generation, 0)

    def swap(self, app: App) -> App:
        """Install `app` and return the previous one (the caller closes it once its users are done)."""
        old, self._app = self._app, app
        return old
