# kubeinfer developer entry points. `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
# The virtual environment lives outside git (reused across clones and CI runs); .venv links to it.
KUBEINFER_CACHE ?= $(HOME)/.cache/kubeinfer
VENV_REAL := $(KUBEINFER_CACHE)/venv
VENV := .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell cat requirements.lock requirements-build.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV_REAL)/.kubeinfer-$(LOCK_HASH)
PYTEST_ARGS ?=

.PHONY: help install serve test test-fast lint model bench bench-smoke bench-serve gpu-check clean s3proxy

help:
	@echo "make serve    start the serving pod on $(HOST):$(PORT) with the built-in model"
	@echo "make test     install what is needed and run the whole suite"
	@echo "make lint     ruff over the Python packages and tests"
	@echo "make model    write the built-in tiny model to .models/"
	@echo "make bench    engine vs sequential/static/transformers CB on one workload (JSON + PNG in bench/results)"
	@echo "make bench-smoke  the same at CI size (< 3 min)"
	@echo "make bench-serve  HTTP load generator against a running server (BENCH_ARGS=--base-url ...)"
	@echo "make gpu-check  on a CUDA machine: cuda tests, GPU bench, SmolLM2 bf16 equality, int8/fp8 quality (one JSON)"
	@echo "make cluster  start the test control plane (.cluster/kubeconfig); REAL_NODE=1 adds a real node; make cluster-down stops it"
	@echo "make images   build the serving and operator images (REGISTRY=..., BASE_IMAGE=...); make push pushes them"

$(STAMP): requirements.lock requirements-build.lock pyproject.toml
	@mkdir -p $(KUBEINFER_CACHE)
	@test -x $(VENV_REAL)/bin/python || $(PYTHON) -m venv $(VENV_REAL)
	$(VENV_REAL)/bin/pip install -q -r requirements-build.lock
	$(VENV_REAL)/bin/pip install -q -r requirements.lock
	@rm -f $(VENV_REAL)/.kubeinfer-*
	@touch $(STAMP)

install: $(STAMP)
	@ln -sfn $(VENV_REAL) $(VENV)
	@# The project itself is installed editable into the shared venv on every run, so it points at this clone.
	@$(VENV_REAL)/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null

serve: install
	$(VENV)/bin/kubeinfer-serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

model: install
	$(PY) -m kubeinfer_serving.models.build_tiny --out .models/tiny-llama

# The e2e tier (tests/e2e) runs the built images on a real node: build them first (cached layers).
# The preparations are independent (venv: network; Go builds: CPU; images: network and disk;
# S3Proxy for the s3:// tests: Maven Central), so they run in parallel.
# A dockerd that `make images` had to start is stopped again afterwards (images/stop-docker.sh).
test:
	@$(MAKE) --no-print-directory -j5 install cluster-bin metrics-bin images s3proxy
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; images/stop-docker.sh; exit $$status

# S3Proxy from Maven Central for the s3:// tests, cached in ~/.cache/kubeinfer/s3proxy-VERSION.
s3proxy:
	@tests/s3/install.sh >/dev/null

lint: install
	$(VENV)/bin/ruff check serving operator tests bench images deploy

bench: install
	$(PY) -m kubeinfer_serving.bench.kubeinfer_bench $(BENCH_ARGS)

bench-smoke: install
	$(PY) -m kubeinfer_serving.bench.kubeinfer_bench --smoke --out-dir bench/results/smoke

bench-serve: install
	$(PY) -m bench.serve_bench $(BENCH_ARGS)

# Everything a lent GPU machine should measure, in under 8 minutes, into bench/results/gpu-check.json
# (kubeinfer_serving/bench/gpu_check.py). Without CUDA it says so and exits 0. GPU_PYTHON=python3
# runs it with any interpreter that has torch, transformers and triton instead of the venv.
gpu-check: $(if $(GPU_PYTHON),,install)
	@PYTHONPATH=$(CURDIR)/serving $(or $(GPU_PYTHON),$(PY)) -m kubeinfer_serving.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf .models .pytest_cache .ruff_cache build *.egg-info

include mk/cluster.mk
include mk/metrics.mk
include mk/images.mk
