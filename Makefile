# One place for the commands the README names. Every target installs what it needs into $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# This machine keeps a CPU build of torch 2.13.0 on disk; elsewhere pip fetches it from PyPI.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Policy scanners for deploy/ in a venv of their own: their many dependencies stay out of the project's.
TOOLS ?= .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: install test test-fast policy lint proto proto-check models demo bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

$(TOOLS_STAMP): Makefile
	test -x $(TOOLS)/bin/python || python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q "checkov>=3.2,<4" "kubernetes-validate>=1.31"
	touch $(TOOLS_STAMP)

# deploy/ passes checkov (Kubernetes, kustomize and Dockerfile policies; skips carry their reason in the
# manifest) and kubernetes-validate --strict, or the tests do not run.
policy: $(TOOLS_STAMP)
	$(TOOLS)/bin/checkov -d deploy --quiet --compact --skip-download
	$(TOOLS)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

test: install policy
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: no real Envoy, no training (about 2 minutes); `make test` is what CI runs.
test-fast: install
	$(PY) -m pytest -q -m "not envoy and not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check sidecar trainer tests bench models docs

# Regenerate sidecar/api from proto/ (the generated code is committed; a test checks it is in sync).
proto: install
	$(PY) -m sidecar.api.generate

# Rebuild the bundled default models from ../shared/data (about three hours on 2 quiet CPU cores; resumable),
# then docs/models.md's tables from their new eval_results.json.
models: install
	$(PIP) install -q -e ".[dev,teacher]"
	$(PY) models/build.py
	$(PY) docs/generate.py

# Envoy + sidecar + mock backends on loopback ports, a few requests through them, then everything stops.
# DEMO_ARGS=--keep-running leaves the gateway up; DEMO_ARGS="--models-dir DIR" uses other models.
DEMO_ARGS ?=
demo: install
	$(PY) -m sidecar_demo $(DEMO_ARGS)

# Benchmarks on the bundled models (about 11 minutes on 2 CPU cores): bench/results/*.json, *.png and
# summary.md, then docs/benchmarks.md's tables. Uses wrk when installed (apt-get install wrk), else
# bench/loadgen.py, and counts the request path's instructions when valgrind is installed. The fp32 and PyTorch comparisons need the full builds in
# build/models (`make models`); without them those rows are skipped.
bench: install
	$(PY) bench/inference.py
	$(PY) bench/naive.py
	$(PY) bench/envoy.py
	$(PY) bench/request_path.py --callgrind
	$(PY) bench/long_prompts.py
	$(PY) bench/line_windows.py
	$(PY) bench/pseudonymize.py
	$(PY) bench/report.py
	$(PY) docs/generate.py

# Rewrite the generated tables of docs/models.md and docs/benchmarks.md from models/*/eval_results.json and
# bench/results/*.json. Standard library only, so no install; tests/test_docs.py fails when they are stale.
docs:
	python3 docs/generate.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache build dist *.egg-info
