"""Compression overhead of one layer, stage by stage, against the memory-bandwidth limit.

Keys/values shaped like one Llama-3.1-8B layer (8 KV heads, head dim 128,
32 query heads, bf16) at ``--tokens`` context tokens, with a few outlier
channels and low-rank structure like real keys. No model is loaded, so it
runs in seconds; ``curdkv bench`` measures the same thing inside a model.

Each time is given twice: ``device`` is the GPU time with the host running
ahead (as inside a prefill, :func:`curdkv.bench.timing.device_seconds`;
host synchronisations count as the idle time they cause) and ``wall`` the
call timed alone, which for many small launches is the host's launch time.
On CUDA, each configuration is also queued on a second stream beside one
layer's causal attention over the same context, as an overlapped prefill
does (:mod:`curdkv.runtime.overlap`): ``added_ms`` is what it adds to the attention.

    python benchmarks/compression_overhead.py --out results/compression_overhead.json
"""

from __future__ import annotations

import argparse
import json
import types

import torch

from curdkv.models import random_config

import curdkv
from curdkv.bench.timing import copy_bandwidth, device_seconds, gpu_time, median_seconds, overlapped_seconds
from curdkv.report import environment
from curdkv.kernels import leverage
from curdkv.presses.base import ScoringView
from curdkv.runtime.layer import compress_layer
from curdkv.cache.gather import gather_kv_tokens, gather_tokens
from curdkv.selection import in_context_order, kept_count, protect, select_uniform


# One Llama-3.1-8B layer at batch 1: batch, KV heads, query heads, head size.
LAYER_SHAPE = (1, 8, 32, 128)


def llama_layer(n: int, device: torch.device):
    """Keys, values (bf16), the last 64 queries and a module stand-in of one Llama-3.1-8B layer over ``n`` tokens."""
    b, h_kv, h, d = LAYER_SHAPE
    keys, values = states(b, h_kv, n, d, torch.bfloat16, device), states(b, h_kv, n, d, torch.bfloat16, device, 1)
    queries = states(b, h, 64, d, torch.bfloat16, device, 2)
    config = random_config("llama-3.1-8b")  # its RoPE, which CurDKV's default undoes
    return keys, values, queries, types.SimpleNamespace(scaling=d**-0.5, layer_idx=0, config=config)


def states(b, h_kv, n, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, h_kv, n, 16, generator=gen, device=device) @ torch.randn(16, d, generator=gen, device=device)
    x = x + 0.1 * torch.randn(b, h_kv, n, d, generator=gen, device=device)
    x[..., :4] *= 20
    return x.to(dtype)


