"""Triton attention over a ragged KV layer (each KV head its own number of kept tokens).

Semantics are those of :func:`curdkv.attention.reference.ragged_attention_reference`: the
``q`` newest tail tokens attend to every kept context token of their KV head
and causally to the dense tail.

Decoding is memory-bound: the whole kept cache is read once per step while
there is a single query row per head. With one program per (batch, KV head)
the GPU would run ``B * H_kv`` programs (8 for Llama-3.1-8B at batch 1) on
132 SMs, so the context is cut into splits processed in parallel, each
writing a partial output and its log-sum-exp, merged by a second small
kernel -- the split-K scheme of FlashDecoding (Dao, Haziza, Massa, Sizov,
"Flash-Decoding for long-context inference", 2023). Here each head's kept
context followed by the tail is one sequence, cut into splits of the same
size for every head, so a head keeping 4 tokens occupies one program and a
head keeping 100K tokens occupies many: the work per program stays
balanced whatever the per-head budgets and however long the tail grows.

One program handles all ``G = H / H_kv`` query heads of a GQA group, so the
KV head's keys and values are read once for the group, not ``G`` times; its
rows are (query token, query head) pairs padded to at least 16 so that the
scores and the weighted sum are tensor-core ``tl.dot`` products.

Triton is optional: without it this module still imports and
:func:`triton_available` answers ``False``. On CPU, the kernels run under
Triton's interpreter when ``TRITON_INTERPRET=1`` is set before import.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch

from .common import next_pow2, tl, triton

# Tuned on an H100 (benchmarks/ragged_decode_kernel.py --sweep, Llama-3.1-8B
# decode shapes, bf16). Splits as short as one 64-token block still pay:
# at 8K-32K contexts the step is latency-bound and more parallel programs
# beat the extra partials the merge reads (9.3 us vs 12.3 us with 256).
MIN_TOKENS_PER_SPLIT = 64
# Busy programs per SM that the split size aims at: 4 beat 1-3 at 128K
# (98 us vs 104 us with 2, 126 us with 1, for the 0.5 budget): enough
# memory requests in flight, few enough partials to merge.
PROGRAMS_PER_SM = 4
# Bounds the partial-output buffer and the merge for very skewed budgets.
MAX_SPLITS = 1024


def triton_available() -> bool:
    """Whether Triton could be imported (the kernel also needs CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    return triton is not None


if triton is not None:
    # Defined at module level (not in a factory) because jitted functions
    # resolve the helpers they call through the module's globals.

    @triton.jit
    def _attend_block(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
        # One online-softmax step (base 2; ``qk_scale`` includes log2(e)).
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        qk = tl.where(valid, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row may have seen nothing yet (running max -inf) and be fully
        # masked in this block too (a tail block past its causal limit): the
        # guard keeps -inf - -inf from producing NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PREC)
        return m_new, l_i, acc

    @triton.jit
    def _lengths(ctx_len, t_len, q_len, TailStart, RowActive, b, DEVICE_LENGTHS: tl.constexpr):
        # With DEVICE_LENGTHS the tail is a fixed-capacity buffer: the tokens
        # it holds before this pass's queries are read from TailStart, and a
        # row marked inactive in RowActive (an answer that has ended) reads
        # nothing and writes zeros. A CUDA graph replays the same launch at
        # every decode step while these two change on the device.
        if DEVICE_LENGTHS:
            alive = tl.load(RowActive + b) != 0
            t_len = tl.where(alive, tl.load(TailStart) + q_len, 0)
            ctx_len = tl.where(alive, ctx_len, 0)
        return ctx_len, t_len

    @triton.jit
    def ragged_attn_fwd(
        Q, K, V, TK, TV, Offsets, TailStart, RowActive, Out, PartO, PartL,
        qk_scale,
        stride_qb, stride_qh, stride_qm,
        stride_kn, stride_vn,
        stride_tkb, stride_tkh, stride_tkn,
        stride_tvb, stride_tvh, stride_tvn,
        stride_ob, stride_om, stride_oh,
        H_KV, Q_LEN, T_LEN, CHUNK, NUM_SPLITS,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
        DEVICE_LENGTHS: tl.constexpr,
    ):
        bh = tl.program_id(0)
        m_tile = tl.program_id(1)
        split = tl.program_id(2)
        # Each head is one virtual sequence: its kept context (length L, flat
        # rows seg_start..) followed by the T tail tokens. Splits cut it in
        # CHUNK positions, so a long tail (many generated tokens) is spread
        # over programs like the context instead of serialising on one.
        seg_start = tl.load(Offsets + bh)
        ctx_len = tl.load(Offsets + bh + 1) - seg_start
        b = (bh // H_KV).to(tl.int64)
        ctx_len, T_LEN = _lengths(ctx_len, T_LEN, Q_LEN, TailStart, RowActive, b, DEVICE_LENGTHS)
        lo = split.to(tl.int64) * CHUNK
        hi = tl.minimum(lo + CHUNK, ctx_len + T_LEN)
        # Split 0 always has work (every head keeps >= 1 token); splits past
        # a short head's end do nothing and are never read by the merge.
        if (split > 0) & (lo >= hi):
            return

        h = bh % H_KV
        n_rows = Q_LEN * GROUP
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        # Rows are token-major, (token, head-in-group): a tile covers few
        # consecutive tokens, so the causal limit on the tail stays tight.
        tok = rows // GROUP
        head = h * GROUP + rows % GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM  # all true for power-of-two head dims (constant-folded)
        q = tl.load(
            Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        offs_n = tl.arange(0, BLOCK_N)
        ctx_hi = seg_start + tl.minimum(hi, ctx_len)
        for start in tl.range(seg_start + lo, ctx_hi, BLOCK_N, num_stages=NUM_STAGES):
            n = start + offs_n
            n_ok = n < ctx_hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + n[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(V + n[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            m_i, l_i, acc = _attend_block(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale, DOT_PREC)

        # Tail part of the split: row of token i sees tail tokens j <= T - q + i.
        limit = T_LEN - Q_LEN + tok
        tok_last = tl.minimum((m_tile * BLOCK_M + BLOCK_M - 1) // GROUP, Q_LEN - 1)
        tail_lo = tl.maximum(lo, ctx_len) - ctx_len
        tail_hi = tl.minimum(hi - ctx_len, T_LEN - Q_LEN + tok_last + 1)  # <= 0 when the split ends in the context
        tk_base = TK + b * stride_tkb + h * stride_tkh
        tv_base = TV + b * stride_tvb + h * stride_tvh
        for j0 in range(tail_lo, tail_hi, BLOCK_N):
            j = j0 + offs_n
            j_ok = j < tail_hi
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(tk_base + j[:, None] * stride_tkn + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(tv_base + j[:, None] * stride_tvn + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            visible = j_ok[None, :] & (j[None, :] <= limit[:, None])
            m_i, l_i, acc = _attend_block(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PREC)

        # A row that saw nothing in this split (a split of tail tokens all
        # after its causal limit) has l = 0: it writes zeros and lse = -inf,
        # which the merge weighs by exp2(-inf) = 0.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        out_mask = row_ok[:, None] & d_ok[None, :]
        if SINGLE_SPLIT:
            tl.store(
                Out + b * stride_ob + tok[:, None] * stride_om + head[:, None] * stride_oh + d[None, :],
                out.to(Out.dtype.element_ty), mask=out_mask,
            )
        else:
            # Partials: PartO [B*H_kv, S, rows, D] fp32, PartL [B*H_kv, S, rows] (log2 units).
            part = (bh.to(tl.int64) * NUM_SPLITS + split) * n_rows + rows
            tl.store(PartO + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)
            tl.store(PartL + part, m_i + tl.math.log2(l_safe), mask=row_ok)

    @triton.jit
    def ragged_attn_merge(
        PartO, PartL, Offsets, TailStart, RowActive, Out,
        stride_ob, stride_om, stride_oh,
        H_KV, Q_LEN, T_LEN, CHUNK, NUM_SPLITS,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
        DEVICE_LENGTHS: tl.constexpr,
    ):
        # One program per (KV head, row, slice of the head dim): a decode
        # step has only B * H rows, and one program per row would read all
        # its splits' partials serially on a handful of SMs. Only the splits
        # that the head's length reaches are read, so a 4-token head costs one.
        pid = tl.program_id(0)
        n_rows = Q_LEN * GROUP
        bh = pid // n_rows
        r = pid % n_rows
        b = (bh // H_KV).to(tl.int64)
        h = bh % H_KV
        tok = r // GROUP
        head = h * GROUP + r % GROUP
        ctx_len, T_LEN = _lengths(tl.load(Offsets + bh + 1) - tl.load(Offsets + bh), T_LEN, Q_LEN,
                                  TailStart, RowActive, b, DEVICE_LENGTHS)
        length = ctx_len + T_LEN
        n_used = tl.cdiv(length, CHUNK)

        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        m = tl.full([1], float("-inf"), dtype=tl.float32)
        l = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, n_used, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < n_used
            part = (bh.to(tl.int64) * NUM_SPLITS + s) * n_rows + r
            lse = tl.load(PartL + part, mask=s_ok, other=float("-inf"))
            o = tl.load(PartO + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.math.exp2(lse - m_safe)
            alpha = tl.math.exp2(m - m_safe)
            l = l * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        out = acc / tl.where(l > 0.0, l, 1.0)
        tl.store(Out + b * stride_ob + tok * stride_om + head * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter runs (TRITON_INTERPRET=1 on CPU): small, so splitting is exercised


def default_config(head_dim: int, dtype: torch.dtype, rows: int) -> dict:
    """Tile sizes: ``block_m`` from the rows per GQA group; ``block_n``/stages so two pipelined K/V tiles fit in shared memory."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    elem = torch.finfo(dtype).bits // 8
    block_d = max(16, next_pow2(head_dim))
    block_n = 64 if block_d * elem <= 256 else 32
    return {"block_m": block_m, "block_n": block_n, "num_warps": 4, "num_stages": 2}


def plan_splits(total_tokens: int, max_length: int, m_tiles: int, sm_count: int, block_n: int,
                programs_per_sm: int = PROGRAMS_PER_SM, min_tokens: int = MIN_TOKENS_PER_SPLIT) -> tuple[int, int]:
    """``(tokens per split, number of splits)`` so that about ``programs_per_sm`` busy programs run per SM.

    The split size comes from the *total* kept tokens (not the longest head),
    so the number of non-empty programs is near the target however unevenly
    the budget is spread; the number of splits covers the longest head.
    """
    target = max(1, sm_count * programs_per_sm)
    chunk = max(min_tokens, -(-total_tokens * m_tiles // target), 1)
    chunk = max(chunk, -(-max_length // MAX_SPLITS))
    chunk = -(-chunk // block_n) * block_n
    splits = max(1, -(-max_length // chunk))
    return chunk, splits


class RaggedLayout(Protocol):
    """What the kernel reads of a ragged layer (:class:`curdkv.cache.ragged.RaggedKV` is one): each
    (batch, head) row's kept keys/values flattened, its offsets and lengths, and a dense tail."""

    keys: torch.Tensor  # [sum of lengths, D]
    values: torch.Tensor
    offsets: torch.Tensor  # [B * H_kv + 1] int64, on the device
    lengths: torch.Tensor  # [B, H_kv] int64, on the CPU
    tail_keys: torch.Tensor  # [B, H_kv, t, D]
    tail_values: torch.Tensor
    # Fixed-capacity tails (see curdkv.cache.fixed): t is the capacity, these on the device.
    tail_start: torch.Tensor | None  # [1] int64: tail tokens held before the queries
    active_rows: torch.Tensor | None  # [B] int32: rows still decoding
    num_kv_heads: int
    tail_length: int
    max_length: int


def ragged_attention_triton(query: torch.Tensor, kv: RaggedLayout, scaling: float | None = None, *,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, programs_per_sm: int | None = None,
                            min_tokens_per_split: int | None = None) -> torch.Tensor:
    """Attention of ``query [B, H, q, D]`` over a ragged layer; returns ``[B, q, H, D]`` in the query dtype.

    Same semantics as :func:`curdkv.attention.reference.ragged_attention_reference`. The
    keyword arguments override the tuning defaults (for benchmarks).
    No host-device synchronisation: sizes come from ``kv.lengths`` (CPU).
    With ``kv.tail_start`` set, the tail is a fixed-capacity buffer whose
    filled part and live rows are read on the device, and the grid is sized
    by the capacity: the launch is the same at every decode step, so a CUDA
    graph can replay it.
    """
    if not triton_available():
        raise RuntimeError("ragged_attention_triton needs Triton")
    fwd, merge = ragged_attn_fwd, ragged_attn_merge
    b, n_heads, q_len, d = query.shape
    h_kv = kv.num_kv_heads
    if n_heads % h_kv:
        raise ValueError(f"{n_heads} query heads cannot share {h_kv} KV heads evenly")
    group = n_heads // h_kv
    t = kv.tail_length
    if t < q_len:
        raise ValueError(f"the tail ({t} tokens) must contain the {q_len} query tokens")
    scaling = 1.0 / math.sqrt(d) if scaling is None else scaling

    def last_contiguous(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    query = last_contiguous(query)
    keys, values = last_contiguous(kv.keys), last_contiguous(kv.values)
    tail_k, tail_v = last_contiguous(kv.tail_keys), last_contiguous(kv.tail_values)
    offsets = kv.offsets
    if offsets.dtype != torch.int64 or offsets.device != query.device:
        offsets = offsets.to(device=query.device, dtype=torch.int64)
    tail_start, active_rows = getattr(kv, "tail_start", None), getattr(kv, "active_rows", None)
    device_lengths = tail_start is not None
    if device_lengths and active_rows is None:
        raise ValueError("a fixed-capacity tail needs active_rows beside tail_start")
    if not device_lengths:
        tail_start = active_rows = offsets  # unused

    rows = q_len * group
    cfg = default_config(d, query.dtype, rows)
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    block_m = cfg["block_m"]
    block_d = max(16, next_pow2(d))
    m_tiles = -(-rows // block_m)
    # Sizes of the virtual sequences (context + tail) that the splits cut.
    chunk, splits = plan_splits(
        keys.shape[0] + b * h_kv * t, kv.max_length + t, m_tiles, _sm_count(query.device), block_n,
        programs_per_sm or PROGRAMS_PER_SM, min_tokens_per_split or MIN_TOKENS_PER_SPLIT,
    )

    out = torch.empty(b, q_len, n_heads, d, device=query.device, dtype=query.dtype)
    single = splits == 1
    if single:
        part_o = part_l = out  # unused
    else:
        part_o = torch.empty(b * h_kv, splits, rows, d, device=query.device, dtype=torch.float32)
        part_l = torch.empty(b * h_kv, splits, rows, device=query.device, dtype=torch.float32)
    fwd[(b * h_kv, m_tiles, splits)](
        query, keys, values, tail_k, tail_v, offsets, tail_start, active_rows, out, part_o, part_l,
        scaling * 1.4426950408889634,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), values.stride(0),
        tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h_kv, q_len, t, chunk, splits,
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        SINGLE_SPLIT=single,
        # fp32 inputs get full fp32 products (TF32 would miss a 1e-3 tolerance); the flag only affects fp32.
        DOT_PREC="ieee" if query.dtype == torch.float32 else "tf32", NUM_STAGES=num_stages,
        DEVICE_LENGTHS=device_lengths, num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        block_s = min(128, next_pow2(splits))
        block_dm = min(block_d, 32)
        merge[(b * h_kv * rows, block_d // block_dm)](
            part_o, part_l, offsets, tail_start, active_rows, out,
            out.stride(0), out.stride(1), out.stride(2),
            h_kv, q_len, t, chunk, splits,
            GROUP=group, HEAD_DIM=d, BLOCK_D=block_dm, BLOCK_S=block_s, DEVICE_LENGTHS=device_lengths,
            num_warps=4,
        )
    return out
