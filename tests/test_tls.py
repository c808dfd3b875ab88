"""TLS (and mutual TLS) on the sidecar's gRPC server, with certificates the tests make with openssl, and the
switches that keep the Classify API and reflection off the port."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.v1 import router_pb2, router_pb2_grpc
from sidecar.errors import ConfigError
from sidecar.server import SidecarServer
from tests.fakes import FakeEngine
from tests.grpc_helpers import make_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2",
            "-subj", f"/CN={name}", cwd=folder)
    return key, cert


def issue(folder: Path, ca: tuple[Path, Path], name: str, *, server: bool) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca`; a server one is valid for `sidecar` (the name Envoy checks),
    localhost and 127.0.0.1."""
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text("subjectAltName=DNS:sidecar,DNS:localhost,IP:127.0.0.1\n" if server
                   else "extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
            cwd=folder)
    openssl("x509", "-req", "-in", csr.name, "-CA", ca[1].name, "-CAkey", ca[0].name, "-CAcreateserial",
            "-out", cert.name, "-days", "2", "-extfile", ext.name, cwd=folder)
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    return {"ca": ca, "other_ca": other_ca, "server": issue(folder, ca, "server", server=True),
            "other_server": issue(folder, other_ca, "other-server", server=True),
            "client": issue(folder, ca, "client", server=False)}


async def started(**server_section) -> SidecarServer:
    config = make_config(server=server_section)
    server = SidecarServer(config, engine_factory=lambda _c, _m: FakeEngine())
    await server.start()
    return server


async def health_check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


async def assert_refused(channel: grpc.aio.Channel) -> None:
    """A health check over `channel` fails (the handshake, or the plaintext, is refused)."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await health_check(channel)


def tls_channel(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                         private_key=client[0].read_bytes() if client else None,
                                         certificate_chain=client[1].read_bytes() if client else None)
    return grpc.aio.secure_channel(f"localhost:{port}", creds)


async def test_with_tls_only_clients_that_trust_the_certificate_get_an_answer(pki):
    key, cert = pki["server"]
    server = await started(tls={"cert_file": str(cert), "key_file": str(key)})
    try:
        async with tls_channel(server.port, pki["ca"][1]) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        await assert_refused(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
        await assert_refused(tls_channel(server.port, pki["other_ca"][1]))
    finally:
        await server.stop(grace_s=0)


async def test_with_mutual_tls_a_client_without_a_certificate_the_ca_signed_is_refused(pki):
    key, cert = pki["server"]
    server = await started(tls={"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(pki["ca"][1])})
    try:
        async with tls_channel(server.port, pki["ca"][1], pki["client"]) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        await assert_refused(tls_channel(server.port, pki["ca"][1]))
    finally:
        await server.stop(grace_s=0)


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(pki, tmp_path):
    live_key, live_cert = tmp_path / "tls.key", tmp_path / "tls.pem"
    shutil.copy(pki["server"][0], live_key)
    shutil.copy(pki["server"][1], live_cert)
    server = await started(tls={"cert_file": str(live_cert), "key_file": str(live_key)})
    try:
        async with tls_channel(server.port, pki["ca"][1]) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        for source, target in ((pki["other_server"][0], live_key), (pki["other_server"][1], live_cert)):
            staged = target.with_suffix(".new")
            shutil.copy(source, staged)
            os.replace(staged, target)  # as a Secret update or cert-manager swaps files: whole, never half
        async with tls_channel(server.port, pki["other_ca"][1]) as rotated:
            assert await health_check(rotated) == health_pb2.HealthCheckResponse.SERVING
        await assert_refused(tls_channel(server.port, pki["ca"][1]))
    finally:
        await server.stop(grace_s=0)


async def test_unreadable_certificate_files_stop_start_up_naming_the_key(tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="server.tls"):
        await started(tls={"cert_file": str(missing), "key_file": str(missing)})


async def test_the_classify_api_and_reflection_can_be_turned_off():
    server = await started(classify_api=False, reflection=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router_pb2_grpc.RouterStub(channel).Classify(router_pb2.ClassifyRequest(text="hi"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace_s=0)


async def test_a_plaintext_health_port_answers_health_checks_and_nothing_else(pki):
    key, cert = pki["server"]
    server = await started(tls={"cert_file": str(cert), "key_file": str(key)}, health_listen="127.0.0.1:0",
                           classify_api=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            assert await health_check(probe) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router_pb2_grpc.RouterStub(probe).Classify(router_pb2.ClassifyRequest(text="hi"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace_s=0)


@pytest.mark.envoy
def test_through_envoy_the_mutual_tls_pair_masks_requests_and_the_hop_refuses_plaintext(pki, tmp_path):
    """deploy/envoy-mtls.yaml + router-mtls.yaml (the Kubernetes default) with certificates made here: a
    request goes Envoy -> sidecar over mutual TLS and reaches the backend masked; a plaintext client of the
    sidecar's port gets nothing."""
    import json
    import urllib.request

    from sidecar_demo.configs import DEPLOY_DIR
    from sidecar_demo.stack import Stack

    certs = tmp_path / "envoy-tls"
    certs.mkdir()
    shutil.copy(pki["client"][1], certs / "tls.crt")
    shutil.copy(pki["client"][0], certs / "tls.key")
    shutil.copy(pki["ca"][1], certs / "ca.crt")
    envoy_config = tmp_path / "envoy-mtls.yaml"
    envoy_config.write_text((DEPLOY_DIR / "envoy-mtls.yaml").read_text().replace("/etc/envoy/tls/", f"{certs}/"))
    tls = {"cert_file": str(pki["server"][1]), "key_file": str(pki["server"][0]), "client_ca_file": str(pki["ca"][1])}
    with Stack(envoy_config=envoy_config, router_config=DEPLOY_DIR / "router-mtls.yaml",
               router_overrides={"server": {"tls": tls}}, ready_timeout_s=180) as stack:
        stack.wait_envoy_sees_sidecar(healthy=True)
        body = json.dumps({"model": "general", "messages": [{"role": "user", "content": "Mail bob@example.com"}]})
        request = urllib.request.Request(stack.url + "/v1/chat/completions", data=body.encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        [got] = stack.received()
        assert b"bob@example.com" not in got.body and b"[EMAIL_ADDRESS]" in got.body
        import grpc as sync_grpc
        from grpc_health.v1 import health_pb2 as h
        from grpc_health.v1 import health_pb2_grpc as g

        with sync_grpc.insecure_channel(stack.sidecar_address) as plain, pytest.raises(sync_grpc.RpcError):
            g.HealthStub(plain).Check(h.HealthCheckRequest(), timeout=3)