def beside_attention(keys, values, queries, module, device, args, alone: list[dict]) -> list[dict]:
    """Compression queued on a second stream beside compute-bound attention (as in an overlapped prefill).

    The attention is that of the last ``--beside-queries`` tokens over the
    whole context (tens of milliseconds of tensor-core work, far longer than
    the compression); ``added_ms`` is what the compression adds to it
    (:func:`curdkv.bench.timing.overlapped_seconds`). ``alone``: the rows
    already timed for each configuration on its own.
    """
    b, h_kv, n, d = keys.shape
    q = states(b, queries.shape[1], args.beside_queries, d, keys.dtype, device, 3)
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    attention = device_seconds(attend, device, args.repeats, host_seconds=median_seconds(attend, device, 3))
    rows = []
    for row in alone:
        if row["method"] not in args.beside_methods.split(","):
            continue
        method, ratio, alone_ms = row["method"], row["compression_ratio"], row["overhead_ms"]
        p = curdkv.get_press(method, ratio)
        window = queries[:, :, -p.query_window:] if p.query_window else None
        added_ms = 1000 * overlapped_seconds(
            lambda problems: compress_layer(p, keys, values, window, module, 0, problems=problems),
            attend, device, args.beside_rounds,
        )
        rows.append(dict(method=method, compression_ratio=ratio, attention_ms=attention * 1000,
                         compression_alone_ms=alone_ms, added_ms=added_ms, hidden_fraction=1 - added_ms / alone_ms))
        print(f"{method:14s} {ratio:.0%} beside attention ({attention * 1000:.1f} ms): adds {added_ms:6.3f} ms "
              f"of its {alone_ms:.3f} ms ({1 - added_ms / alone_ms:.0%} hidden)", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--ratios", default="0.5,0.9")
    parser.add_argument("--methods", default="curdkv,curdkv-sketch,adacurdkv,snapkv,knorm")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--beside-methods", default="curdkv,curdkv-sketch,adacurdkv,snapkv")
    parser.add_argument("--beside-queries", type=int, default=8192)
    parser.add_argument("--beside-rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error(f"--device must be a CUDA device (its stages call the Triton kernels directly), got {args.device}")
    b, h_kv, h, d, n = *LAYER_SHAPE, args.tokens
    keys, values, queries, module = llama_layer(n, device)
    layer_bytes = 2 * keys.numel() * keys.element_size()
    bandwidth = copy_bandwidth(layer_bytes, device)
    limit_ms = layer_bytes / bandwidth * 1000

    def ms(fn):
        wall = median_seconds(fn, device, args.repeats, warmup=2)
        gpu = gpu_time(fn, device, args.repeats, host_seconds=wall)
        # host_behind > 0: some repeats include the host's launches or waits (see gpu_time).
        return dict(device=gpu.seconds * 1000, wall=wall * 1000, host_behind=gpu.host_behind)

    stages = {}
    grams = torch.stack([leverage.gram(keys), leverage.gram(values)])
    w = leverage.whitening(grams)
    hi, lo = leverage.split_terms(w, keys.dtype)
    stages["gram (K)"] = ms(lambda: leverage.gram(keys))
    stages["whitening K and V, host status check"] = ms(lambda: leverage.whitening(grams))
    stages["whitening K and V, no host sync"] = ms(lambda: leverage.whitening_without_sync(grams))
    partials = torch.stack([leverage.gram_partials(keys), leverage.gram_partials(values)]).flatten(0, 1)
    stages["whitening K and V, fused steps (the default)"] = ms(lambda: leverage.whitening_terms(partials, keys.dtype))
    def one_factorisation():
        g, scale = leverage._scaled(grams, 1e-6)
        chol, _ = torch.linalg.cholesky_ex(g)
        return scale.unsqueeze(-1) * leverage._inverse_transpose(chol)

    stages["whitening K and V, one factorisation (no fallback)"] = ms(one_factorisation)
    stages["whitened norms (K)"] = ms(lambda: leverage.whitened_norms(keys, hi[0], lo[0]))
    view = ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=0)
    press = curdkv.get_press("curdkv", 0.5)
    stages["curdkv score (K and V)"] = ms(lambda: press.score(view))
    scores = press.score(view)
    n_keep = kept_count(n, 0.5)
    stages["select_uniform 50%"] = ms(lambda: select_uniform(scores, n_keep, 4, 0, check_nan=False))
    stages["select 50% by torch.topk and in_context_order"] = ms(
        lambda: in_context_order(protect(scores, 4, 0).topk(n_keep, dim=-1, sorted=False).indices, n))
    idx = select_uniform(scores, n_keep, 4, 0)
    stages["gather K and V 50% (torch.gather)"] = ms(lambda: (gather_tokens(keys, idx), gather_tokens(values, idx)))
    stages["gather K and V 50% (kernel)"] = ms(lambda: gather_kv_tokens(keys, values, idx))
    from curdkv.presses.window import window_attention, window_attention_mean
    wview = ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=0)
    stages["snapkv window attention mean (fused)"] = ms(lambda: window_attention_mean(wview, 64))
    stages["snapkv window attention mean (plain)"] = ms(lambda: window_attention(wview, 64)[..., : n - 64].mean(2))
    rows = []
    for method in args.methods.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            p = curdkv.get_press(method, ratio)
            q = queries[:, :, -p.query_window:] if p.query_window else None
            # problems: the checks stay queued on the device, as in a prefill (no read back to time).
            t = ms(lambda: compress_layer(p, keys, values, q, module, 0, problems=[]))
            rows.append(dict(method=method, compression_ratio=ratio, overhead_ms=t["device"], overhead_wall_ms=t["wall"],
                             vs_bandwidth_limit=t["device"] / limit_ms, host_behind_repeats=t["host_behind"]))
            print(f"{method:14s} {ratio:.0%}: {t['device']:7.3f} ms on the GPU ({t['device'] / limit_ms:5.2f}x the limit), "
                  f"{t['wall']:7.3f} ms timed alone", flush=True)
    beside = []
    if device.type == "cuda":
        beside = beside_attention(keys, values, queries, module, device, args, rows)
    for name, t in stages.items():
        print(f"  stage {name:40s} {t['device']:7.3f} ms on the GPU, {t['wall']:7.3f} ms alone", flush=True)
    print(f"limit (K and V read once at {bandwidth / 1e9:.0f} GB/s): {limit_ms:.3f} ms")
    result = dict(environment=environment(), settings=vars(args), shape=dict(batch=b, kv_heads=h_kv, heads=h, head_dim=d, tokens=n),
                  copy_bandwidth_gb_s=bandwidth / 1e9, bandwidth_limit_ms=limit_ms, stages_ms=stages, rows=rows,
                  beside_attention=beside)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
