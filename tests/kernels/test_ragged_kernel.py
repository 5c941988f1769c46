"""Ragged attention: the reference against dense masked attention, and the Triton kernel against the reference.

The reference tests run on CPU. The kernel tests run on CUDA, or on CPU
through Triton's interpreter when Triton is installed and
``TRITON_INTERPRET=1`` is set (slow: a reduced set of shapes).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import KERNEL_DEVICE
from curdkv.cache.ragged import RaggedKV, offsets_from_lengths
from curdkv.attention.reference import ragged_attention_reference

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_case(b, h_kv, group, d, q_len, t, lengths, *, dtype=torch.float32, n_ctx=None, cap_extra=5,
              seed=0, device="cpu"):
    """Random dense context ``[B, H_kv, N, D]`` with a keep mask of the given per-head ``lengths``, and its ragged form.

    The tail is a view of a larger capacity buffer (stride along t is D,
    along heads ``cap * D``), as the cache layer stores it; the query is a
    transposed view of a ``[B, q, H, D]`` projection, as attention receives it.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(b, h_kv)
    n_ctx = n_ctx or int(lengths.max())
    keep = torch.zeros(b, h_kv, n_ctx, dtype=torch.bool)
    for i in range(b):
        for j in range(h_kv):
            # Sinks are always kept; the rest of the budget is spread at random.
            n_keep = int(lengths[i, j])
            rest = torch.randperm(n_ctx - 1, generator=g)[: n_keep - 1] + 1
            keep[i, j, 0] = True
            keep[i, j, rest] = True
    assert torch.equal(keep.sum(-1), lengths)
    keys = torch.randn(b, h_kv, n_ctx, d, generator=g).to(dtype)
    values = torch.randn(b, h_kv, n_ctx, d, generator=g).to(dtype)
    cap = t + cap_extra
    tail_k_buf = torch.randn(b, h_kv, cap, d, generator=g).to(dtype)
    tail_v_buf = torch.randn(b, h_kv, cap, d, generator=g).to(dtype)
    query = torch.randn(b, q_len, h_kv * group, d, generator=g).to(dtype).transpose(1, 2)
    tail_k, tail_v = tail_k_buf[:, :, :t], tail_v_buf[:, :, :t]
    kv = RaggedKV(
        keys=keys[keep].to(device), values=values[keep].to(device),
        offsets=offsets_from_lengths(lengths, device), lengths=lengths,
        tail_keys=tail_k.to(device) if device == "cpu" else tail_k_buf.to(device)[:, :, :t],
        tail_values=tail_v.to(device) if device == "cpu" else tail_v_buf.to(device)[:, :, :t],
    )
    dense = dict(keys=keys, values=values, keep=keep, tail_keys=tail_k, tail_values=tail_v)
    return query.to(device), kv, dense


def dense_masked_attention(query, dense, scaling=None):
    """Float64 attention over the full dense context with evicted tokens masked: the ground truth."""
    b, n_heads, q_len, d = query.shape
    h_kv = dense["keys"].shape[1]
    group = n_heads // h_kv
    scaling = 1.0 / math.sqrt(d) if scaling is None else scaling
    t = dense["tail_keys"].shape[2]
    keys = torch.cat([dense["keys"], dense["tail_keys"]], 2).double()
    values = torch.cat([dense["values"], dense["tail_values"]], 2).double()
    causal = torch.ones(q_len, t, dtype=torch.bool).tril(t - q_len)
    mask = torch.cat([dense["keep"][:, :, None].expand(-1, -1, q_len, -1), causal.expand(b, h_kv, -1, -1)], -1)
    q = query.double().reshape(b, h_kv, group, q_len, d)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", q, keys) * scaling
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    out = torch.einsum("bhgqn,bhnd->bhgqd", logits.softmax(-1), values)
    return out.reshape(b, n_heads, q_len, d).transpose(1, 2)


def rel_err(out, truth):
    return float((out.double() - truth.double()).abs().max() / truth.double().abs().max())


# (B, H_kv, group, D, q, t, lengths): GQA 1..8, D 64/128, 4-token heads,
# batch > 1 with different lengths, decode (q=1) and prefill (q>1).
SHAPES = [
    (1, 2, 1, 64, 1, 1, [[37, 5]]),
    (1, 2, 4, 128, 1, 3, [[4, 120]]),
    (2, 2, 2, 64, 3, 7, [[4, 50], [300, 9]]),
    (1, 4, 8, 128, 1, 1, [[4, 4, 200, 17]]),
    (2, 1, 3, 64, 5, 5, [[64], [4]]),
    (1, 2, 4, 128, 16, 20, [[130, 4]]),
    (3, 2, 2, 128, 2, 9, [[1, 6], [77, 4], [4, 250]]),
    (1, 1, 8, 64, 33, 40, [[90]]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"case{i}" for i in range(len(SHAPES))])
