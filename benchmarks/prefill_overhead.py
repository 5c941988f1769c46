"""What compression adds to a whole prefill, with and without overlapping it.

``curdkv bench`` times each layer's compression on its own (GPU time). This
script measures what a user waits for: the prefill with layer-by-layer
compression (:func:`curdkv.compress`) against the plain prefill, with
compression overlapped on a second CUDA stream (the default) and on the
prefill's own stream (``overlap=False``). A 0.2% difference at 128K tokens
is ~25 ms of a ~12 s prefill, below the drift of one GPU over minutes, so
the configurations run in interleaved rounds and each is compared with the
same round's plain prefill (median over rounds of the difference).

    python benchmarks/prefill_overhead.py --tokens 131072 --rounds 4 --out results/prefill_overhead-128k.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import DynamicCache

import curdkv
from curdkv.bench.timing import timer
from curdkv.report import environment
from curdkv.transformers_compat import forward_with_cache


@torch.no_grad()
def prefill(model, ids, press=None, overlap=True) -> tuple[float, int]:
    """Seconds and peak allocated bytes of one prefill, compressed layer by layer when ``press`` is given."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stop = timer(ids.device)
    cache = DynamicCache()
    if press is None:
        forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        with curdkv.compress(model, press, overlap=overlap):
            forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
    seconds = stop()
    del cache
    return seconds, torch.cuda.max_memory_allocated()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--presses", default="curdkv,curdkv-sketch,adacurdkv,snapkv")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_overhead.py times CUDA streams: run it on a GPU machine")
    device = torch.device("cuda")
    model, _ = curdkv.load_model(args.model, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    layers = model.config.num_hidden_layers
    configs = [("full", None)]
    for name in args.presses.split(","):
        configs += [(name, True), (name, False)]

    def run(config, tokens):
        name, overlap = config
        press = None if name == "full" else curdkv.get_press(name, args.ratio)
        return prefill(model, tokens, press, bool(overlap))

    for config in configs:  # compile every kernel once, untimed
        run(config, ids[:, :2048])
    times = {c: [] for c in configs}
    peaks = {}
    for r in range(args.rounds):
        for config in configs:
            seconds, peak = run(config, ids)
            times[config].append(seconds)
            peaks[config] = peak
            print(f"round {r}: {config[0]:10s} overlap={config[1]!s:5s} {seconds:8.3f} s", flush=True)
        # Written after every round: a run cut short keeps the rounds it finished.
        rows = summary(configs, times, peaks, args.ratio, layers)
        result = dict(environment=environment(), settings=vars(args), rounds_done=r + 1, layers=layers, rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    for row in rows:
        print(f"{row['method']:10s} overlap={row['overlap']!s:5s} median {row['prefill_s_median']:8.3f} s, "
              f"added {row['added_ms']:8.1f} ms ({row['added_percent']:+.2f}%, {row['added_ms_per_layer']:+.2f} "
              f"ms/layer), peak {row['peak_gb']:.2f} GB")


def summary(configs, times, peaks, ratio: float, layers: int) -> list[dict]:
    """One row per configuration over the rounds run so far."""
    full_times = times[configs[0]]
    full = statistics.median(full_times)
    rows = []
    for config in configs:
        name, overlap = config
        # Against the same round's full prefill: drift over the rounds cancels.
        added = statistics.median(t - f for t, f in zip(times[config], full_times))
        rows.append(dict(
            method=name, overlap=overlap, compression_ratio=0.0 if name == "full" else ratio,
            prefill_s_median=statistics.median(times[config]), prefill_s_all=times[config], added_ms=added * 1000,
            added_ms_per_layer=added * 1000 / layers, added_percent=100 * added / full, peak_gb=peaks[config] / 1e9,
        ))
    return rows

if __name__ == "__main__":
    main()
