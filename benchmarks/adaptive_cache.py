"""KV bytes held and decode speed: full cache vs CurDKV vs AdaCurDKVPress (ragged) vs AdaCurDKVPress (masked, kvpress's layout).

One prefill per context length (the sweep path), then every configuration's
cache is built from it and decoded for ``--decode-tokens`` greedy tokens
(fixed length, no early stop). Prints a table and writes JSON.

    python benchmarks/adaptive_cache.py --out results/adaptive_cache.json          # GPU: Llama-3.1-8B shapes
    python benchmarks/adaptive_cache.py --model random:tiny-llama --lengths 512 --device cpu --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import curdkv
from curdkv.bench.timing import decode_seconds_per_token as decode, timer
from curdkv.report import environment
from curdkv.report import markdown_table


def configurations(ratios):
    yield "full", 0.0, None, None
    for ratio in ratios:
        yield "curdkv", ratio, curdkv.CurDKVPress(ratio), None
        yield "curdkv (dense layout)", ratio, curdkv.CurDKVPress(ratio), "dense"
        yield "adacurdkv", ratio, curdkv.AdaCurDKVPress(ratio), "ragged"
        yield "adacurdkv (masked, kvpress layout)", ratio, curdkv.AdaCurDKVPress(ratio), "masked"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--ratios", default="0.5,0.9")
    parser.add_argument("--decode-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per configuration (median)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    model, _ = curdkv.load_model(args.model, dtype=args.dtype, device=device)
    vocab = model.config.vocab_size
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stop = timer(device)
        capture = curdkv.capture_prefill(model, ids)
        prefill_s = stop()
        if device.type == "cuda":
            print(f"{length}: prefill {prefill_s:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        first = torch.randint(0, vocab, (1, 1), generator=gen).to(device)
        full_bytes = capture.nbytes()
        for method, ratio, press, layout in configurations(ratios):
            cache = capture.build_cache(press, layout)
            nbytes = cache.nbytes()
            decode(model, cache, first, length, 3)  # warm-up (kernels, allocator)
            per_token = statistics.median(
                decode(model, cache, first, length, args.decode_tokens) for _ in range(args.repeats)
            )
            row = {
                "context_tokens": length,
                "method": method,
                "compression_ratio": ratio,
                "kv_bytes": nbytes,
                "kv_fraction_of_full": nbytes / full_bytes,
                "decode_ms_per_token": per_token * 1000,
                "prefill_seconds": prefill_s,
            }
            rows.append(row)
            print(
                f"{length:>7} {method:<36} {ratio:>4.0%} {nbytes / 2**30:8.3f} GiB "
                f"({row['kv_fraction_of_full']:6.1%})  {row['decode_ms_per_token']:8.2f} ms/token",
                flush=True,
            )
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del capture
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(args, rows)  # after every length, so a later failure keeps what was measured
    write(args, rows, final=True)


def write(args, rows: list[dict], final: bool = False) -> None:
    """Derived columns, the table, and the JSON file (rewritten whole each time)."""
    by_key = {(r["context_tokens"], r["method"], r["compression_ratio"]): r for r in rows}
    for r in rows:
        uniform = by_key.get((r["context_tokens"], "curdkv", r["compression_ratio"]))
        if r["method"].startswith("adacurdkv") and uniform:
            r["bytes_vs_uniform"] = r["kv_bytes"] / uniform["kv_bytes"]
            r["decode_vs_uniform"] = r["decode_ms_per_token"] / uniform["decode_ms_per_token"]
    for r in rows:
        r["kv_mib"] = r["kv_bytes"] / 2**20
        for key, fmt in (("bytes_vs_uniform", "{:.4f}"), ("decode_vs_uniform", "{:.2f}x")):
            if key in r:
                r[key + "_text"] = fmt.format(r[key])
        r["ratio_text"] = f"{r['compression_ratio']:.0%}"
        r["percent_of_full"] = 100 * r["kv_fraction_of_full"]
    table = markdown_table(
        rows,
        [
            ("context_tokens", "context"), ("method", "method"), ("ratio_text", "ratio"), ("kv_mib", "KV MiB"),
            ("percent_of_full", "% of full"), ("decode_ms_per_token", "decode ms/token"),
            ("bytes_vs_uniform_text", "bytes / uniform"), ("decode_vs_uniform_text", "decode / uniform"),
        ],
    )
    if final:
        print(table)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "settings": settings, "results": rows, "table": table}, f, indent=2)
    if final:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
