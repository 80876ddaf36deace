# The two set-up commands: `make demo` and `make test`. Each creates .venv when it is
# missing, installs the project into it, then runs the demo / the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-dev

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export MLFLOW_DISABLE_TELEMETRY = true
export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

# The embedded default: 4 virtual hospitals on Flower's Simulation Engine, tiny CLIP,
# synthetic demo data (generated into demo-data/ when missing), results in runs/sim-<time>/.
demo: $(STAMP)
	$(BIN)/python simulation/run.py

# Three worker processes, each taking whole test modules (their federations and fixtures stay
# together): the end-to-end federations spend most of their time in Flower's polling sleeps.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 3 --dist loadfile --durations=25

# For development, not CI: everything not marked slow (no federation processes, no simulations).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" --durations=10

clean:
	rm -rf runs demo-data .pytest_cache
