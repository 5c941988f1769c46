"""Decode-step speed of the ragged attention kernel: achieved memory bandwidth vs a plain copy, and vs dense SDPA.

One decode step (q = 1) of one layer with Llama-3.1-8B attention shapes
(B=1, H=32, H_kv=8, D=128, bf16) over a ragged cache whose per-head budgets
differ (two heads keep only 4 tokens, the others split the rest of the
budget with log-normal weights, capped at the context length), at several
context lengths and kept fractions. Decoding reads each kept key and value
once, so the measure is bandwidth: bytes of kept K and V / kernel time,
compared with a plain ``copy_`` of a tensor of the same size on the same
device, counted two ways (read+write bytes / time, and read bytes / time).

Times are GPU times: calls are captured in a CUDA graph (no Python launch
overhead) and rotated over enough copies of the cache to exceed the L2
cache, as in a model where other layers evict it between steps; median of
repeats after warm-up.

    python benchmarks/ragged_decode_kernel.py --out results/ragged_decode_kernel.json
    python benchmarks/ragged_decode_kernel.py --sweep --lengths 131072 --out /tmp/sweep.json   # tuning
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics

import torch
import torch.nn.functional as F

from curdkv.report import environment
from curdkv.kernels.ragged_attention import default_config, plan_splits, ragged_attention_triton, triton_available
from curdkv.cache.ragged import RaggedKV, offsets_from_lengths
from curdkv.report import markdown_table

# Footprint that the rotated copies together exceed, so reads come from HBM, not L2 (50 MiB on H100).
ROTATE_BYTES = 256 * 2**20


def skewed_lengths(n_ctx: int, frac: float, h_kv: int, batch: int, seed: int, tiny: int = 2, sigma: float = 1.5):
    """Per-head lengths ``[B, H_kv]`` summing to the uniform budget per batch element; ``tiny`` heads keep 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    per_head = max(4, round(frac * n_ctx))
    rows = []
    for _ in range(batch):
        budget = per_head * h_kv
        order = torch.randperm(h_kv, generator=g)
        small, big = order[:tiny], order[tiny:]
        lengths = torch.zeros(h_kv, dtype=torch.float64)
        lengths[small] = 4
        weights = torch.exp(sigma * torch.randn(len(big), generator=g, dtype=torch.float64))
        remaining, free = budget - 4 * tiny, torch.ones(len(big), dtype=torch.bool)
        alloc = torch.zeros(len(big), dtype=torch.float64)
        while True:  # water-filling: proportional shares, capped at the context length
            share = remaining * weights * free / (weights * free).sum()
            over = free & (share > n_ctx)
            if not over.any():
                alloc[free] = share[free]
                break
            alloc[over] = n_ctx
            remaining -= n_ctx * int(over.sum())
            free &= ~over
        alloc = alloc.floor().clamp(min=4)
        # Put the rounding remainder on the largest uncapped head.
        deficit = budget - 4 * tiny - alloc.sum()
        room = torch.where(alloc < n_ctx, alloc, torch.full_like(alloc, -1))
        alloc[int(room.argmax())] += deficit
        lengths[big] = alloc
        assert lengths.sum() == budget and lengths.max() <= n_ctx, lengths
        rows.append(lengths.to(torch.int64))
    return torch.stack(rows)


def make_ragged(lengths: torch.Tensor, d: int, tail: int, dtype, device) -> RaggedKV:
    b, h_kv = lengths.shape
    total = int(lengths.sum())
    keys = torch.randn(total, d, dtype=dtype, device=device)
    values = torch.randn(total, d, dtype=dtype, device=device)
    cap = tail + 64  # the tail is a view of a preallocated buffer, as in the cache layer
    tail_k = torch.randn(b, h_kv, cap, d, dtype=dtype, device=device)[:, :, :tail]
    tail_v = torch.randn(b, h_kv, cap, d, dtype=dtype, device=device)[:, :, :tail]
    return RaggedKV(keys, values, offsets_from_lengths(lengths, device), lengths, tail_k, tail_v)


def graph_time(fns, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fns`` (a list of closures, one per rotated copy), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # compiles, and warms the allocator outside capture
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / len(fns))
    del graph
    return statistics.median(times)


