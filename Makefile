# `make quickstart` and `make test` work from a fresh clone: they build .venv, install the pinned
# stack, then run. torch is pinned first so no dependency can pull a CUDA build onto a CPU machine.
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.crucible-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test browser lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

quickstart: $(STAMP)
	$(VENV)/bin/crucible quickstart

# The chat page's browser test (tests/test_serve_web.py) drives a headless Chromium. As root on a
# machine with apt-get (CI), install it when absent (~20 s) and make the test required there.
BROWSER_INSTALL := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo yes)

browser:
ifeq ($(BROWSER_INSTALL),yes)
	@[ -x /usr/bin/chromium ] && [ -e /usr/bin/chromedriver ] || { \
	  echo "installing chromium + chromium-driver for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; }
endif

test: $(STAMP) browser
	$(PY) -m ruff check crucible tests bench
	$(PY) -m ruff format --check crucible tests bench
	$(if $(BROWSER_INSTALL),CRUCIBLE_REQUIRE_BROWSER=1) $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check crucible tests bench

format: $(STAMP)
	$(PY) -m ruff format crucible tests bench
	$(PY) -m ruff check --fix crucible tests bench

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .cache
