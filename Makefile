# vrp-eval: `make run` (set up + reliability report on the embedded default), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: setup browser run test bench clean

$(BIN)/.vrp-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,leaderboard]"
	touch $@

setup: $(BIN)/.vrp-installed

browser:
	bash scripts/install-browser.sh

run: setup
	$(OFFLINE) $(BIN)/vrp-eval run --output runs/demo

test: setup browser
	$(OFFLINE) $(BIN)/python -m pytest -q

bench: setup
	$(OFFLINE) $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache test-artifacts
