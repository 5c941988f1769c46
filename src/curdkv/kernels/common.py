"""What every kernel module shares: the optional Triton import and shape helpers."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:  # Triton is optional: the package runs on CPU machines without it.
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = tl = None

HALF_DTYPES = (torch.bfloat16, torch.float16)

# Set inside interpreted_on_cpu(): CPU tensors take the kernel routes too.
_KERNELS_ON_CPU = False


def on_kernel_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the library routes work to its kernels: CUDA, or CPU inside
    :func:`interpreted_on_cpu`. Each caller still checks that its kernel supports the shapes."""
    return t.is_cuda or (_KERNELS_ON_CPU and t.device.type == "cpu")


@contextmanager
def interpreted_on_cpu():
    """Route CPU tensors through the Triton kernels, run by Triton's interpreter.

    For tests: the CUDA routes (kernel choice, the ragged layout, checks
    read back once, the kernels inside a press or a decode step) run on a
    machine without a GPU; only the side stream stays CUDA's. Slow,
    and bfloat16 converts wrongly there; use float16 and small shapes. Needs
    Triton and ``TRITON_INTERPRET=1`` set before Triton is imported.
    """
    global _KERNELS_ON_CPU
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpreted_on_cpu needs Triton installed and TRITON_INTERPRET=1 set before it is "
                           f"imported (Triton {'missing' if triton is None else 'installed'}, "
                           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")
    before, _KERNELS_ON_CPU = _KERNELS_ON_CPU, True
    try:
        yield
    finally:
        _KERNELS_ON_CPU = before


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (x - 1).bit_length())


def pow2_between(x: int, low: int, high: int | None = None) -> bool:
    """Whether ``x`` is a power of two in ``[low, high]`` (no upper bound without ``high``)."""
    return x >= low and (high is None or x <= high) and x & (x - 1) == 0
