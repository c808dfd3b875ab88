"""``sidecar.api.v1``: generated code for ``proto/sidecar/api/v1/router.proto``; do not edit by hand."""
