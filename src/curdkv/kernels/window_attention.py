"""Mean attention of the observation window to each earlier key, without the W x N matrix.

SnapKV-style presses score key ``j`` by ``(1/W) Σ_i softmax_i(q_i Kᵀ)_j``
over the last ``W`` context queries. Written plainly that materialises a
float32 ``[B, H, W, N]`` tensor -- 1 GiB for a Llama-3.1-8B layer at 128K
tokens -- and reads it back three times (softmax, mean, slice): 7 ms per
layer on an H100, 2% of the prefill. Here two passes over K do it:

1. every program takes a range of keys and all ``G x W`` window rows of
   its KV head (the GQA group's query heads), and keeps a running max and
   sum of exponentials per row (causal inside the window); the ranges'
   partial sums are merged into each row's log-sum-exp;
2. every program takes a block of keys before the window, recomputes the
   logits, and writes ``Σ_i exp(logit - lse_i) / W`` for each query head.

K is read twice, the scores written once; nothing of size W x N is stored.
"""

from __future__ import annotations

import torch

from .common import HALF_DTYPES, next_pow2, pow2_between, tl, triton

BLOCK_KEYS = 64
# Key ranges per KV head in pass 1: enough programs to fill an H100 at batch 1 with 8 KV heads.
SPLITS = 32


def window_mean_supported(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether :func:`window_attention_mean` takes these tensors.

    Half precision only: with float32 inputs Triton's dot would round them to
    TF32, less exact than the plain float32 path. Power-of-two window and
    head dim, and at most 512 window rows per GQA group.
    """
    w, d = queries.shape[2], queries.shape[3]
    return (
        triton is not None and queries.dtype in HALF_DTYPES and queries.dtype == keys.dtype
        and queries.device == keys.device and pow2_between(w, 16) and pow2_between(d, 16, 256)
        and queries.shape[1] % keys.shape[1] == 0 and next_pow2(queries.shape[1] // keys.shape[1]) * w <= 512
    )


def window_attention_mean(queries: torch.Tensor, keys: torch.Tensor, scaling: float, upto: int) -> torch.Tensor:
    """``softmax(q Kᵀ · scaling)`` of the window queries, causal, averaged over the window, keys ``[0, upto)``.

    queries: the last ``W`` context queries ``[B, H, W, D]`` (positions ``N - W .. N - 1``);
    keys: ``[B, H_kv, N, D]``. Returns float32 ``[B, H, upto]``. Runs on CUDA,
    or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, tests only).
    """
    if not window_mean_supported(queries, keys):
        raise ValueError(
            "window_attention_mean needs Triton, bf16/fp16 queries and keys of one dtype and device, a power-of-two window "
            f">= 16 and head dim in [16, 256], got queries {tuple(queries.shape)} {queries.dtype}, keys {tuple(keys.shape)}"
        )
    b, h, w, d = queries.shape
    h_kv, n = keys.shape[1], keys.shape[2]
    if not 0 <= upto <= n - w:
        raise ValueError(f"upto must be in [0, N - W] = [0, {n - w}], got {upto}")
    group = h // h_kv
    group_pad = next_pow2(group)
    q = queries.reshape(b * h_kv, group * w, d)
    if group_pad != group:
        q = torch.cat([q, q.new_zeros(b * h_kv, (group_pad - group) * w, d)], dim=1)
    q = q.contiguous()
    k = keys.reshape(b * h_kv, n, d)
    if k.stride(1) != d or k.stride(2) != 1:
        k = k.contiguous()
    rows = group_pad * w
    # Blocks per program, rounded up to a power of two so that the loop's trip count can be a
    # compile-time constant without compiling a kernel for every context length.
    blocks = next_pow2(triton.cdiv(triton.cdiv(n, BLOCK_KEYS), SPLITS))
    splits = triton.cdiv(n, blocks * BLOCK_KEYS)
    part_max = torch.empty(b * h_kv, splits, rows, device=keys.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _row_lse_kernel[(b * h_kv, splits)](
        q, k, part_max, part_sum, n, k.stride(0), float(scaling),
        W=w, ROWS=rows, D=d, BLOCK=BLOCK_KEYS, BLOCKS_PER_SPLIT=blocks, num_warps=8,
    )
    top = part_max.amax(1, keepdim=True)
    lse = (top + (part_sum * torch.exp(part_max - top)).sum(1, keepdim=True).log()).squeeze(1).contiguous()
    out = torch.empty(b * h_kv, group, upto, device=keys.device, dtype=torch.float32)
    if upto:
        _window_mean_kernel[(b * h_kv, triton.cdiv(upto, BLOCK_KEYS))](
            q, k, lse, out, upto, k.stride(0), float(scaling),
            W=w, G=group, G_PAD=group_pad, D=d, BLOCK=BLOCK_KEYS, num_warps=8,
        )
    return out.reshape(b, h, upto)


if triton is not None:

    @triton.jit
    def _row_lse_kernel(q_ptr, k_ptr, max_ptr, sum_ptr, n, stride_kh, scaling, W: tl.constexpr, ROWS: tl.constexpr,
                        D: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        r = tl.arange(0, ROWS)
        c = tl.arange(0, D)
        q = tl.load(q_ptr + head * ROWS * D + r[:, None] * D + c[None, :])
        q_pos = n - W + (r % W)  # window row i of every query head sits at position N - W + i
        run_max = tl.full((ROWS,), float("-inf"), tl.float32)
        run_sum = tl.zeros((ROWS,), tl.float32)
        for i in range(BLOCKS_PER_SPLIT):
            cols = (split * BLOCKS_PER_SPLIT + i) * BLOCK + tl.arange(0, BLOCK)
            kt = tl.load(k_ptr + head * stride_kh + cols[:, None].to(tl.int64) * D + c[None, :],
                         mask=(cols < n)[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(kt)) * scaling
            visible = (cols[None, :] <= q_pos[:, None]) & (cols < n)[None, :]
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            # A row that has seen no visible key yet keeps max -inf; guard exp(-inf - -inf).
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(logits - safe[:, None]), axis=1)
            run_max = new_max
        out = (head * tl.num_programs(1) + split) * ROWS + r
        tl.store(max_ptr + out, run_max)
        tl.store(sum_ptr + out, run_sum)

    @triton.jit
    def _window_mean_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, upto, stride_kh, scaling,
                            W: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                            BLOCK: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        r = tl.arange(0, G_PAD * W)
        c = tl.arange(0, D)
        q = tl.load(q_ptr + head * G_PAD * W * D + r[:, None] * D + c[None, :])
        lse = tl.load(lse_ptr + head * G_PAD * W + r)
        kt = tl.load(k_ptr + head * stride_kh + cols[:, None].to(tl.int64) * D + c[None, :],
                     mask=(cols < upto)[:, None], other=0.0)
        # Keys before the window are visible to every window query: no causal mask here.
        p = tl.exp(tl.dot(q, tl.trans(kt)) * scaling - lse[:, None])
        per_head = tl.sum(tl.reshape(p, (G_PAD, W, BLOCK)), axis=1) / W
        g = tl.arange(0, G_PAD)
        dest = out_ptr + (head * G + g[:, None]) * upto + cols[None, :]
        tl.store(dest, per_head, mask=(g < G)[:, None] & (cols < upto)[None, :])
