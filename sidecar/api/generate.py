"""Regenerate the Python code for the sidecar's own API from ``proto/``.

    python -m sidecar.api.generate            # rewrite the checked-in files under sidecar/api/
    python -m sidecar.api.generate --out DIR  # write them under DIR instead (the sync test does this)

Output paths mirror the proto paths (``-Iproto``), so the modules import as ``sidecar.api.v1.router_pb2``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("sidecar/api/v1/router.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
COMMAND = "python -m sidecar.api.generate"


def generated_files(root: Path) -> list[Path]:
    """Every file protoc writes for PROTO_FILES, relative to `root`."""
    out = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        out += [root / f"{stem}{suffix}" for suffix in GENERATED_SUFFIXES]
    return out


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run grpc_tools' protoc on PROTO_FILES into `out_dir`; returns the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
