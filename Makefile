# The two commands a fresh machine needs: `make serve` runs nextserve (a router and expert workers
# on the shipped trained model in models/stdlib, until Ctrl-C), `make test` runs the tests.
# Each one creates or refreshes the virtual environment itself.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CHECKPOINT ?= models/stdlib
SHARDS ?= 2
TRAINED ?= checkpoints/stdlib

HELM_PYTHON ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python
HELM_VENV ?= .venv-helm

.PHONY: serve test test-deps dev clean constraints train

# The venv is rebuilt when the dependency list or the pinned versions change. The runtime
# dependencies install at the versions the images pin (deploy/constraints.txt), so a new upstream
# release never makes a fresh clone test something other than what ships; to move a pin, upgrade it
# in the venv and run `make constraints`.
$(VENV)/.installed: pyproject.toml deploy/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -c deploy/constraints.txt --config-settings editable_mode=strict
	touch $@

# A strict editable install links files one by one (a lenient one cannot map the
# `operator/` folder, which has no __init__.py so that it never shadows the standard
# library's `operator`), so re-link on every run to pick up new modules.
dev: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict

# helm-sdkpy (Helm's own engine, used to lint and install the chart in tests) needs Python >= 3.12.
$(HELM_VENV)/.installed:
	test -x $(HELM_PYTHON) || { echo "need Python 3.12 at $(HELM_PYTHON) (set HELM_PYTHON)"; exit 1; }
	$(HELM_PYTHON) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install -q helm-sdkpy==0.1.32
	touch $@

# What the tests run for real, from Debian's packages: Prometheus (the metrics test scrapes the router
# and a worker), redis-server (the cache tests, plain and TLS, with certificates made by the openssl
# CLI), curl (the HTTP API's streaming test runs `curl -N` as a user would) and g++ (the fused CPU
# expert kernel, kernels/moe/cpu_fused.cpp, is compiled where it runs).
test-deps:
	@command -v prometheus >/dev/null && command -v redis-server >/dev/null && command -v openssl >/dev/null \
		&& command -v curl >/dev/null && command -v g++ >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus redis-server openssl curl g++ >/dev/null)

test: dev $(HELM_VENV)/.installed test-deps
	$(BIN)/python -m pytest -q

# The versions the images install (deploy/constraints.txt): the runtime dependencies as
# installed here, where the tests run. A test fails while the file is stale.
constraints: dev
	$(BIN)/python deploy/runtime_constraints.py > deploy/constraints.txt

$(CHECKPOINT)/config.json: | dev
	$(BIN)/nextserve checkpoint make --preset small --out $(CHECKPOINT)

serve: dev $(CHECKPOINT)/config.json
	$(BIN)/nextserve up --checkpoint $(CHECKPOINT) --shards $(SHARDS)

# Train the small model that ships with nextserve: about an hour on 2 idle cores (docs/training.md).
train: dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/nextserve train --out $(TRAINED)

clean:
	rm -rf $(VENV) $(HELM_VENV) build *.egg-info checkpoints
