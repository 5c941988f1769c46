"""What every kernel module shares: the optional Triton import and shape helpers."""

from __future__ import annotations

import torch

try:  # Triton is optional: the package runs on CPU machines without it.
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = tl = None

HALF_DTYPES = (torch.bfloat16, torch.float16)


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (x - 1).bit_length())


def pow2_between(x: int, low: int, high: int | None = None) -> bool:
    """Whether ``x`` is a power of two in ``[low, high]`` (no upper bound without ``high``)."""
    return x >= low and (high is None or x <= high) and x & (x - 1) == 0
