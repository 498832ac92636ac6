# phitune: `make demo` fine-tunes the demo model; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.phitune-installed

.PHONY: setup llamacpp browser lint demo test test-fast bench fullsize clean

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

# Full-size Phi-2 and Phi-3.5-mini (random weights from ../shared/models' real configs) through plan --measure,
# train, merge, chat, compare, serve and export + llama.cpp: bench/fullsize.json, docs/benchmarks.md. About
# 2 h on 2 cores; ~22 GiB of free RAM (a step that does not fit now is skipped and says so), ~30 GiB of
# disk (the built models stay in ~/.cache/phitune/fullsize).
fullsize: setup llamacpp
	$(PY) bench/fullsize.py

clean:
	rm -rf $(VENV) runs .pytest_cache
