"""Long generation with a constant-size cache: MorphKV and ``max_cache_tokens`` for other presses.

Generates ``--new-tokens`` tokens (no early stop) after a short prompt,
with the full cache and with each press held at ``--max-cache-tokens``
per KV head (``curdkv.compress(model, press, max_cache_tokens=C)``). For
each run it records the largest cache any layer held at any step (a hook on
every attention module), the bytes held at the end, peak GPU memory, speed,
how long the text agrees with the full cache's, distinct 4-grams (a
repetition loop drives it down) and the text itself, to read for coherence.

    python benchmarks/long_generation.py --model qwen2.5-coder-0.5b --new-tokens 2048 \\
        --max-cache-tokens 256 --out results/long_generation.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import curdkv
from curdkv.report import environment
from curdkv.presses import get_press
from curdkv.runtime.model import attention_modules
from curdkv.transformers_compat import find_cache

PROMPT = (
    "Write a long, detailed technical guide on how to design, build and maintain a small vegetable garden: "
    "choosing the site, preparing the soil, planning beds, choosing crops for each season, watering, "
    "composting, pests, harvesting and storing the produce. Use numbered chapters and explain every step."
)


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


@torch.no_grad()
def generate(model, ids, new_tokens: int, press=None, max_cache_tokens=None) -> dict:
    largest = [0]

    def watch(module, args, kwargs, output):
        cache = find_cache(kwargs, args)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is not None and hidden is not None and hidden.shape[1] == 1:  # decoding steps only
            largest[0] = max(largest[0], cache.layers[module.layer_idx].keys.shape[2])

    handles = [m.register_forward_hook(watch, with_kwargs=True) for m in attention_modules(model)]
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      return_dict_in_generate=True)
        if press is None:
            out = model.generate(ids, **kwargs)
        else:
            with curdkv.compress(model, press, max_cache_tokens=max_cache_tokens):
                out = model.generate(ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cache = find_cache(out)
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": len(tokens) / seconds,
        # The hook runs after the attention has appended the new token, before any
        # eviction of that step: the largest count is what a decoding step's attention really read.
        "largest_cache_tokens_while_decoding": largest[0],
        "final_cache_tokens": [layer.keys.shape[2] for layer in cache.layers],
        "final_kv_bytes": curdkv.cache_nbytes(cache),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--presses", default="morphkv,morphkv:fusion=max,curdkv,snapkv:window_size=32,streamingllm")
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--max-cache-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="results/long_generation.json")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = curdkv.load_model(args.model, dtype=args.dtype, device=device)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    runs = {"full": generate(model, ids, args.new_tokens)}
    for spec in [s for s in args.presses.split(",") if s]:
        runs[spec] = generate(model, ids, args.new_tokens, get_press(spec), args.max_cache_tokens)
    reference = runs["full"]["tokens"]
    results = {}
    for name, run in runs.items():
        tokens = run.pop("tokens")
        run.update(
            agreeing_prefix_tokens=agreeing_prefix(tokens, reference),
            distinct_4grams=round(distinct_ngrams(tokens), 4),
            text_start=tokenizer.decode(tokens[:120]),
            text_end=tokenizer.decode(tokens[-200:]),
        )
        results[name] = run
        print(f"{name:28s} largest {run['largest_cache_tokens_while_decoding']:5d}  final KV {run['final_kv_bytes'] / 2**20:7.2f} MiB  "
              f"{run['tokens_per_second']:6.1f} tok/s  agree {run['agreeing_prefix_tokens']:5d}  "
              f"distinct-4 {run['distinct_4grams']:.3f}")
    report = {
        "environment": environment(),
        "settings": {"model": args.model, "dtype": args.dtype, "prompt_tokens": ids.shape[1],
                     "new_tokens": args.new_tokens, "max_cache_tokens": args.max_cache_tokens},
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
