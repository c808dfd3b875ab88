"""The stack's configs: the shipped ``deploy/`` files, read and rewritten for one machine. Pure functions on
dicts; nothing here starts a process (that is `sidecar_demo.stack`).

The shipped files are read from ``SIDECAR_DEPLOY_DIR`` when it is set (an installed package: point it at
a copy of ``deploy/``), else from the checkout (``deploy/`` beside this package).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
ROUTE_HEADER = "x-selected-model"
HOST = "127.0.0.1"


class StackError(RuntimeError):
    """The stack cannot start or do what was asked; the message says why."""


def deploy_dir() -> Path:
    """The folder with the shipped envoy.yaml and router.yaml (see the module docstring)."""
    explicit = os.environ.get("SIDECAR_DEPLOY_DIR")
    candidate = Path(explicit) if explicit else Path(__file__).resolve().parents[1] / "deploy"
    if not (candidate / "envoy.yaml").is_file():
        where = "SIDECAR_DEPLOY_DIR" if explicit else "the checkout"
        raise StackError(f"no envoy.yaml in {candidate} ({where}): set SIDECAR_DEPLOY_DIR to a folder with the "
                         "shipped deploy/ files (envoy.yaml, router.yaml)")
    return candidate.resolve()


def _shipped(name: str) -> Path:
    try:
        return deploy_dir() / name
    except StackError:
        return Path("deploy") / name  # the error comes when the stack reads it


ENVOY_CONFIG = _shipped("envoy.yaml")
DEPLOY_DIR = ENVOY_CONFIG.parent
ROUTER_CONFIG = _shipped("router.yaml")
REPO_ROOT = ENVOY_CONFIG.resolve().parent.parent
"""The folder above deploy/: in a checkout, where models/ is too."""


@dataclass(frozen=True)
class EnvoyLayout:
    """What the stack needs to know about an Envoy config: which cluster is the sidecar, which are
    backends, and how ``x-selected-model`` values map to clusters."""

    sidecar_cluster: str
    backend_clusters: tuple[str, ...]
    routes: dict[str, str]
    """x-selected-model value -> cluster."""
    default_cluster: str | None
    """The cluster of the catch-all route (no header match)."""


def envoy_layout(config: Mapping[str, Any]) -> EnvoyLayout:
    """Read the sidecar cluster from the ext_proc filter and the route table from the route config."""
    sidecar_cluster = None
    routes: dict[str, str] = {}
    default_cluster = None
    for hcm in _http_connection_managers(config):
        for http_filter in hcm.get("http_filters", []):
            if http_filter.get("name") == EXT_PROC_FILTER:
                sidecar_cluster = http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        for vhost in hcm.get("route_config", {}).get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                cluster = route.get("route", {}).get("cluster")
                headers = route.get("match", {}).get("headers", [])
                if cluster is None:
                    continue
                if not headers:
                    default_cluster = default_cluster or cluster
                for h in headers:
                    exact = h.get("string_match", {}).get("exact")
                    if h.get("name", "").lower() == ROUTE_HEADER and exact is not None:
                        routes[exact] = cluster
    if sidecar_cluster is None:
        raise StackError(f"the Envoy config has no {EXT_PROC_FILTER} filter with an envoy_grpc cluster")
    clusters = [c["name"] for c in config.get("static_resources", {}).get("clusters", [])]
    backends = tuple(c for c in clusters if c != sidecar_cluster)
    return EnvoyLayout(sidecar_cluster, backends, routes, default_cluster)


def _http_connection_managers(config: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                if network_filter.get("name") == "envoy.filters.network.http_connection_manager":
                    yield network_filter["typed_config"]


def local_envoy_config(config: Mapping[str, Any], endpoints: Mapping[str, tuple[str, int]],
                       host: str = HOST) -> dict[str, Any]:
    """`config` with the admin and every listener on `host` port 0 (Envoy picks; the stack asks it which),
    and every cluster's endpoints replaced by `endpoints[cluster]`. Everything else is kept as is."""
    out = copy.deepcopy(dict(config))
    out.setdefault("admin", {})["address"] = {"socket_address": {"address": host, "port_value": 0}}
    for listener in out.get("static_resources", {}).get("listeners", []):
        listener["address"] = {"socket_address": {"address": host, "port_value": 0}}
    for cluster in out.get("static_resources", {}).get("clusters", []):
        name = cluster["name"]
        if name not in endpoints:
            raise StackError(f"no local address for Envoy cluster '{name}'")
        address, port = endpoints[name]
        socket_address = {"address": address, "port_value": port}
        cluster["load_assignment"] = {
            "cluster_name": cluster.get("load_assignment", {}).get("cluster_name", name),
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": socket_address}}}]}],
        }
    return out


def without_ext_proc(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` without the ext_proc HTTP filter: Envoy routes every request by itself, no sidecar asked."""
    out = copy.deepcopy(dict(config))
    for hcm in _http_connection_managers(out):
        hcm["http_filters"] = [f for f in hcm.get("http_filters", []) if f.get("name") != EXT_PROC_FILTER]
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` merged into `base`: mappings merge key by key, anything else (lists, None) replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_local_path(path: str) -> bool:
    """Model paths that name a directory (absolute or ./, ../); anything else may be a Hub id."""
    return Path(path).is_absolute() or path.startswith(("./", "../", ".\\", "..\\")) or path in (".", "..")


def resolve_model_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Path]:
    """Make local model paths absolute (the derived config lives elsewhere); returns those that are missing."""
    missing = {}
    for key, model in (data.get("models") or {}).items():
        if not isinstance(model, dict) or not isinstance(model.get("path"), str):
            continue
        if not is_local_path(model["path"]):
            continue
        path = (base_dir / model["path"]).resolve()
        model["path"] = str(path)
        if not path.is_dir():
            missing[key] = path
    return missing


