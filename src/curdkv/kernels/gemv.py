"""Matrix-vector products of a decode step's few rows, several weights per launch.

At batch 1 a decode step is seven GEMVs per layer, each read once from
memory. Through cuBLAS each is its own launch, and the small ones (k and v
of a GQA model: 1024 x 4096) run too few blocks to reach the memory's
bandwidth. :func:`grouped_gemv` computes ``y_i = x @ W_i.T (+ b_i)`` for up
to three weights of the same input width in one launch, each weight read
where the model holds it (the Parameters stay separate tensors, so nothing
is copied and ``save_pretrained`` is untouched). :func:`gated_gemv` does
the gated MLP's gate and up products and ``silu(gate) * up`` in one launch.

Design: one program per ``BLOCK_N`` output rows of one weight, looping over
the whole input width (no split-K, so no second pass and no atomics: a
launch is idempotent, which CUDA-graph replay and re-runs rely on); the
weights' total rows give thousands of programs (Llama-3.1-8B's q/k/v: 768
of 8 rows), so every multiprocessor keeps many 16-byte loads in flight.
Rows past a weight's end are clamped, not masked, so the weight loads stay
unmasked and vectorised. fp32 accumulation; the result is rounded to the
model's dtype once, where ``F.linear`` rounds.

Two inner loops: for one row (``M = 1``) a multiply-accumulate over a
``[BLOCK_N, BLOCK_K]`` fp32 tile reduced once at the end; for more rows
``tl.dot`` with the rows padded to 16 (tensor cores, so the arithmetic
stays far below the loads whatever ``M``). :data:`CONFIG` holds the block
sizes; ``benchmarks/gemv_micro.py`` times alternatives on the device.
"""

from __future__ import annotations

import torch

from .common import HALF_DTYPES, next_pow2, on_kernel_device, tl, triton

MAX_ROWS = 16  # beyond this cuBLAS's GEMM kernels are the better choice

# (BLOCK_N, BLOCK_K, num_warps, use_dot) for one row and for 2..16 rows; benchmarks may replace them.
CONFIG = {"one_row": (8, 512, 4, False), "rows": (16, 256, 4, True)}