def test_reference_matches_dense_masked(shape, dtype):
    b, h_kv, group, d, q_len, t, lengths = shape
    query, kv, dense = make_case(b, h_kv, group, d, q_len, t, lengths, dtype=dtype, seed=len(SHAPES) * d + q_len)
    out = ragged_attention_reference(query, kv)
    assert out.shape == (b, q_len, h_kv * group, d) and out.dtype == dtype
    assert rel_err(out, dense_masked_attention(query, dense)) < TOL[dtype]


def test_reference_random_shapes():
    g = torch.Generator().manual_seed(1)
    for i in range(24):
        b, h_kv = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        group = int(torch.randint(1, 9, (1,), generator=g))
        d = (64, 128)[i % 2]
        q_len = 1 if i % 3 else int(torch.randint(2, 12, (1,), generator=g))
        t = q_len + int(torch.randint(0, 6, (1,), generator=g))
        lengths = torch.randint(1, 160, (b, h_kv), generator=g)
        lengths[lengths > 120] = 4  # a quarter of the heads keep only their sinks
        scaling = 0.05 if i % 4 == 0 else None
        query, kv, dense = make_case(b, h_kv, group, d, q_len, t, lengths, seed=100 + i)
        out = ragged_attention_reference(query, kv, scaling)
        assert rel_err(out, dense_masked_attention(query, dense, scaling)) < 1e-3, (b, h_kv, group, d, q_len, t)


# --- the Triton kernel -----------------------------------------------------



def _kernel(query, kv, scaling=None, **kw):
    from curdkv.kernels.ragged_attention import ragged_attention_triton

    return ragged_attention_triton(query, kv, scaling, **kw)


def check_kernel(shape, dtype, seed=0, scaling=None, **kw):
    b, h_kv, group, d, q_len, t, lengths = shape
    query, kv, _ = make_case(b, h_kv, group, d, q_len, t, lengths, dtype=dtype, seed=seed, device=KERNEL_DEVICE)
    out = _kernel(query, kv, scaling, **kw)
    ref = ragged_attention_reference(query, kv, scaling)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    err = rel_err(out.cpu(), ref.cpu())
    assert err < TOL[dtype], (shape, dtype, err)


def test_import_without_triton():
    import curdkv.kernels.ragged_attention as mod

    assert isinstance(mod.triton_available(), bool)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"case{i}" for i in range(len(SHAPES))])
