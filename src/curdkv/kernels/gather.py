"""The kept rows of K and V, copied in one launch at memory speed.

``torch.gather`` with the index expanded over the head dimension reads an
int64 index for every element it copies and handles K and V in two
launches: 0.44 ms of GPU time for a Llama-3.1-8B layer at 128K tokens and
50% on an H100. Here each program copies a block of rows of one head for
both K and V, reading each row's index once: 0.19 ms
(``benchmarks/compression_overhead.py``).
"""

from __future__ import annotations

import torch

from .common import on_kernel_device, pow2_between, tl, triton

# Rows per program: 64 rows of D = 128 bf16 is 16 KB of K and of V in flight.
BLOCK_ROWS = 64


def gather_supported(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether :func:`gather_kv` takes these tensors (Triton, one dtype, power-of-two head dims)."""
    dims = (keys.shape[-1], values.shape[-1])
    return (
        triton is not None and keys.dtype == values.dtype and keys.device == values.device
        and all(pow2_between(d, 16) for d in dims) and keys.shape[:3] == values.shape[:3]
    )


def gather_available(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel is the fast route here: CUDA tensors it supports."""
    return on_kernel_device(keys) and gather_supported(keys, values)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys[b, h, indices[b, h, i]]`` and the same of ``values``: ``[B, H, N, D] x [B, H, k] -> [B, H, k, D]``.

    Runs on CUDA, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, tests only).
    """
    if not gather_supported(keys, values):
        raise ValueError(
            "gather_kv needs Triton and keys/values of one dtype and device with power-of-two head dims >= 16, "
            f"got keys {keys.dtype} {tuple(keys.shape)}, values {values.dtype} {tuple(values.shape)}"
        )
    b, h, n, dk = keys.shape
    dv = values.shape[-1]
    k = indices.shape[-1]
    keys3, values3 = keys.reshape(b * h, n, dk), values.reshape(b * h, n, dv)
    if keys3.stride(1) != dk or keys3.stride(2) != 1:
        keys3 = keys3.contiguous()
    if values3.stride(1) != dv or values3.stride(2) != 1:
        values3 = values3.contiguous()
    idx = indices.reshape(b * h, k).contiguous()
    out_k = keys.new_empty(b * h, k, dk)
    out_v = values.new_empty(b * h, k, dv)
    if k:
        grid = (b * h, triton.cdiv(k, BLOCK_ROWS))
        _gather_kv_kernel[grid](
            keys3, values3, idx, out_k, out_v, k, keys3.stride(0), values3.stride(0),
            DK=dk, DV=dv, BLOCK=BLOCK_ROWS, num_warps=4,
        )
    return out_k.reshape(b, h, k, dk), out_v.reshape(b, h, k, dv)


if triton is not None:

    @triton.jit
    def _gather_kv_kernel(k_ptr, v_ptr, idx_ptr, out_k_ptr, out_v_ptr, k, stride_kh, stride_vh,
                          DK: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = rows < k
        src = tl.load(idx_ptr + head * k + rows, mask=valid, other=0).to(tl.int64)
        ck, cv = tl.arange(0, DK), tl.arange(0, DV)
        out_rows = (head * k + rows).to(tl.int64)
        kt = tl.load(k_ptr + head * stride_kh + src[:, None] * DK + ck[None, :], mask=valid[:, None])
        tl.store(out_k_ptr + out_rows[:, None] * DK + ck[None, :], kt, mask=valid[:, None])
        vt = tl.load(v_ptr + head * stride_vh + src[:, None] * DV + cv[None, :], mask=valid[:, None])
        tl.store(out_v_ptr + out_rows[:, None] * DV + cv[None, :], vt, mask=valid[:, None])
