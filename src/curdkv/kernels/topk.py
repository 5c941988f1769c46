"""Each head's top-``k`` token positions, in context order, in six short passes.

The PyTorch route (``torch.topk`` then a mask read back in order,
:func:`curdkv.selection.in_context_order`) is about 30 launches per layer:
four radix rounds of three kernels inside ``topk``, its scans and gathers,
a scatter and a stream compaction, plus the passes that raise the protected
tokens. At 128K tokens x 8 heads that is ~0.12 ms of GPU time on an H100,
over a tenth of a CurDKV layer's compression.

Here the scores are mapped to int32 keys whose order is the scores' order
(the float's bits, with the non-sign bits of negative values flipped) and
a radix select over four 8-bit digits finds each head's
``k``-th largest key ``T``: one histogram pass per digit, restricted to
the keys that share the digits found so far. A count pass then records
per program how many keys are above ``T`` and equal to it, and a write
pass emits the kept positions in order: every key above ``T``, and of those
equal to ``T`` the earliest, so ties resolve to the earlier token. The
sinks and the recent window get the largest key inside the passes, so
protecting them costs nothing.
"""

from __future__ import annotations

import torch

from .common import next_pow2, on_kernel_device, tl, triton

# Scores per block of a pass.
BLOCK = 1024
# Bins per digit: four digits of 8 bits. Triton's histogram costs grow with the bins (2048-bin digits
# measured 50-60 us a pass at 128K x 8 heads on an H100).
BINS = 256
# Digits of a 32-bit key.
DIGITS = 4
# Programs in all (a power of two): enough to spread a pass over the GPU at batch 1 with 8 KV heads.
TARGET_PROGRAMS = 256


def topk_supported(scores: torch.Tensor) -> bool:
    """Whether :func:`topk_in_order` takes these scores (Triton and floating-point ``[B, H, N]``)."""
    return triton is not None and scores.dim() == 3 and scores.is_floating_point()


def topk_available(scores: torch.Tensor) -> bool:
    """Whether the kernels are the fast route here: supported scores on CUDA."""
    return on_kernel_device(scores) and topk_supported(scores)


