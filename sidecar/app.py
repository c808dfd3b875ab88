"""The assembled, swappable application state: config + engine + router, built together and replaced together.

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

from sidecar.config import Config
from sidecar.errors import ConfigError
from sidecar.logs import get_logger
from sidecar.metrics import Metrics
from sidecar.router import Router

log = get_logger("sidecar.app")

KIND_CHAT = "chat"
KIND_COMPLETIONS = "completions"

EngineFactory = Callable[[Config, Metrics | None], Any]
"""Builds the engine for a config (tests pass one that returns a FakeEngine)."""


@dataclass(frozen=True)
class App:
    """Everything one request needs, immutable once built."""

    config: Config
    engine: Any
    router: Router
    generation: int = 0
    loaded_at: float = field(default_factory=time.time)
    kinds: dict[str, str] = field(default_factory=dict)
    """Request path (no query string) → processor kind, from ``config.paths``."""

    def kind_for(self, path: str | None) -> str | None:
        if not path:
            return None
        return self.kinds.get(path.split("?", 1)[0])

    def close(self) -> None:
        self.engine.close()


def load_engine(config: Config, metrics: Metrics | None) -> Any:
    """The real Engine for `config`, with batch observations wired to `metrics`."""
    from sidecar.inference.engine import Engine

    on_batch = metrics.observe_batch if metrics is not None else None
    return Engine.load(config.models, config.batching, checksums=config.pii.checksums, on_batch=on_batch)


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
        router = Router(config, engine)
    except BaseException:
        engine.close()
        raise
    kinds = {p: KIND_CHAT for p in config.paths.chat} | {p: KIND_COMPLETIONS for p in config.paths.completions}
    return App(config=config, engine=engine, router=router, generation=generation, kinds=kinds)


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
