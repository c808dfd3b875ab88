"""The sidecar's own gRPC API, generated from ``proto/`` (regenerate with ``python -m sidecar.api.generate``)."""
