"""The decode step's matrix-vector products alone: curdkv's GEMV kernels against torch, on Llama-3.1-8B shapes.

For each shape (q/k/v: 4096 -> 4096+1024+1024; gate/up with the SiLU:
4096 -> 2 x 14336; o: 4096 -> 4096; down: 14336 -> 4096) and rows M, the
microseconds of one layer's product(s) by torch (``F.linear`` each, plus
``silu_mul`` for gate/up: what the lean step runs without the kernels) and
by :mod:`curdkv.kernels.gemv`, with the share of the copy bandwidth that
the weight bytes reach. As in a decode step, each timed call reads other
weights (copies adding up to well over the L2) and the calls are replayed
in one CUDA graph, so neither the cache nor the launch from Python counts.

At one row, every block-size configuration in ``--sweep`` is timed too, and
``best`` names the fastest over the four shapes together (one per layer each),
for rows 1 and for 2..16; ``graph_decode.py --gemv-config`` reads it.

    python benchmarks/gemv_micro.py --out results/decode/gemv_micro.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from curdkv.bench.timing import copy_bandwidth
from curdkv.kernels import gemv
from curdkv.kernels.decode_step import silu_mul
from curdkv.report import environment

# name: (K, output sizes, gated)
SHAPES = {"qkv": (4096, (4096, 1024, 1024), False), "gate_up": (4096, (14336, 14336), True),
          "o": (4096, (4096,), False), "down": (14336, (4096,), False)}
# (BLOCK_N, BLOCK_K, num_warps, use_dot); few enough that compiling them all stays near a minute.
ONE_ROW_SWEEP = [(bn, bk, w, False) for bn, bk, w in itertools.product((4, 8, 16), (512, 1024), (4, 8))]
DOT_SWEEP = [(bn, bk, 4, True) for bn, bk in itertools.product((16, 32), (256, 512))]


def weight_sets(k, sizes, dtype, min_bytes):
    """Enough copies of one layer's weights that a pass over them reads ``min_bytes`` (several L2s)."""
    per = k * sum(sizes) * dtype.itemsize
    return [[torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for n in sizes]
            for _ in range(max(2, -(-min_bytes // per)))]


def graph_us(fn, sets, x, replays=10) -> float:
    """Microseconds per call of ``fn(x, weights)``, one call per weight set, replayed in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for ws in sets:  # compiles and warms outside the capture
            fn(x, ws)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for ws in sets:
            fn(x, ws)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * len(sets))


def torch_fn(gated):
    if gated:
        return lambda x, ws: silu_mul(F.linear(x, ws[0]), F.linear(x, ws[1]))
    return lambda x, ws: [F.linear(x, w) for w in ws]


def kernel_fn(gated):
    if gated:
        return lambda x, ws: gemv.gated_gemv(x, ws[0], ws[1])
    return lambda x, ws: gemv.grouped_gemv(x, ws)


def check(gated, x, ws) -> float:
    """Largest difference between the kernel's and torch's result, relative to the largest value."""
    ref, out = torch_fn(gated)(x, ws), kernel_fn(gated)(x, ws)
    ref, out = (torch.cat([t.float().flatten() for t in (r if isinstance(r, list) else [r])]) for r in (ref, out))
    return float((out - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--min-gib", type=float, default=1.0, help="weight bytes one timed pass reads")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--out", default="results/decode/gemv_micro.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels: run it on a CUDA machine")
    dtype = getattr(torch, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    bandwidth = copy_bandwidth(2 * 2**30, torch.device("cuda"))
    default = dict(gemv.CONFIG)
    records, sweep = [], []
    with torch.no_grad():
        for name, (k, sizes, gated) in SHAPES.items():
            sets = weight_sets(k, sizes, dtype, int(args.min_gib * 2**30))
            weight_bytes = k * sum(sizes) * dtype.itemsize
            limit_us = weight_bytes / bandwidth * 1e6
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                torch_us = graph_us(torch_fn(gated), sets, x)
                kernel_us = graph_us(kernel_fn(gated), sets, x)
                record = dict(shape=name, k=k, sizes=list(sizes), gated=gated, rows=m, weight_bytes=weight_bytes,
                              limit_us=limit_us, torch_us=torch_us, kernel_us=kernel_us,
                              torch_bandwidth_share=limit_us / torch_us, kernel_bandwidth_share=limit_us / kernel_us,
                              kernel_config=list(default["one_row" if m == 1 else "rows"]),
                              max_relative_difference=check(gated, x, sets[0]))
                records.append(record)
                print(json.dumps(record), flush=True)
                if not args.sweep or m not in (1, max(rows)):
                    continue
                key = "one_row" if m == 1 else "rows"
                for config in (ONE_ROW_SWEEP + DOT_SWEEP if m == 1 else DOT_SWEEP):
                    gemv.CONFIG[key] = config
                    us = graph_us(kernel_fn(gated), sets, x, replays=5)
                    sweep.append(dict(shape=name, rows=m, config=list(config), kernel_us=us,
                                      kernel_bandwidth_share=limit_us / us))
                gemv.CONFIG.update(default)
            del sets
            torch.cuda.empty_cache()
    best = {}
    for m, key in ((1, "one_row"), (max(rows), "rows")):
        totals = {}
        for s in sweep:
            if s["rows"] == m:
                totals.setdefault(tuple(s["config"]), []).append(s["kernel_us"])
        complete = {c: sum(t) for c, t in totals.items() if len(t) == len(SHAPES)}
        if complete:
            config = min(complete, key=complete.get)
            best[key] = dict(config=list(config), layer_us=complete[config], rows=m,
                             default_layer_us=complete.get(tuple(default[key])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(environment=environment(), settings=vars(args), copy_bandwidth_bytes_per_s=bandwidth,
                                   default_config=default, best=best, records=records, sweep=sweep), indent=1))
    print(json.dumps(dict(best=best)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
