# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench bench-gpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The whole suite, slow end-to-end tests included (CI runs this).
test: venv
	RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -x -q --durations=15

# Everything but the tests marked slow.
test-fast: venv
	RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -x -q -m "not slow"

demo: venv
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/unibct-ray demo --out runs/demo

# The GPU check on a one-GPU machine (under 8 minutes on one H100): Ray Train, feature
# extraction and prototype refinement against plain torch loops on the same GPU, then the tests
# marked gpu. Without CUDA it stops at once with status 2.
bench-gpu: venv
	RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/unibct-ray bench gpu --json bench_out/gpu.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
