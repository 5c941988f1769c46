"""Each key's largest attention probability over many queries, without the M x N matrix.

CurDKV's context-attention budgets score key ``j`` by ``max_i softmax(q_i Kᵀ)_j``
over every context query, no mask. Written plainly (chunks of queries, the
logits materialised and softmaxed in float32) that streams ``M · N``
float32 entries through memory several times per KV head: 363 ms per layer
of a Llama-3.1-8B-shaped model at 32K tokens on an H100, which added 8.4
times the prefill's own time.
Here two passes keep every logit on chip:

1. every program takes a block of queries of one query head and runs over
   all keys of its KV head, keeping a running max and sum of exponentials:
   each query's log-sum-exp;
2. every program takes a block of keys of one KV head, runs over the
   queries of every head in its GQA group, recomputes the logits and keeps
   ``max_i exp(logit - lse_i)`` per key.

Q and K are read again per block instead of the logits being stored, so
the cost is two ``QKᵀ`` products on the tensor cores and memory traffic
that does not grow with ``M · N``. On the same layer shape on an H100: 61
ms at 32K tokens, 286 TFLOP/s, 36% of the bf16 matmul rate measured there
(``benchmarks/peak_attention.py``, ``results/peak_attention.json``). Its
probabilities differ from the torch route's by up to 2% (relative, above
1e-3): that route rounds the logits to bf16, the kernel keeps them in
float32.
"""

from __future__ import annotations

import torch

from .common import HALF_DTYPES, pow2_between, tl, triton

BLOCK_QUERIES = 64
BLOCK_KEYS = 64


def peak_supported(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether :func:`peak_attention` takes these tensors.

    Half precision only (with float32 inputs Triton's dot rounds to TF32,
    less exact than the plain float32 route), one dtype and device, a
    power-of-two head dim in [16, 256], and query heads that share the KV
    heads evenly.
    """
    return (
        triton is not None and queries.dtype in HALF_DTYPES and queries.dtype == keys.dtype
        and queries.device == keys.device and queries.shape[0] == keys.shape[0]
        and queries.shape[-1] == keys.shape[-1] and pow2_between(queries.shape[-1], 16, 256)
        and queries.shape[1] % keys.shape[1] == 0
    )


def peak_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``max`` over the queries of each group of ``softmax(q Kᵀ · scaling)``, no mask; float32 ``[B, H_kv, N]``.

    queries ``[B, H, M, D]``, keys ``[B, H_kv, N, D]``, both bf16 or fp16;
    query head ``h`` reads KV head ``h // (H / H_kv)``. Runs on CUDA, or on
    CPU under Triton's interpreter (``TRITON_INTERPRET=1``, tests only).
    """
    if not peak_supported(queries, keys):
        raise ValueError(
            "peak_attention needs Triton, bf16/fp16 queries and keys of one dtype and device, a power-of-two head dim "
            f"in [16, 256] and H divisible by H_kv, got queries {tuple(queries.shape)} {queries.dtype}, "
            f"keys {tuple(keys.shape)} {keys.dtype}"
        )
    b, h, m, d = queries.shape
    h_kv, n = keys.shape[1], keys.shape[2]
    q = queries.reshape(b * h, m, d).contiguous()
    k = keys.reshape(b * h_kv, n, d).contiguous()
    if m == 0 or n == 0:
        return torch.zeros(b, h_kv, n, device=keys.device, dtype=torch.float32)
    lse = torch.empty(b * h, m, device=keys.device, dtype=torch.float32)
    _query_lse_kernel[(b * h, triton.cdiv(m, BLOCK_QUERIES))](
        q, k, lse, m, n, float(scaling), H=h, H_KV=h_kv, D=d, BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS,
        num_warps=4,
    )
    out = torch.empty(b * h_kv, n, device=keys.device, dtype=torch.float32)
    _key_peak_kernel[(b * h_kv, triton.cdiv(n, BLOCK_KEYS))](
        q, k, lse, out, m, n, float(scaling), G=h // h_kv, D=d, BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS,
        num_warps=4,
    )
    return out.reshape(b, h_kv, n)


if triton is not None:

    @triton.jit
    def _query_lse_kernel(q_ptr, k_ptr, lse_ptr, m, n, scaling, H: tl.constexpr, H_KV: tl.constexpr,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        kv = (bh // H) * H_KV + (bh % H) // (H // H_KV)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, D)
        q = tl.load(q_ptr + (bh * m + rows[:, None]) * D + c[None, :], mask=(rows < m)[:, None], other=0.0)
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kt = tl.load(k_ptr + (kv * n + cols[:, None]) * D + c[None, :], mask=(cols < n)[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(kt)) * scaling
            logits = tl.where((cols < n)[None, :], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
        tl.store(lse_ptr + bh * m + rows, run_max + tl.log(run_sum), mask=rows < m)

    @triton.jit
    def _key_peak_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, m, n, scaling, G: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        kv = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        c = tl.arange(0, D)
        kt = tl.load(k_ptr + (kv * n + cols[:, None]) * D + c[None, :], mask=(cols < n)[:, None], other=0.0)
        peak = tl.zeros((BLOCK_N,), tl.float32)
        for g in range(G):
            head = kv * G + g  # the query heads of KV head kv, batch included: (b * H_kv + j) * G + g
            for start in range(0, m, BLOCK_M):
                rows = start + tl.arange(0, BLOCK_M)
                q = tl.load(q_ptr + (head * m + rows[:, None]) * D + c[None, :], mask=(rows < m)[:, None],
                            other=0.0)
                # Rows past M get lse = +inf: their probabilities are 0 and leave the max alone.
                lse = tl.load(lse_ptr + head * m + rows, mask=rows < m, other=float("inf"))
                p = tl.exp(tl.dot(q, tl.trans(kt)) * scaling - lse[:, None])
                peak = tl.maximum(peak, tl.max(p, axis=0))
        tl.store(out_ptr + kv * n + cols, peak, mask=cols < n)
