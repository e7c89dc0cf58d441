# Two commands on a fresh machine:  `make demo` (main job) and `make test` (tests).
# Each creates/refreshes the virtual environment in $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# After pip's upgrade: retry interrupted downloads (a CI install once failed on ray's 79 MB wheel
# after pip's default 5 resumes).
PIP := python -m pip install --quiet --retries 10 --resume-retries 20
# The CPU build of torch: `pip install torch` alone would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench mutation gpu-wheels xla-env clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/$(PIP) "$(TORCH_SPEC)"
	$(BIN)/$(PIP) -e '.[test]'
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
	$(BIN)/python benchmarks/bench_loader.py

# Mutation testing of the core math modules (cosmic-ray; hours on 2 cores, not in CI): a score table.
mutation: install
	$(BIN)/python -m pip install --quiet cosmic-ray
	$(BIN)/python benchmarks/mutation.py

# Experimental: a second environment for training through torch_xla (`train.device: xla`; TPU, or
# XLA:CPU with PJRT_DEVICE=CPU). torch_xla pins its torch exactly, so it cannot share $(VENV).
# PyPI's torch 2.9.0 for x86-64 is the CUDA build (several GB); it runs on CPU too.
XLA_VENV ?= .venv-xla
XLA_SPEC ?= torch==2.9.0 torch_xla==2.9.0
xla-env: $(XLA_VENV)/.installed
$(XLA_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(XLA_VENV)/bin/$(PIP) $(XLA_SPEC)
	$(XLA_VENV)/bin/$(PIP) -e '.[test]' $(XLA_SPEC)
	touch $@

# The wheels benchmarks/gpu_checks.sh installs on a lent GPU machine (Python 3.12, no network there):
# what the kernels' tests and benchmarks import beyond the machine's torch and Triton, at this venv's versions.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection pywavelets zstandard
gpu-wheels: install
	mkdir -p .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")

clean:
	rm -rf $(VENV) .c2f build *.egg-info mlruns
