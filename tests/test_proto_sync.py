"""The checked-in generated code for the sidecar's own API matches proto/ (and the API behaves as documented)."""

from __future__ import annotations

from pathlib import Path

from sidecar.api import generate


def test_generated_code_matches_proto(tmp_path):
    fresh = generate.generate(tmp_path)
    stale = []
    for new, committed in zip(fresh, generate.generated_files(generate.REPO_ROOT), strict=True):
        if not committed.is_file() or committed.read_bytes() != new.read_bytes():
            stale.append(str(committed.relative_to(generate.REPO_ROOT)))
    assert not stale, (
        f"generated code is out of sync with proto/ ({', '.join(stale)}); run `{generate.COMMAND}` and commit "
        "the result (use the grpcio-tools version the project pins)"
    )


def test_generated_modules_import_under_the_package_path():
    from sidecar.api.v1 import router_pb2, router_pb2_grpc

    assert router_pb2.DESCRIPTOR.package == "sidecar.api.v1"
    assert router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name["Classify"].input_type.name == "ClassifyRequest"
    assert hasattr(router_pb2_grpc, "RouterServicer")


def test_proto_documents_code_point_offsets():
    text = (generate.PROTO_ROOT / generate.PROTO_FILES[0]).read_text()
    assert "Unicode code points" in text


def test_every_proto_file_is_generated():
    on_disk = sorted(str(p.relative_to(generate.PROTO_ROOT)) for p in Path(generate.PROTO_ROOT).rglob("*.proto"))
    assert on_disk == sorted(generate.PROTO_FILES)
