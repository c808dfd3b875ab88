"""The local demo: Envoy + the sidecar + mock OpenAI-compatible backends on loopback ports.

``python -m sidecar_demo`` (``make demo``) runs it; `sidecar_demo.stack.Stack` is the reusable part that the
end-to-end tests and the benchmarks start; `sidecar_demo.mock_backend` is the backend every route reaches.
"""
