"""Fused element-wise kernels of one decode step (see :mod:`curdkv.runtime.lean_step`).

At batch 1 an 8B model's decode step spends about 4.5 ms in its weight
matrix products and, run as transformers writes it, another 1.7 ms in some
1300 tiny element-wise kernels (RMSNorm alone is six: cast, square, mean,
add, rsqrt, scale) that each cost a few microseconds whatever their size.
These kernels do that work in four launches per layer:

- :func:`add_rmsnorm`: the residual add and the next RMSNorm;
- :func:`rope_store`: RoPE on the queries and keys (after the per-head
  norms of Qwen3, when given) and the write of the new key and value into
  the fixed-capacity tail at the index held on the device;
- :func:`silu_mul`: the gated MLP's ``silu(gate) * up``.

Each rounds to the model's dtype exactly where transformers' modules do
(after the normalisation, after each RoPE product, after the SiLU), so the
results match transformers' to the reductions' summation order. The
``*_reference`` functions are the same computations in PyTorch: the CPU path
and what the kernels are tested against.
"""

from __future__ import annotations

import torch

from .common import next_pow2, on_kernel_device, tl, triton

# ---------------------------------------------------------------------------- references


def add_rmsnorm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """``x += delta`` (in place, in ``x``'s dtype), then transformers' RMSNorm of ``x``: ``[B, N]``."""
    if delta is not None:
        x.add_(delta)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half``: ``[-x2, x1]`` for the halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _head_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_store_reference(q, k, v, cos, sin, tail_k, tail_v, index, q_norm=None, k_norm=None, eps=1e-6):
    """RoPE ``q [B, H, D]`` in place; RoPE ``k [B, H_kv, D]`` and write it and ``v`` at tail slot ``index [1]``.

    ``cos``/``sin``: ``[B, D]`` in the model's dtype; ``tail_k``/``tail_v``
    ``[B, H_kv, capacity, D]``. ``q_norm``/``k_norm``: per-head RMSNorm
    weights ``[D]`` applied first (Qwen3), or ``None``.
    """
    cos, sin = cos[:, None], sin[:, None]
    qn = _head_norm(q, q_norm, eps)
    q.copy_(qn * cos + rotate_half(qn) * sin)
    kn = _head_norm(k, k_norm, eps)
    tail_k.index_copy_(2, index, (kn * cos + rotate_half(kn) * sin)[:, :, None])
    tail_v.index_copy_(2, index, v[:, :, None])


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, Delta, W, Out, N, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * N + cols, mask=ok, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(Delta + row * N + cols, mask=ok, other=0.0).to(tl.float32)).to(
                X.dtype.element_ty)
            tl.store(X + row * N + cols, x, mask=ok)
        h = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
        y = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + row * N + cols, (w * y).to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_head(base, W, c, s, eps, D: tl.constexpr, HAS_NORM: tl.constexpr):
        # One head's vector at ``base``: its per-head RMSNorm (weights W) when HAS_NORM, then RoPE.
        DT = base.dtype.element_ty
        d = tl.arange(0, D)
        partner = (d + D // 2) % D  # rotate_half: x_rot[i] = -x[i + D/2] (first half), x[i - D/2] (second)
        x = tl.load(base + d)
        x_rot = (tl.load(base + partner).to(tl.float32) * tl.where(d < D // 2, -1.0, 1.0)).to(DT)
        if HAS_NORM:
            hf = x.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(hf * hf, 0) / D + eps)
            x = (tl.load(W + d).to(tl.float32) * (hf * rstd).to(DT).to(tl.float32)).to(DT)
            x_rot = (tl.load(W + partner).to(tl.float32) * (x_rot.to(tl.float32) * rstd).to(DT).to(tl.float32)).to(DT)
        a = (x.to(tl.float32) * c).to(DT)
        b = (x_rot.to(tl.float32) * s).to(DT)
        return (a.to(tl.float32) + b.to(tl.float32)).to(DT)

    @triton.jit
    def _rope_store_kernel(Q, K, V, Cos, Sin, TK, TV, Index, QW, KW,
                           stride_tb, stride_th, stride_tn, stride_vb, stride_vh, stride_vn,
                           H, H_KV, eps, D: tl.constexpr, HAS_NORM: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, D)
        c = tl.load(Cos + b * D + d).to(tl.float32)
        s = tl.load(Sin + b * D + d).to(tl.float32)
        if head < H:
            base = Q + (b * H + head) * D
            tl.store(base + d, _rope_head(base, QW, c, s, eps, D, HAS_NORM))
        else:
            j = head - H
            slot = tl.load(Index)
            rotated = _rope_head(K + (b * H_KV + j) * D, KW, c, s, eps, D, HAS_NORM)
            tl.store(TK + b * stride_tb + j * stride_th + slot * stride_tn + d, rotated)
            tl.store(TV + b * stride_vb + j * stride_vh + slot * stride_vn + d, tl.load(V + (b * H_KV + j) * D + d))

    @triton.jit
    def _silu_mul_kernel(G, U, Out, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        g = tl.load(G + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
        u = tl.load(U + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Out + row * N + cols, (act * u).to(Out.dtype.element_ty), mask=ok)


def kernels_apply(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for ``x`` (else the references do)."""
    return triton is not None and on_kernel_device(x)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`add_rmsnorm_reference` in one kernel (contiguous ``[B, N]``)."""
    if not kernels_apply(x):
        return add_rmsnorm_reference(x, delta, weight, eps)
    rows, n = x.shape
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, n, eps,
                                 HAS_DELTA=delta is not None, BLOCK=next_pow2(n), num_warps=8)
    return out


def rope_store(q, k, v, cos, sin, tail_k, tail_v, index, q_norm=None, k_norm=None, eps=1e-6) -> None:
    """:func:`rope_store_reference` in one kernel (contiguous ``q``/``k``/``v``, power-of-two head dim)."""
    d = q.shape[-1]
    if not kernels_apply(q) or d & (d - 1):
        rope_store_reference(q, k, v, cos, sin, tail_k, tail_v, index, q_norm, k_norm, eps)
        return
    b, h, _ = q.shape
    h_kv = k.shape[1]
    norm = q_norm is not None
    _rope_store_kernel[(b, h + h_kv)](
        q, k, v, cos, sin, tail_k, tail_v, index, q_norm if norm else q, k_norm if norm else q,
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2), tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        h, h_kv, eps, D=d, HAS_NORM=norm, num_warps=1,
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul_reference` in one kernel (contiguous ``[B, N]``)."""
    if not kernels_apply(gate):
        return silu_mul_reference(gate, up)
    rows, n = gate.shape
    out = torch.empty_like(gate)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate, up, out, n, BLOCK=block, num_warps=4)
    return out
