# vrp-eval: `make run` (set up + reliability report on the embedded default), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
LOCK    = requirements.lock
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: setup browser run test bench lock test-unlocked clean

# The locked set: every package the test suite ran with, pinned (see scripts/lock.sh).
$(BIN)/.vrp-installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[test,leaderboard]"
	$(BIN)/python -m pip check
	touch $@

setup: $(BIN)/.vrp-installed

browser:
	bash scripts/install-browser.sh

run: setup
	$(OFFLINE) $(BIN)/vrp-eval run --output runs/demo

test: setup browser
	$(OFFLINE) $(BIN)/python -m pytest -q

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/bench_tracing.py
	$(OFFLINE) $(BIN)/python benchmarks/bench_memory.py

# Re-resolve pyproject's ranges in a fresh venv and rewrite requirements.lock.
lock:
	bash scripts/lock.sh

# The newest releases pyproject allows, in a separate venv (for whoever upgrades the lock).
test-unlocked: browser
	test -x .venv-unlocked/bin/python || $(PYTHON) -m venv .venv-unlocked
	.venv-unlocked/bin/python -m pip install --quiet --upgrade pip
	.venv-unlocked/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test,leaderboard]"
	VRP_UNLOCKED=1 $(OFFLINE) .venv-unlocked/bin/python -m pytest -q

clean:
	rm -rf runs .pytest_cache test-artifacts
