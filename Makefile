# Two commands do all set-up on a fresh machine (each creates .venv and installs what it needs):
#   make quickstart   run the built-in quickstart recipe end to end (data -> ... -> release)
#   make test         run the linters and the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: quickstart test chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@if command -v cmake >/dev/null && command -v c++ >/dev/null; then \
	  echo "llama-cpp-python for the GGUF test: built from source once (about 4 minutes on 2 cores), then cached by pip"; \
	  $(BIN)/pip install -q --disable-pip-version-check -e '.[llamacpp]'; \
	else echo "no C++ toolchain (cmake, c++): the llama.cpp test will be skipped"; fi
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/clearlm run

# The report-rendering test needs Debian's chromium; installed here when running as root with apt.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null; } || \
	  echo "chromium is not installed: the report rendering test will be skipped"

test: $(VENV)/.installed-test chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	CLEARLM_REQUIRE_PEERS=1 $(BIN)/pytest -m "slow or not slow"