def topk_in_order(scores: torch.Tensor, k: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Positions of each head's ``k`` largest scores, ascending: ``[B, H, N] -> [B, H, k]`` int64.

    The first ``sinks`` and last ``recent`` positions rank above every
    score; among equal scores the earlier position is kept. NaN ranks above
    ``+inf`` (the caller checks for NaN). Runs on CUDA, or on CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``, tests only).
    """
    if not topk_supported(scores):
        raise ValueError(f"scores must be floating-point [B, H, N] with Triton installed, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    b, h, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of scores per head), got {k}")
    rows = b * h
    flat = scores.float().reshape(rows, n).contiguous()
    chunk, programs = _chunks(n, rows)
    hist = torch.zeros(DIGITS, rows, BINS, dtype=torch.int32, device=scores.device)
    counts = torch.empty(rows, programs, 2, dtype=torch.int32, device=scores.device)
    out = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    grid = (rows, programs)
    for digit in range(DIGITS):
        _histogram_kernel[grid](flat, hist, n, k, sinks, recent, CHUNK=chunk, DIGIT=digit, BLOCK=BLOCK, BINS=BINS)
    _count_kernel[grid](flat, hist, counts, n, k, sinks, recent, CHUNK=chunk, BLOCK=BLOCK, BINS=BINS, DIGITS=DIGITS)
    _write_kernel[grid](flat, hist, counts, out, n, k, sinks, recent, CHUNK=chunk, BLOCK=BLOCK, BINS=BINS,
                        DIGITS=DIGITS, MAX_PROGRAMS=TARGET_PROGRAMS)
    return out.reshape(b, h, k)


def _chunks(n: int, rows: int) -> tuple[int, int]:
    """Scores per program and programs per head.

    The chunk is a power-of-two number of blocks and a compile-time
    constant: a fixed trip count (so lengths share a handful of compiled
    variants, and Triton's interpreter can run the loops).
    """
    blocks = triton.cdiv(n, BLOCK)
    programs = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, rows)))
    chunk = next_pow2(triton.cdiv(blocks, programs)) * BLOCK
    return chunk, triton.cdiv(n, chunk)


if triton is not None:

    @triton.jit
    def _keys(scores_ptr, row, offs, n, sinks, recent):
        """int32 keys ordered as the scores, protected positions at the top; out of range at the bottom."""
        inside = offs < n
        x = tl.load(scores_ptr + row.to(tl.int64) * n + offs, mask=inside, other=0.0)
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where((offs < sinks) | (offs >= n - recent), 0x7FFFFFFF, key)
        return key, inside

    @triton.jit
    def _pick(hist_ptr, k, BINS: tl.constexpr):
        """The bin holding the k-th largest key of a histogram, and k's rank within that bin."""
        bins = tl.arange(0, BINS)
        counts = tl.load(hist_ptr + bins)
        at_or_above = tl.sum(counts) - tl.cumsum(counts, 0) + counts
        chosen = tl.sum((at_or_above >= k).to(tl.int32)) - 1
        above = tl.sum(tl.where(bins > chosen, counts, 0))
        return chosen, k - above

    @triton.jit
    def _prefix(hist_ptr, row, rows, k, DIGITS: tl.constexpr, BINS: tl.constexpr):
        """The top ``8 * DIGITS`` bits of the k-th largest key (arithmetic-shifted) and k's rank among the keys
        sharing them, from the first ``DIGITS`` histograms (every program recomputes it: 256-bin scans are cheap)."""
        prefix = 0
        rank = k
        for digit in tl.static_range(DIGITS):
            chosen, rank = _pick(hist_ptr + (digit * rows + row) * BINS, rank, BINS)
            if digit == 0:
                prefix = chosen - BINS // 2  # the top digit carries the sign
            else:
                prefix = (prefix << 8) | chosen
        return prefix, rank

    @triton.jit
    def _histogram_kernel(scores_ptr, hist_ptr, n, k, sinks, recent,
                          CHUNK: tl.constexpr, DIGIT: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)
        rows = tl.num_programs(0)
        prefix, _ = _prefix(hist_ptr, row, rows, k, DIGIT, BINS)
        acc = tl.zeros((BINS,), dtype=tl.int32)
        start = part * CHUNK
        for block in range(0, CHUNK, BLOCK):
            key, inside = _keys(scores_ptr, row, start + block + tl.arange(0, BLOCK), n, sinks, recent)
            if DIGIT == 0:
                digit, member = (key >> 24) + BINS // 2, inside
            else:
                digit = (key >> (24 - 8 * DIGIT)) & (BINS - 1)
                member = inside & ((key >> (32 - 8 * DIGIT)) == prefix)
            acc += tl.histogram(digit, BINS, mask=member)
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_ptr + (DIGIT * rows + row) * BINS + bins, acc, mask=acc > 0)

    @triton.jit
    def _count_kernel(scores_ptr, hist_ptr, counts_ptr, n, k, sinks, recent,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, DIGITS: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)
        threshold, _ = _prefix(hist_ptr, row, tl.num_programs(0), k, DIGITS, BINS)
        above = 0
        equal = 0
        start = part * CHUNK
        for block in range(0, CHUNK, BLOCK):
            key, inside = _keys(scores_ptr, row, start + block + tl.arange(0, BLOCK), n, sinks, recent)
            above += tl.sum((inside & (key > threshold)).to(tl.int32))
            equal += tl.sum((inside & (key == threshold)).to(tl.int32))
        slot = counts_ptr + (row * tl.num_programs(1) + part) * 2
        tl.store(slot, above)
        tl.store(slot + 1, equal)

    @triton.jit
    def _write_kernel(scores_ptr, hist_ptr, counts_ptr, out_ptr, n, k, sinks, recent,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, DIGITS: tl.constexpr,
                      MAX_PROGRAMS: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)
        threshold, ties_kept = _prefix(hist_ptr, row, tl.num_programs(0), k, DIGITS, BINS)
        # What the programs before this one keep: all their keys above T, and ties up to ties_kept.
        before = tl.arange(0, MAX_PROGRAMS)
        slots = counts_ptr + (row * tl.num_programs(1) + before) * 2
        earlier = before < part
        above_before = tl.sum(tl.load(slots, mask=earlier, other=0))
        ties_seen = tl.sum(tl.load(slots + 1, mask=earlier, other=0))
        written = above_before + tl.minimum(ties_seen, ties_kept)
        out = out_ptr + row.to(tl.int64) * k
        start = part * CHUNK
        for block in range(0, CHUNK, BLOCK):
            offs = start + block + tl.arange(0, BLOCK)
            key, inside = _keys(scores_ptr, row, offs, n, sinks, recent)
            tie = inside & (key == threshold)
            tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0) - 1
            keep = (inside & (key > threshold)) | (tie & (tie_rank < ties_kept))
            slot = written + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(out + slot, offs.to(tl.int64), mask=keep)
            ties_seen += tl.sum(tie.to(tl.int32))
            written += tl.sum(keep.to(tl.int32))
