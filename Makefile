# Two commands on a fresh machine:  `make demo` (main job) and `make test` (tests).
# Each creates/refreshes the virtual environment in $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: `pip install torch` alone would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench mutation clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/c2f run --config configs/demo.yaml --demo-images 200

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_decomposition.py
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_arsit.py

# Mutation testing of the core math modules (cosmic-ray; hours on 2 cores, not in CI): a score table.
mutation: install
	$(BIN)/python -m pip install --quiet cosmic-ray
	$(BIN)/python benchmarks/mutation.py

clean:
	rm -rf $(VENV) .c2f build *.egg-info mlruns