def eager_time(fn, repeats: int) -> float:
    """Median seconds per call launched from Python (includes launch overhead when the kernel is short)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    n = 20
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / n)
    return statistics.median(times)


def n_copies(nbytes: int, limit: int = 64) -> int:
    return max(2, min(limit, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def copy_bandwidth(nbytes: int, repeats: int, device) -> dict:
    """A plain ``dst.copy_(src)`` of ``nbytes`` (rotated like the caches): GB/s counting read+write, and read only."""
    k = n_copies(nbytes)
    srcs = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_() for _ in range(k)]
    dsts = [torch.empty_like(s) for s in srcs]
    seconds = graph_time([lambda s=s, d=d: d.copy_(s) for s, d in zip(srcs, dsts)], repeats)
    return {"copy_us": seconds * 1e6, "copy_rw_gbps": 2 * nbytes / seconds / 1e9, "copy_read_gbps": nbytes / seconds / 1e9}


def sdpa_dense(n_heads: int, h_kv: int, kept: int, d: int, dtype, repeats: int, device) -> dict:
    """``F.scaled_dot_product_attention`` over a dense uniform cache with the same number of kept tokens."""
    per = kept * h_kv * d * dtype.itemsize * 2
    k = n_copies(per)
    q = torch.randn(1, n_heads, 1, d, dtype=dtype, device=device)
    caches = [(torch.randn(1, h_kv, kept, d, dtype=dtype, device=device),
               torch.randn(1, h_kv, kept, d, dtype=dtype, device=device)) for _ in range(k)]
    fns = [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True) for kk, vv in caches]
    # Also the usual HF eager-path layout (KV heads repeated to the query heads), which most backends need.
    rep = [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(
        q, kk.repeat_interleave(n_heads // h_kv, 1), vv.repeat_interleave(n_heads // h_kv, 1)) for kk, vv in caches[:2]]
    out = {"sdpa_gqa_us": graph_time(fns, repeats) * 1e6}
    out["sdpa_repeat_kv_us"] = graph_time(rep, repeats) * 1e6
    del caches
    return out


def kernel_time(lengths, args, repeats, device, eager=True, **kw) -> tuple[float, float | None]:
    """(graph seconds per call, eager seconds per call) of the kernel on caches with these per-head lengths."""
    b, h_kv = lengths.shape
    nbytes = int(lengths.sum()) * args.head_dim * 2 * args.dtype.itemsize
    kvs = [make_ragged(lengths, args.head_dim, args.tail, args.dtype, device) for _ in range(n_copies(nbytes))]
    query = torch.randn(b, args.heads, 1, args.head_dim, dtype=args.dtype, device=device)
    seconds = graph_time([lambda kv=kv: ragged_attention_triton(query, kv, **kw) for kv in kvs], repeats)
    eager = eager_time(lambda: ragged_attention_triton(query, kvs[0], **kw), repeats) if eager else None
    del kvs
    return seconds, eager


def sweep_configs(args) -> list[tuple[int, float, dict]]:
    """(context, fraction, kernel overrides) to time: tiles and occupancy at the longest context, split size at short ones."""
    longest, configs = max(args.lengths), []
    for frac in args.fractions:
        for stages, pps in itertools.product((2, 3), (1, 2, 3, 4)):
            configs.append((longest, frac, dict(num_stages=stages, programs_per_sm=pps)))
        for block_n, warps in ((32, 4), (128, 4), (64, 8), (128, 8)):
            configs.append((longest, frac, dict(block_n=block_n, num_warps=warps)))
    for n_ctx in sorted(args.lengths)[:-1]:
        for frac, min_tokens, pps in itertools.product(args.fractions, (64, 128, 256), (2, 4)):
            configs.append((n_ctx, frac, dict(min_tokens_per_split=min_tokens, programs_per_sm=pps)))
    return configs


def sweep(args, device) -> list[dict]:
    """Time kernel configurations (graph time, skewed budgets); the defaults come from such runs."""
    rows = []
    for n_ctx, frac, kw in sweep_configs(args):
        lengths = skewed_lengths(n_ctx, frac, args.kv_heads, args.batch, args.seed)
        nbytes = int(lengths.sum()) * args.head_dim * 2 * args.dtype.itemsize
        try:
            seconds, _ = kernel_time(lengths, args, max(5, args.repeats // 3), device, eager=False, **kw)
        except Exception as exc:  # e.g. shared memory exceeded
            print(f"sweep {n_ctx} {frac} {kw}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        row = {"context": n_ctx, "fraction": frac, **kw, "kernel_us": round(seconds * 1e6, 2),
               "gbps": round(nbytes / seconds / 1e9, 1)}
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tail", type=int, default=64, help="tokens appended since compression (question + generated)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--programs-per-sm", type=int, default=None)
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--num-stages", type=int, default=None)
    parser.add_argument("--min-tokens-per-split", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="also time other kernel configurations")
    parser.add_argument("--sweep-only", action="store_true", help="only the configuration sweep")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not triton_available():
        raise SystemExit("this benchmark needs CUDA and Triton")
    args.dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    kw = {k: v for k, v in dict(block_n=args.block_n, num_warps=args.num_warps, num_stages=args.num_stages,
                                programs_per_sm=args.programs_per_sm,
                                min_tokens_per_split=args.min_tokens_per_split).items() if v is not None}
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    if args.sweep_only:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "sweep": sweep(args, device)}, f, indent=2)
        return
    big_copy = copy_bandwidth(1 << 30, args.repeats, device)
    print(f"1 GiB copy: {big_copy['copy_rw_gbps']:.0f} GB/s read+write, {big_copy['copy_read_gbps']:.0f} GB/s read", flush=True)

    rows = []
    for n_ctx, frac in itertools.product(args.lengths, args.fractions):
        lengths = skewed_lengths(n_ctx, frac, args.kv_heads, args.batch, args.seed)
        kept = int(lengths.sum())
        nbytes = kept * args.head_dim * 2 * args.dtype.itemsize
        cfg = default_config(args.head_dim, args.dtype, args.heads // args.kv_heads)
        plan_kw = {"programs_per_sm": kw.get("programs_per_sm"), "min_tokens": kw.get("min_tokens_per_split")}
        chunk, splits = plan_splits(kept, int(lengths.max()), 1, sm, kw.get("block_n", cfg["block_n"]),
                                    **{k: v for k, v in plan_kw.items() if v is not None})
        seconds, eager = kernel_time(lengths, args, args.repeats, device, **kw)
        uniform = torch.full_like(lengths, kept // (args.batch * args.kv_heads))
        uni_seconds, _ = kernel_time(uniform, args, args.repeats, device, eager=False, **kw)
        copy = copy_bandwidth(nbytes, args.repeats, device)
        gbps = nbytes / seconds / 1e9
        row = {
            "context": n_ctx, "fraction": frac, "kept_tokens": kept,
            "head_lengths": lengths.tolist(), "max_head": int(lengths.max()), "min_head": int(lengths.min()),
            "kv_mb": nbytes / 1e6, "tokens_per_split": chunk, "splits": splits,
            "kernel_us": seconds * 1e6, "kernel_eager_us": eager * 1e6, "gbps": gbps,
            **copy,
            "pct_of_copy_rw": 100 * gbps / copy["copy_rw_gbps"],
            "pct_of_copy_read": 100 * gbps / copy["copy_read_gbps"],
            "uniform_kernel_us": uni_seconds * 1e6, "uniform_gbps": nbytes / uni_seconds / 1e9,
        }
        if not args.no_sdpa:
            row.update(sdpa_dense(args.heads, args.kv_heads, kept // (args.batch * args.kv_heads), args.head_dim,
                                  args.dtype, args.repeats, device))
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "head_lengths"}, flush=True)

    columns = [
        ("context", "context"), ("fraction", "kept"), ("max_head", "max head"), ("min_head", "min head"),
        ("kv_mb", "K+V MB"), ("splits", "splits"), ("kernel_us", "kernel µs"), ("gbps", "GB/s"),
        ("copy_rw_gbps", "copy GB/s (r+w)"), ("pct_of_copy_rw", "% copy r+w"),
        ("copy_read_gbps", "copy GB/s (read)"), ("pct_of_copy_read", "% copy read"),
        ("uniform_kernel_us", "uniform µs"), ("kernel_eager_us", "eager µs"),
        ("sdpa_gqa_us", "sdpa gqa µs"), ("sdpa_repeat_kv_us", "sdpa repeat-kv µs"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    sweep_rows = sweep(args, device) if args.sweep else []
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()}
    settings.update(rotate_bytes=ROTATE_BYTES, sm_count=sm, kernel_overrides=kw,
                    timing="CUDA-graph replay over L2-exceeding rotated copies, median of repeats; "
                           "eager = Python launches, median")
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "settings": settings, "copy_1gib": big_copy,
                   "results": rows, "table": table, "sweep": sweep_rows}, f, indent=2)


if __name__ == "__main__":
    main()
