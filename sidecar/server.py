"""The gRPC server: Envoy's ExternalProcessor, the sidecar's Classify API (sidecar.api.v1.Router), health checking and reflection.

Lifecycle: build the App (models loaded, config checked against them) → listen → health SERVING. SIGHUP
or a change of the config file reloads: the new config and engine are built off the event loop, swapped
in atomically, and the old engine is closed after the grace period, so streams in flight finish on the
state they started with. A bad new config is logged and the old one keeps serving. SIGTERM/SIGINT
drain: health NOT_SERVING, in-flight streams get ``server.grace_period_s``, then the models close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model_contract.model_dir import ModelDirError
from sidecar.api.v1 import router_pb2, router_pb2_grpc
from sidecar.app import App, AppHolder, EngineFactory, build_app, load_engine
from sidecar.config import Config, load_config
from sidecar.decisions import TextDecision
from sidecar.errors import BodyTooLarge, ConfigError, InferenceError, ModelLoadError, Overloaded, RequestError
from sidecar.logs import configure_logging, exception_fields, get_logger
from sidecar.metrics import Metrics, MetricsServer, start_metrics_server
from sidecar.processor import ExternalProcessorServicer
from sidecar.tls import ReloadingCertificates

log = get_logger("sidecar.server")

EXT_PROC_SERVICE = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
HEALTH_SERVICES = ("", EXT_PROC_SERVICE, ROUTER_SERVICE)

LOAD_ERRORS = (ConfigError, ModelLoadError, ModelDirError)
"""What a bad config or model directory raises; anything else is a bug and propagates."""

RESTART_ONLY = ("listen", "metrics_listen", "max_message_bytes", "reflection", "tls", "classify_api", "health_listen")
"""server.* settings a reload cannot change on a running server."""


class RouterApiServicer(router_pb2_grpc.RouterServicer):
    """``sidecar.api.v1.Router``: the ext_proc decision for one text, for clients that call the sidecar directly."""

    def __init__(self, apps: AppHolder):
        self.apps = apps

    async def Classify(self, request: router_pb2.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> router_pb2.ClassifyResponse:
        if not request.text.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
        try:
            with self.apps.use() as app:
                requested = request.model or app.config.routing.virtual_model
                result = await app.decider.decide_text(request.text, requested)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except BodyTooLarge as e:  # over failure.max_inspect_bytes under fail_closed; a retry cannot help
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Overloaded:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "inference queue is full; retry later")
        except InferenceError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"models could not answer ({e.reason})")
        return text_decision_proto(result)


def text_decision_proto(result: TextDecision) -> router_pb2.ClassifyResponse:
    return router_pb2.ClassifyResponse(
        category=result.category or "",
        confidence=result.confidence or 0.0,
        model=result.model,
        pii=[router_pb2.PiiEntity(start=p["start"], end=p["end"], label=p["label"], score=p["score"])
             for p in result.pii],
        action=result.action,
        masked_text=result.masked_text or "",
        route_reason=result.route_reason,
    )


class SidecarServer:
    """One sidecar process: the gRPC server, the current App, the metrics endpoint, reload and drain."""

    def __init__(self, config: Config, *, metrics: Metrics | None = None, listen: str | None = None,
                 engine_factory: EngineFactory = load_engine, config_path: str | Path | None = None,
                 watch_interval_s: float = 1.0):
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.listen = listen or config.server.listen
        self.engine_factory = engine_factory
        self.config_path = Path(config_path) if config_path else config.source
        self.watch_interval_s = watch_interval_s
        self.apps: AppHolder | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self._metrics_server: MetricsServer | None = None
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._retired: list[App] = []
        self._stopped = asyncio.Event()
        self.signals_ready = asyncio.Event()
        """Set once ``run`` handles SIGTERM/SIGINT/SIGHUP."""
        self._config_mtime = self._mtime()

    @property
    def app(self) -> App:
        assert self.apps is not None, "start() first"
        return self.apps.current

    async def start(self) -> int:
        """Load models, start listening, report SERVING; returns the bound port."""
        app = await asyncio.to_thread(build_app, self.config, self.metrics, engine_factory=self.engine_factory)
        self.apps = AppHolder(app)
        server = self._grpc_server()
        try:
            try:
                tls = self.config.server.tls
                if tls is None:
                    port = server.add_insecure_port(self.listen)
                else:
                    port = server.add_secure_port(self.listen, ReloadingCertificates(tls).credentials())
            except RuntimeError as e:
                raise ConfigError("server.listen", f"cannot listen on {self.listen} ({e})") from None
            if self.config.server.metrics_listen:
                self._metrics_server = start_metrics_server(self.config.server.metrics_listen, self.metrics)
            await server.start()
            await self._start_health_server()
        except BaseException:
            await server.stop(None)
            if self._health_server is not None:
                await self._health_server.stop(None)
            if self._metrics_server is not None:
                self._metrics_server.close()
            app.close()
            raise
        self._server, self.port = server, port
        for name in self._services():
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", listen=self.listen, port=port, metrics_port=self.metrics_port,
                 models=app.engine.describe(), reflection=self.config.server.reflection)
        return port

    def _grpc_server(self) -> grpc.aio.Server:
        """The server with every service added; message limits raised from gRPC's 4 MiB to Envoy's buffer size."""
        limit = self.config.server.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second sidecar on a busy port must fail, not silently share it
        ])
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(self.apps, self.metrics), server)
        if self.config.server.classify_api:
            router_pb2_grpc.add_RouterServicer_to_server(RouterApiServicer(self.apps), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.server.reflection:
            named = tuple(n for n in self._services() if n) + (health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(named, server)
        return server

    async def _start_health_server(self) -> None:
        """The plaintext health-only port (``server.health_listen``), when configured."""
        listen = self.config.server.health_listen
        if listen is None:
            return
        self._health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        try:
            self.health_port = self._health_server.add_insecure_port(listen)
        except RuntimeError as e:
            raise ConfigError("server.health_listen", f"cannot listen on {listen} ({e})") from None
        await self._health_server.start()

    def _services(self) -> tuple[str, ...]:
        """The health-checked service names: the server (""), ext_proc, and the Router API when it is on."""
        return tuple(n for n in HEALTH_SERVICES if n != ROUTER_SERVICE or self.config.server.classify_api)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    async def reload(self) -> bool:
        """Re-read the config file, rebuild config + engine, swap; False (old state kept) when either is bad."""
        async with self._reload_lock:
            if self.config_path is None:
                log.warning("reload_skipped", reason="no_config_file")
                return False
            self._config_mtime = self._mtime()
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
                return await self.reload_config(config)
            except ConfigError as e:
                self._reload_failed(e)
                return False

    async def reload_config(self, config: Config) -> bool:
        """Swap in `config` with freshly loaded models; the old engine closes after the grace period."""
        old = self.app
        try:
            app = await asyncio.to_thread(build_app, config, self.metrics, engine_factory=self.engine_factory,
                                          generation=old.generation + 1)
        except Exception as e:  # whatever a bad config or model does, the old state keeps serving
            self._reload_failed(e)
            return False
        for key in RESTART_ONLY:
            if getattr(config.server, key) != getattr(old.config.server, key):
                log.warning("restart_required", key=f"server.{key}")
        self.apps.swap(app)
        self._retired.append(old)
        self.config = config
        configure_logging(config.logging)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("reloaded", generation=app.generation, models=app.engine.describe())
        self._spawn(self._close_when_idle(old, config.server.grace_period_s))
        return True

    def _reload_failed(self, error: Exception) -> None:
        self.metrics.reloads.labels(result="error").inc()
        if isinstance(error, LOAD_ERRORS):
            fields = {"key": getattr(error, "key", None), "problem": getattr(error, "problem", None) or str(error),
                      "error_type": type(error).__name__}
        else:
            fields = exception_fields(error)
        log.error("reload_failed", generation=self.app.generation, **fields)

    async def _close_when_idle(self, app: App, grace_s: float) -> None:
        """Close a replaced App once no stream holds it, or after the grace period at the latest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.apps.users(app) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("closed_previous", generation=app.generation, streams_left=self.apps.users(app))
        self._retired.remove(app)
        await asyncio.to_thread(app.close)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _mtime(self) -> float | None:
        try:
            return self.config_path.stat().st_mtime if self.config_path else None
        except OSError:
            return None

    async def watch_config(self) -> None:
        """Reload when the config file's mtime changes (polling: no extra dependency, works on every FS)."""
        while True:
            await asyncio.sleep(self.watch_interval_s)
            mtime = self._mtime()
            if mtime is not None and mtime != self._config_mtime:
                self._config_mtime = mtime
                log.info("config_changed", path=str(self.config_path))
                await self.reload()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING first (load balancers move away), streams get the grace period, then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.server.grace_period_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        log.info("draining", grace_s=grace)
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for app in [*self._retired, *([self.app] if self.apps else [])]:
            await asyncio.to_thread(app.close)
        self._retired.clear()
        log.info("stopped")

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads; the config file is watched when configured."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        if self.config.server.watch_config and self.config_path is not None:
            self._spawn(self.watch_config())
        self.signals_ready.set()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()


async def serve(config: Config, *, listen: str | None = None) -> None:
    """``sidecar serve``: start, run until a stop signal, drain."""
    server = SidecarServer(config, listen=listen)
    await server.start()
    with contextlib.suppress(asyncio.CancelledError):
        await server.run()
