"""Peak context attention of one layer: the Triton kernel against the chunked torch route and the FLOP limit.

CurDKV's ``layer_budget="context_attention"`` scores each key by the largest
softmax probability any context query gives it (no mask). Shapes are one
Llama-3.1-8B layer at batch 1 (32 query heads, 8 KV heads, head dim 128,
bf16), random queries and keys; no model is loaded. For each length it
times:

- ``torch``: the chunked route (logits materialised and softmaxed in float32);
- ``kernel``: :func:`curdkv.kernels.peak_attention.peak_attention` (two passes, logits kept on chip);
- ``causal_attention``: the prefill's own attention over the same tensors
  (``scaled_dot_product_attention``, causal), what the layer costs anyway;

and the limit: the kernel's two ``QKᵀ`` products, ``4·H·M·N·D`` FLOPs, at
the bf16 matmul rate measured on the same GPU. It checks that both routes
agree.

    python benchmarks/peak_attention.py --out results/peak_attention.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from curdkv.bench.timing import median_seconds
from curdkv.kernels.peak_attention import peak_attention
from curdkv.presses.peak_attention import CHUNK_ENTRIES, peak_context_attention
from curdkv.report import environment

QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def matmul_tflops(device: torch.device, size: int = 8192) -> float:
    """The bf16 dense matmul rate this GPU reaches (TFLOP/s), the limit the kernel is held against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * size**3 / seconds / 1e12


def measure(tokens: int, device: torch.device, tflops: float, repeats: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(tokens)
    queries = torch.randn(1, QUERY_HEADS, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    keys = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    scaling = HEAD_DIM**-0.5
    chunk = max(1, CHUNK_ENTRIES // (QUERY_HEADS * tokens))
    by_torch = peak_context_attention(queries, keys, scaling, chunk_size=chunk)  # chunk_size keeps the torch route
    by_kernel = peak_attention(queries, keys, scaling)
    expanded = keys.repeat_interleave(QUERY_HEADS // KV_HEADS, dim=1)
    times = {
        "torch": median_seconds(lambda: peak_context_attention(queries, keys, scaling, chunk_size=chunk), device, repeats),
        "kernel": median_seconds(lambda: peak_attention(queries, keys, scaling), device, repeats),
        "causal_attention": median_seconds(
            lambda: F.scaled_dot_product_attention(queries, expanded, expanded, is_causal=True), device, repeats),
    }
    flops = 4 * QUERY_HEADS * tokens * tokens * HEAD_DIM
    row = {
        "tokens": tokens,
        **{f"{name}_ms": 1e3 * s for name, s in times.items()},
        "limit_ms": 1e3 * flops / (tflops * 1e12),
        "kernel_tflops": flops / times["kernel"] / 1e12,
        "speedup_over_torch": times["torch"] / times["kernel"],
        "max_abs_difference": float((by_kernel - by_torch).abs().max()),
        "max_relative_difference_above_1e-3": float(
            ((by_kernel - by_torch).abs() / by_torch.clamp_min(1e-3)).max()),
    }
    print(f"{tokens:>7} tokens: torch {row['torch_ms']:8.2f} ms, kernel {row['kernel_ms']:7.2f} ms "
          f"({row['kernel_tflops']:.0f} TFLOP/s; limit {row['limit_ms']:.2f} ms), causal attention "
          f"{row['causal_attention_ms']:.2f} ms; speed-up {row['speedup_over_torch']:.1f}x, "
          f"max |difference| {row['max_abs_difference']:.2e}")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384,32768")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("peak_attention.py times the Triton kernel: run it on a GPU machine")
    device = torch.device("cuda")
    tflops = matmul_tflops(device)
    print(f"bf16 matmul: {tflops:.0f} TFLOP/s")
    rows = [measure(int(t), device, tflops, args.repeats) for t in args.tokens.split(",")]
    result = {"environment": environment(), "settings": vars(args), "matmul_tflops": tflops,
              "shape": {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