def test_kernel_matches_reference(shape, dtype):
    if KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 runs on CUDA only (Triton's interpreter computes it wrongly on numpy); run on the GPU machine")
    check_kernel(shape, dtype, seed=7)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_many_splits(dtype):
    """Small splits: long heads span many splits, short heads leave most splits empty (lse = -inf)."""
    if KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 runs on CUDA only (Triton's interpreter computes it wrongly on numpy); run on the GPU machine")
    shape = (2, 2, 4, 64, 1, 2, [[4, 900], [333, 1]])
    check_kernel(shape, dtype, seed=3, programs_per_sm=64, min_tokens_per_split=64, block_n=32)
    shape = (1, 2, 2, 128, 6, 9, [[700, 4]])
    check_kernel(shape, dtype, seed=4, programs_per_sm=64, min_tokens_per_split=64, block_n=32)


@pytest.mark.kernel
@pytest.mark.parametrize("q_len", [1, 40])
def test_kernel_long_tail_split(q_len):
    """A tail longer than a split: it is cut across programs, some of which a row's causal limit hides entirely."""
    shape = (1, 2, 4, 64, q_len, 300, [[4, 150]])
    check_kernel(shape, torch.float32, seed=5, programs_per_sm=64, min_tokens_per_split=64, block_n=32)
    check_kernel(shape, torch.float16, seed=6)


@pytest.mark.kernel
def test_kernel_random_shapes():
    g = torch.Generator().manual_seed(2)
    n_cases = 24 if KERNEL_DEVICE == "cuda" else 4
    for i in range(n_cases):
        b, h_kv = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        group = int(torch.randint(1, 9, (1,), generator=g))
        d = (64, 128, 32, 256)[i % 4] if KERNEL_DEVICE == "cuda" else 64
        q_len = 1 if i % 3 else int(torch.randint(2, 130 if KERNEL_DEVICE == "cuda" else 8, (1,), generator=g))
        t = q_len + int(torch.randint(0, 70, (1,), generator=g))
        hi = 3000 if KERNEL_DEVICE == "cuda" else 200
        lengths = torch.randint(1, hi, (b, h_kv), generator=g)
        lengths[lengths > hi * 3 // 4] = 4
        dtype = (torch.bfloat16, torch.float32, torch.float16)[i % 3] if KERNEL_DEVICE == "cuda" else torch.float32
        check_kernel((b, h_kv, group, d, q_len, t, lengths), dtype, seed=200 + i, scaling=0.07 if i % 5 == 0 else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="long-context shapes run on CUDA only; run on the GPU machine")
def test_kernel_long_skewed_heads():
    """Llama-3.1-8B decode shapes with budgets from 4 tokens to 100K+ tokens per head."""
    lengths = [[4, 131072, 17, 4096, 4, 60000, 300, 9000]]
    b, h_kv, group, d = 1, 8, 4, 128
    g = torch.Generator().manual_seed(5)
    total = sum(lengths[0])
    keys = torch.randn(total, d, generator=g).to(torch.bfloat16).cuda()
    values = torch.randn(total, d, generator=g).to(torch.bfloat16).cuda()
    lens = torch.tensor(lengths)
    tail_k = torch.randn(b, h_kv, 80, d, generator=g).to(torch.bfloat16).cuda()[:, :, :3]
    tail_v = torch.randn(b, h_kv, 80, d, generator=g).to(torch.bfloat16).cuda()[:, :, :3]
    kv = RaggedKV(keys, values, offsets_from_lengths(lens, "cuda"), lens, tail_k, tail_v)
    query = torch.randn(b, h_kv * group, 1, d, generator=g).to(torch.bfloat16).cuda()
    out = _kernel(query, kv)
    ref = ragged_attention_reference(query, kv)
    assert rel_err(out.cpu(), ref.cpu()) < TOL[torch.bfloat16]


def fixed_capacity_case(shape, dtype, seed, inactive=(), device="cpu"):
    """``make_case`` with its tail turned into a fixed-capacity buffer: the whole buffer, its fill on the device."""
    b, h_kv, group, d, q_len, t, lengths = shape
    query, kv, _ = make_case(b, h_kv, group, d, q_len, t, lengths, dtype=dtype, seed=seed, cap_extra=37,
                                 device=device)
    cap = t + 37  # the tail views' storage holds the capacity
    full_k = kv.tail_keys.as_strided((b, h_kv, cap, d), kv.tail_keys.stride())
    full_v = kv.tail_values.as_strided((b, h_kv, cap, d), kv.tail_values.stride())
    active = torch.ones(b, dtype=torch.int32, device=device)
    active[list(inactive)] = 0
    fixed = RaggedKV(keys=kv.keys, values=kv.values, offsets=kv.offsets, lengths=kv.lengths,
                     tail_keys=full_k, tail_values=full_v,
                     tail_start=torch.tensor([t - q_len], device=device), active_rows=active)
    return query, kv, fixed


def test_reference_reads_only_the_filled_part_of_a_fixed_capacity_tail():
    query, kv, fixed = fixed_capacity_case((2, 2, 2, 64, 3, 7, [[4, 50], [300, 9]]), torch.float32, 11, inactive=[1])
    out, plain = ragged_attention_reference(query, fixed), ragged_attention_reference(query, kv)
    assert torch.equal(out[0], plain[0]) and bool((out[1] == 0).all())


@pytest.mark.kernel
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[6], (2, 2, 4, 64, 1, 2, [[4, 900], [333, 1]])],
                         ids=["b1", "b2-prefill", "b3-sinks", "many-splits"])
def test_kernel_over_a_fixed_capacity_tail_matches_the_reference(shape):
    """Tail fill and live rows read on the device, grid sized by the capacity; an inactive row gets zeros."""
    inactive = [shape[0] - 1] if shape[0] > 1 else []
    query, kv, fixed = fixed_capacity_case(shape, torch.float32, 9, inactive, device=KERNEL_DEVICE)
    out = _kernel(query, fixed, programs_per_sm=64, min_tokens_per_split=64, block_n=32)
    ref = ragged_attention_reference(query, fixed)
    assert rel_err(out.cpu(), ref.cpu()) < TOL[torch.float32]
    for row in inactive:
        assert bool((out[row] == 0).all())
    live = [r for r in range(shape[0]) if r not in inactive]
    assert rel_err(out[live].cpu(), _kernel(query, kv)[live].cpu()) < TOL[torch.float32]