if triton is not None:

    @triton.jit
    def _rows_times_x(W, X, row0, N, K, stride_xm, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr):
        # fp32 [BLOCK_M, BLOCK_N]: rows row0.. of W [N, K] times the M rows of X.
        rn = tl.minimum(row0 + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)  # clamped: unmasked loads
        rk = tl.arange(0, BLOCK_K)
        rm = tl.minimum(tl.arange(0, BLOCK_M), M - 1)  # padding rows repeat the last (never stored)
        w_ptrs = W + rn[:, None] * K + rk[None, :]
        x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
        if USE_DOT:
            acc = _dot_loop(w_ptrs, x_ptrs, rk, K, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        else:
            acc = _fma_loop(w_ptrs, x_ptrs, rk, K, BLOCK_N, BLOCK_K, EVEN_K)
        return acc

    @triton.jit
    def _load_tiles(w_ptrs, x_ptrs, rk, k0, K, EVEN_K: tl.constexpr):
        # The weight and row tiles at k0; masked only where K is not a multiple of the block.
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_ok = (rk + k0 < K)[None, :]
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        return w, x

    @triton.jit
    def _dot_loop(w_ptrs, x_ptrs, rk, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr):
        # Rows padded to BLOCK_M >= 16 for the tensor cores (unmasked, so the row loads vectorise too).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w, x = _load_tiles(w_ptrs, x_ptrs, rk, k0, K, EVEN_K)
            acc = tl.dot(x, tl.trans(w), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _fma_loop(w_ptrs, x_ptrs, rk, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # One row: broadcast over the weight tile, summed over K once after the loop (no per-step shuffles).
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w, x = _load_tiles(w_ptrs, x_ptrs, rk, k0, K, EVEN_K)
            acc += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        return tl.sum(acc, 1)[None, :]

    @triton.jit
    def _one_weight(W, Bias, Y, X, block, N, K, stride_xm, M, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_DOT: tl.constexpr):
        row0 = block * BLOCK_N
        acc = _rows_times_x(W, X, row0, N, K, stride_xm, M, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT)
        rn = row0 + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn < N)[None, :])

    @triton.jit
    def _grouped_gemv_kernel(X, W0, W1, W2, B0, B1, B2, Y0, Y1, Y2, N0, N1, N2, END0, END1, K, stride_xm, M,
                             GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                             USE_DOT: tl.constexpr):
        # Programs [0, END0) take W0's row blocks, [END0, END1) W1's, the rest W2's (branches by GROUPS
        # are resolved when compiling: a launch with fewer weights carries no test for the others).
        pid = tl.program_id(0)
        if GROUPS == 1:
            _one_weight(W0, B0, Y0, X, pid, N0, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT)
        elif GROUPS == 2:
            if pid < END0:
                _one_weight(W0, B0, Y0, X, pid, N0, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                            USE_DOT)
            else:
                _one_weight(W1, B1, Y1, X, pid - END0, N1, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                            EVEN_K, USE_DOT)
        else:
            if pid < END0:
                _one_weight(W0, B0, Y0, X, pid, N0, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                            USE_DOT)
            elif pid < END1:
                _one_weight(W1, B1, Y1, X, pid - END0, N1, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                            EVEN_K, USE_DOT)
            else:
                _one_weight(W2, B2, Y2, X, pid - END1, N2, K, stride_xm, M, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K,
                            EVEN_K, USE_DOT)

    @triton.jit
    def _gated_gemv_kernel(X, WG, WU, BG, BU, Y, N, K, stride_xm, M, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN_K: tl.constexpr, USE_DOT: tl.constexpr):
        row0 = tl.program_id(0) * BLOCK_N
        g = _rows_times_x(WG, X, row0, N, K, stride_xm, M, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT)
        u = _rows_times_x(WU, X, row0, N, K, stride_xm, M, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_DOT)
        rn = row0 + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        if HAS_BIAS:
            g += tl.load(BG + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            u += tl.load(BU + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        # Rounded where transformers rounds: each product, the SiLU, the product of the two.
        DT = Y.dtype.element_ty
        g = g.to(DT).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        out = (act * u.to(DT).to(tl.float32)).to(DT)
        tl.store(Y + rm[:, None] * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn < N)[None, :])


def weights_share_a_launch(weights) -> bool:
    """Whether one launch can read ``weights``: contiguous 2-D half-precision tensors of one dtype, device
    and input width."""
    w0 = weights[0]
    return all(w.dtype == w0.dtype and w.dtype in HALF_DTYPES and w.dim() == 2 and w.shape[1] == w0.shape[1]
               and w.is_contiguous() and w.device == w0.device for w in weights)


def gemv_applies(x: torch.Tensor, weights) -> bool:
    """Whether :func:`grouped_gemv` / :func:`gated_gemv` take ``x [M, K]`` times ``weights`` (else use torch)."""
    weights = list(weights)
    return (triton is not None and on_kernel_device(x) and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS
            and x.dtype in HALF_DTYPES and x.stride(1) == 1
            and (not weights or (weights_share_a_launch(weights) and weights[0].dtype == x.dtype
                                 and weights[0].shape[1] == x.shape[1] and weights[0].device == x.device)))


def _launch_config(rows: int) -> dict:
    block_n, block_k, warps, use_dot = CONFIG["one_row" if rows == 1 else "rows"]
    block_m = max(16, next_pow2(rows)) if use_dot else 1
    if not use_dot and rows > 1:
        raise ValueError("the multiply-accumulate loop takes one row; use_dot is needed for more")
    if use_dot:
        block_n, block_k = max(block_n, 16), max(block_k, 16)  # tl.dot's smallest tile
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, num_warps=warps)


def _biases(biases, count):
    biases = list(biases) if biases is not None else [None] * count
    has = any(b is not None for b in biases)
    if has and not all(b is not None for b in biases):
        raise ValueError("give a bias for every weight or for none")
    return biases, has


def grouped_gemv(x: torch.Tensor, weights, biases=None) -> list[torch.Tensor]:
    """``[x @ W.T + b for W, b in zip(weights, biases)]`` in one launch: 1-3 weights ``[N_i, K]``, ``x [M, K]``.

    The outputs are contiguous ``[M, N_i]`` views of one buffer. On devices or
    dtypes the kernel does not take (:func:`gemv_applies`), ``F.linear``.
    """
    weights = list(weights)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"grouped_gemv takes 1 to 3 weights, got {len(weights)}")
    biases, has_bias = _biases(biases, len(weights))
    if not gemv_applies(x, weights):
        return [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases)]
    m, k = x.shape
    sizes = [w.shape[0] for w in weights]
    flat = torch.empty(m * sum(sizes), dtype=x.dtype, device=x.device)
    outs = [part.view(m, n) for part, n in zip(flat.split([m * n for n in sizes]), sizes)]
    cfg = _launch_config(m)
    blocks = [triton.cdiv(n, cfg["BLOCK_N"]) for n in sizes]
    pad = 3 - len(weights)
    w3, b3, y3, n3 = (weights + weights[:1] * pad, (biases if has_bias else weights) + weights[:1] * pad,
                      outs + outs[:1] * pad, sizes + [1] * pad)
    _grouped_gemv_kernel[(sum(blocks),)](
        x, *w3, *b3, *y3, *n3, blocks[0], sum(blocks[:2]), k, x.stride(0), m,
        GROUPS=len(weights), HAS_BIAS=has_bias, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)
    return outs


def gated_gemv_reference(x, gate, up, gate_bias=None, up_bias=None) -> torch.Tensor:
    from .decode_step import silu_mul_reference

    linear = torch.nn.functional.linear
    return silu_mul_reference(linear(x, gate, gate_bias), linear(x, up, up_bias))


def gated_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_bias=None, up_bias=None) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` ``[M, N]`` in one launch (else :func:`gated_gemv_reference`)."""
    (gate_bias, up_bias), has_bias = _biases([gate_bias, up_bias], 2)
    if not gemv_applies(x, [gate, up]) or gate.shape != up.shape:
        return gated_gemv_reference(x, gate, up, gate_bias, up_bias)
    m, k = x.shape
    n = gate.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = _launch_config(m)
    _gated_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, gate, up, gate_bias if has_bias else gate, up_bias if has_bias else up, out, n, k, x.stride(0), m,
        HAS_BIAS=has_bias, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)
    return out
