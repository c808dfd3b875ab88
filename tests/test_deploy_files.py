"""The deploy files agree with each other and with the code: one port, one name, one model list everywhere.

envoy.yaml, router.yaml, docker-compose.yml, the Dockerfiles and the Kubernetes manifests are written by
hand; these tests catch the drift a reviewer misses (a port changed in one file, a backend added to the
routing table but not to Envoy, a service renamed in compose but not in Envoy's clusters).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from sidecar.config import load_config
from sidecar.mutations import OWNED_HEADERS
from sidecar_demo.configs import envoy_layout
from sidecar_demo.stack import find_envoy

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROUTER = load_config(DEPLOY / "router.yaml")
ENVOY = yaml.safe_load((DEPLOY / "envoy.yaml").read_text(encoding="utf-8"))
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
LAYOUT = envoy_layout(ENVOY)
MTLS_ROUTER = load_config(DEPLOY / "router-mtls.yaml")
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
CONFIG_IN_IMAGE = "/app/deploy/router.yaml"


def k8s(name: str) -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, for one multi-document file under deploy/k8s."""
    docs = yaml.safe_load_all((DEPLOY / "k8s" / name).read_text(encoding="utf-8"))
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


SIDECAR_K8S = k8s("sidecar.yaml")
ENVOY_K8S = k8s("envoy.yaml")


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def hcm() -> dict:
    return ENVOY["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc() -> dict:
    [f] = [f for f in hcm()["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    return f["typed_config"]


def clusters() -> dict[str, dict]:
    return {c["name"]: c for c in ENVOY["static_resources"]["clusters"]}


def endpoints(cluster: dict) -> list[dict]:
    return [lb["endpoint"]["address"]["socket_address"]
            for group in cluster["load_assignment"]["endpoints"] for lb in group["lb_endpoints"]]


def container(manifest: dict) -> dict:
    [c] = manifest["spec"]["template"]["spec"]["containers"]
    return c


def container_ports(manifest: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(manifest)["ports"]}


def exposed(dockerfile: Path) -> set[int]:
    return {int(p) for line in dockerfile.read_text().splitlines() if line.startswith("EXPOSE")
            for p in line.split()[1:]}


def compose_ports(service: str) -> set[int]:
    """Container-side ports a compose service publishes."""
    return {int(str(p).rsplit(":", 1)[1]) for p in COMPOSE["services"][service].get("ports", [])}


def compose_command(service: str) -> list[str]:
    svc = COMPOSE["services"][service]
    return [*svc.get("entrypoint", []), *svc.get("command", [])]


SIDECAR_PORT = port_of(ROUTER.server.listen)
METRICS_PORT = port_of(ROUTER.server.metrics_listen)
BACKENDS = sorted(set(ROUTER.routing.categories.values()) | {ROUTER.routing.default_model})


# --- the files themselves ----------------------------------------------------------------------------------

@pytest.mark.envoy
def test_envoy_yaml_passes_envoys_own_validation():
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(DEPLOY / "envoy.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_router_yaml_loads_with_the_sidecars_own_loader():
    assert ROUTER.routing.default_model == "general" and ROUTER.routing.categories


def test_kustomization_resources_and_config_files_exist():
    for resource in KUSTOMIZATION["resources"]:
        assert (DEPLOY / resource).is_file(), resource
    for generator in KUSTOMIZATION["configMapGenerator"]:
        for file in generator["files"]:
            assert (DEPLOY / file.split("=")[-1]).is_file(), file  # `key=file` names the ConfigMap key


# --- models, routes, clusters, services --------------------------------------------------------------------

def test_every_model_in_router_yaml_has_an_envoy_route_and_cluster():
    named = set(BACKENDS) | set(ROUTER.pii.policies)
    routed = set(LAYOUT.routes) | {LAYOUT.default_cluster}
    assert named <= routed, f"no route for {named - routed}"
    assert {LAYOUT.routes.get(m, LAYOUT.default_cluster) for m in named} <= set(clusters())


def test_every_envoy_route_and_backend_cluster_is_a_router_yaml_model():
    assert set(LAYOUT.routes) <= set(BACKENDS)
    assert set(LAYOUT.routes.values()) | {LAYOUT.default_cluster} == set(LAYOUT.backend_clusters)
    assert LAYOUT.default_cluster == ROUTER.routing.default_model
    assert all(LAYOUT.routes[m] == m for m in LAYOUT.routes), "a route sends a model to another's cluster"


def test_compose_services_are_envoys_cluster_hostnames():
    hosts = {name: {e["address"] for e in endpoints(c)} for name, c in clusters().items()}
    for name, addresses in hosts.items():
        assert addresses <= set(COMPOSE["services"]), f"cluster {name} points at {addresses}"
    assert hosts[LAYOUT.sidecar_cluster] == {"sidecar"}
    assert {k for k, v in SIDECAR_K8S.items() if k[0] == "Service"} == {("Service", "sidecar")}


def test_each_compose_mock_serves_the_model_of_its_service_name_on_the_clusters_port():
    for backend in LAYOUT.backend_clusters:
        command = compose_command(backend)  # the mock image's entrypoint runs the mock (Dockerfile.mock)
        assert command[command.index("--model") + 1] == backend
        [address] = endpoints(clusters()[backend])
        assert int(command[command.index("--port") + 1]) == address["port_value"]
    assert find_spec("sidecar_demo.mock_backend") is not None


def test_compose_envoy_depends_on_the_sidecar_and_every_backend():
    assert set(COMPOSE["services"]["envoy"]["depends_on"]) == {"sidecar", *LAYOUT.backend_clusters}


# --- ports ---------------------------------------------------------------------------------------------------

def test_the_sidecar_grpc_port_is_the_same_everywhere():
    [address] = endpoints(clusters()[LAYOUT.sidecar_cluster])
    deployment = SIDECAR_K8S[("Deployment", "sidecar")]
    service_ports = {p["name"]: p for p in SIDECAR_K8S[("Service", "sidecar")]["spec"]["ports"]}
    probes = [container(deployment)[p]["grpc"]["port"] for p in ("readinessProbe", "livenessProbe")]
    assert address["port_value"] == SIDECAR_PORT
    assert SIDECAR_PORT in compose_ports("sidecar")
    assert all(SIDECAR_PORT in exposed(d) for d in DOCKERFILES)
    assert container_ports(deployment)["grpc"] == service_ports["grpc"]["port"] == SIDECAR_PORT
    assert service_ports["grpc"]["targetPort"] == "grpc"
    health_port = port_of(MTLS_ROUTER.server.health_listen)  # k8s probes speak no TLS: the health-only port
    assert probes == [health_port, health_port] and container_ports(deployment)["health"] == health_port
    healthcheck = [line for line in DOCKERFILES[0].read_text().splitlines() if line.startswith("HEALTHCHECK")]
    assert all(f"127.0.0.1:{SIDECAR_PORT}" in line for line in healthcheck)


def test_the_metrics_port_is_the_same_everywhere():
    deployment = SIDECAR_K8S[("Deployment", "sidecar")]
    service_ports = {p["name"]: p["port"] for p in SIDECAR_K8S[("Service", "sidecar")]["spec"]["ports"]}
    assert METRICS_PORT in compose_ports("sidecar")
    assert all(METRICS_PORT in exposed(d) for d in DOCKERFILES)
    assert container_ports(deployment)["metrics"] == service_ports["metrics"] == METRICS_PORT


def test_envoys_listener_and_admin_ports_match_compose_and_k8s():
    listener = ENVOY["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin = ENVOY["admin"]["address"]["socket_address"]["port_value"]
    ports = container_ports(ENVOY_K8S[("Deployment", "envoy")])
    assert compose_ports("envoy") == {listener}
    assert ports == {"http": listener}  # the admin port is not exposed: it listens on loopback only
    assert ENVOY["admin"]["address"]["socket_address"]["address"] == "127.0.0.1" and admin
    assert container(ENVOY_K8S[("Deployment", "envoy")])["readinessProbe"]["tcpSocket"]["port"] == listener


# --- the sidecar's config inside the images ------------------------------------------------------------------

def test_every_deployment_runs_the_sidecar_on_the_same_config_path():
    assert COMPOSE["services"]["sidecar"]["command"][-1] == CONFIG_IN_IMAGE
    assert f"./router.yaml:{CONFIG_IN_IMAGE}:ro" in COMPOSE["services"]["sidecar"]["volumes"]
    deployment = container(SIDECAR_K8S[("Deployment", "sidecar")])
    assert deployment["args"][-1] == CONFIG_IN_IMAGE
    assert {m["mountPath"] for m in deployment["volumeMounts"]} == {CONFIG_IN_IMAGE, "/tmp", "/etc/sidecar/tls"}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f'CMD ["serve", "--config", "{CONFIG_IN_IMAGE}"]' in text
        assert "COPY models ./models" in text  # router.yaml's ../models/* resolve to /app/models/*


def test_router_yaml_model_paths_point_at_the_bundled_models():
    raw = yaml.safe_load((DEPLOY / "router.yaml").read_text(encoding="utf-8"))
    assert {k: m["path"] for k, m in raw["models"].items()} == {"category": "../models/category",
                                                                "pii": "../models/pii"}


# --- the ext_proc contract -----------------------------------------------------------------------------------

def test_ext_proc_sends_headers_and_the_buffered_body_only():
    mode = ext_proc()["processing_mode"]
    assert mode["request_header_mode"] == "SEND" and mode["request_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SKIP" and mode["response_body_mode"] == "NONE"
    assert ext_proc()["grpc_service"]["envoy_grpc"]["cluster_name"] == LAYOUT.sidecar_cluster


def test_timeouts_and_limits_leave_the_sidecar_room_to_decide():
    seconds = float(ext_proc()["message_timeout"].rstrip("s"))
    buffer_limit = ENVOY["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
    assert ROUTER.failure.max_timeout_ms / 1000 < seconds
    assert ROUTER.failure.timeout_s(buffer_limit) < seconds
    assert float(ext_proc()["grpc_service"]["timeout"].rstrip("s")) > seconds
    assert buffer_limit < ROUTER.server.max_message_bytes
    grace = SIDECAR_K8S[("Deployment", "sidecar")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > ROUTER.server.grace_period_s


def test_failure_modes_of_envoy_and_sidecar_are_both_open_or_both_closed():
    assert ext_proc()["failure_mode_allow"] == (ROUTER.failure.inference == "fail_open")


def test_the_shipped_pair_masks_or_refuses():
    """Nothing unread reaches a backend under the shipped files: Envoy refuses when the sidecar cannot answer,
    the sidecar refuses what it cannot read or decide, and the recognizers run beside the model."""
    assert ext_proc()["failure_mode_allow"] is False
    assert ROUTER.failure.inference == "fail_closed" and ROUTER.failure.bad_body == "reject"
    assert ROUTER.pii.patterns == "always"


AVAILABILITY_ROUTER = {("failure", "inference"): "fail_open", ("failure", "bad_body"): "pass"}


def test_the_availability_first_pair_differs_from_the_shipped_pair_only_in_its_failure_switches():
    shipped = yaml.safe_load((DEPLOY / "router.yaml").read_text(encoding="utf-8"))
    opt_in = yaml.safe_load((DEPLOY / "router-availability-first.yaml").read_text(encoding="utf-8"))
    for (section, key), value in AVAILABILITY_ROUTER.items():
        assert opt_in[section].pop(key) == value
        shipped[section].pop(key)
    assert opt_in == shipped
    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text(encoding="utf-8"))
    envoy_opt_in = yaml.safe_load((DEPLOY / "envoy-availability-first.yaml").read_text(encoding="utf-8"))
    manager = envoy_opt_in["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [opt_in_filter] = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    assert opt_in_filter["typed_config"]["failure_mode_allow"] is True
    opt_in_filter["typed_config"]["failure_mode_allow"] = False
    assert envoy_opt_in == envoy
    load_config(DEPLOY / "router-availability-first.yaml")


def test_envoy_normalises_paths_before_routing_and_the_sidecar_see_them():
    manager = hcm()
    assert manager["normalize_path"] is True and manager["merge_slashes"] is True
    assert manager["path_with_escaped_slashes_action"] == "UNESCAPE_AND_FORWARD"


def test_client_copies_of_the_sidecars_headers_are_removed_before_routing():
    [extension] = hcm()["early_header_mutation_extensions"]
    removed = {m["remove"] for m in extension["typed_config"]["mutations"]}
    assert removed == set(OWNED_HEADERS)


def test_the_access_log_records_the_sidecars_decision():
    fields = hcm()["access_log"][0]["typed_config"]["log_format"]["json_format"]
    logged = {m.group(1).lower() for v in fields.values() for m in re.finditer(r"%REQ\(([^)]+)\)%", v)}
    assert set(OWNED_HEADERS) - {"x-router-confidence"} <= logged
    assert fields["reason"] == "%REQ(X-ROUTER-REASON)%"


def test_requests_refused_for_personal_data_in_the_url_or_a_header_are_logged_without_path_or_request_id():
    normal, withheld = hcm()["access_log"]
    expressions = [log["filter"]["extension_filter"]["typed_config"]["expression"] for log in (normal, withheld)]
    assert expressions[0] == f"!({expressions[1]})" and "pii_in_url" in expressions[1] and "pii_in_header" in expressions[1]
    fields = withheld["typed_config"]["log_format"]["json_format"]
    assert fields.keys() == normal["typed_config"]["log_format"]["json_format"].keys()
    assert not any(":PATH" in v or "X-REQUEST-ID" in v for v in fields.values())


def test_pods_run_as_non_root_on_a_read_only_root_filesystem_without_capabilities_or_a_token():
    for manifests, name in ((SIDECAR_K8S, "sidecar"), (ENVOY_K8S, "envoy")):
        pod = manifests[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = pod["containers"][0]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys() and {"cpu", "memory"} <= c["resources"]["requests"].keys()


def test_only_envoy_reaches_the_sidecar_and_the_sidecar_reaches_nothing():
    policy = SIDECAR_K8S[("NetworkPolicy", "sidecar")]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    grpc_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 50051)
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app": "llm-gateway"}}}]
    assert SIDECAR_K8S[("PodDisruptionBudget", "sidecar")]["spec"]["minAvailable"] == 1


def test_kubernetes_runs_the_mutual_tls_pair_which_differs_from_the_plaintext_pair_only_in_tls():
    """Request bodies never cross the Envoy-sidecar hop in clear in Kubernetes; the -mtls pair is router.yaml
    and envoy.yaml plus the TLS settings, nothing else."""
    generated = {g["name"]: g["files"] for g in KUSTOMIZATION["configMapGenerator"]}
    assert generated == {"sidecar-config": ["router.yaml=router-mtls.yaml"],
                         "envoy-config": ["envoy.yaml=envoy-mtls.yaml"]}
    shipped = yaml.safe_load((DEPLOY / "router.yaml").read_text(encoding="utf-8"))
    mtls = yaml.safe_load((DEPLOY / "router-mtls.yaml").read_text(encoding="utf-8"))
    tls, health = mtls["server"].pop("tls"), mtls["server"].pop("health_listen")
    assert mtls == shipped and tls["client_ca_file"] and health
    envoy_mtls = yaml.safe_load((DEPLOY / "envoy-mtls.yaml").read_text(encoding="utf-8"))
    [sidecar] = [c for c in envoy_mtls["static_resources"]["clusters"] if c["name"] == LAYOUT.sidecar_cluster]
    socket = sidecar.pop("transport_socket")["typed_config"]
    assert socket["common_tls_context"]["tls_certificates"] and socket["common_tls_context"]["validation_context"]
    assert envoy_mtls == ENVOY
    mounts = {m["mountPath"] for m in container(SIDECAR_K8S[("Deployment", "sidecar")])["volumeMounts"]}
    assert {tls["cert_file"].rsplit("/", 1)[0]} <= mounts


def test_serving_imports_no_training_torch_or_test_package():
    """The serving image installs only the core dependencies (deploy/Dockerfile: `pip install .`): the server's
    import graph must not reach for PyTorch, transformers, the trainer or the test tools."""
    code = ("import sys, sidecar.cli, sidecar.server, sidecar.app, sidecar.inference.engine; "
            "print(sorted(m for m in ('torch', 'transformers', 'trainer', 'faker', 'sklearn', 'aiohttp', "
            "'datasets', 'accelerate', 'matplotlib', 'pytest') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_images_install_the_serving_dependencies_only():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "RUN pip install .\n" in text and "[dev]" not in text and "COPY trainer" not in text
        assert "USER 10001" in text and "HEALTHCHECK" in text


def test_the_compose_mocks_run_from_their_own_image_with_nothing_of_the_project_but_the_mock():
    """The serving image has no aiohttp and no demo code; the mock image copies the one file it runs, so
    that file may import the standard library and aiohttp only."""
    import ast
    import sys

    mock = COMPOSE["x-mock"]
    assert mock["build"]["dockerfile"] == "deploy/Dockerfile.mock"
    dockerfile = (DEPLOY / "Dockerfile.mock").read_text()
    assert "COPY sidecar_demo/mock_backend.py" in dockerfile and "USER 10001" in dockerfile
    source = (DEPLOY.parent / "sidecar_demo" / "mock_backend.py").read_text()
    roots = {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert roots - {"__future__", "aiohttp"} <= set(sys.stdlib_module_names)
