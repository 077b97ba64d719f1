# The two commands a fresh machine needs: `make serve` runs nextserve (a router and expert workers
# on a small generated checkpoint, until Ctrl-C), `make test` runs the tests.
# Each one creates or refreshes the virtual environment itself.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CHECKPOINT ?= checkpoints/small
SHARDS ?= 2
TRAINED ?= checkpoints/stdlib

HELM_PYTHON ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python
HELM_VENV ?= .venv-helm

.PHONY: serve test dev clean train

# The venv is rebuilt when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=strict
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

test: dev $(HELM_VENV)/.installed
	$(BIN)/python -m pytest -q

$(CHECKPOINT)/config.json: | dev
	$(BIN)/nextserve checkpoint make --preset small --out $(CHECKPOINT)

serve: dev $(CHECKPOINT)/config.json
	$(BIN)/nextserve up --checkpoint $(CHECKPOINT) --shards $(SHARDS)

# Train the small model that ships with nextserve: about an hour on 2 idle cores (docs/training.md).
train: dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/nextserve train --out $(TRAINED)

clean:
	rm -rf $(VENV) $(HELM_VENV) build *.egg-info checkpoints
