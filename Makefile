# phitune: `make demo` fine-tunes the demo model; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.phitune-installed

.PHONY: setup llamacpp browser lint demo test test-fast bench clean

setup: $(STAMP)

# Rebuilt whenever the pinned requirements or the package metadata change.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# llama.cpp for the export tests: node-llama-cpp's prebuilt linux-x64 CPU binaries (no build scripts run,
# no GPU variants fetched).
LLAMACPP := tools/llamacpp/node_modules/.package-lock.json
llamacpp: $(LLAMACPP)
$(LLAMACPP): tools/llamacpp/package-lock.json
	cd tools/llamacpp && npm ci --ignore-scripts --omit=optional --no-audit --no-fund

demo: setup
	bash examples/demo.sh

# The browser tests drive Debian's chromium (Playwright's own browser download cannot be used here).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: setup llamacpp browser lint
	$(PY) -m pytest -q -ra

lint: setup
	$(PY) -m ruff check src tests bench tools
	$(PY) tools/check_layout.py

test-fast: setup llamacpp browser
	$(PY) -m pytest -q -m "not slow"

# Baselines (TRL) are installed only for the benchmark.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) bench/train_throughput.py
	$(PY) bench/dpo_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
