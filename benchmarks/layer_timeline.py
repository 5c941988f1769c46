"""Every kernel of one layer's compression on the GPU: name, start, duration, gap before it.

Keys/values shaped like one Llama-3.1-8B layer (as in
``compression_overhead.py``). A GPU sleep is queued first so that all of the
layer's launches are queued before the GPU reaches them; the gaps left are
the GPU's own, not the host's. For each configuration it writes the
kernels in order, their count, their summed time, the span from the first
kernel's start to the last one's end, and the layer's device time
(:func:`curdkv.bench.timing.device_seconds`). Where the time goes, and how
much a fused kernel could still take away, is read off this list.

    python benchmarks/layer_timeline.py --out results/layer_timeline-128k.json
"""

from __future__ import annotations

import argparse
import json

import torch

import curdkv
from curdkv.bench.timing import sleep_cycles_per_second, device_seconds, median_seconds
from curdkv.report import environment
from curdkv.runtime.layer import compress_layer
from compression_overhead import llama_layer


def timeline(fn, device: torch.device) -> list[dict]:
    """The CUDA kernels, copies and fills of one ``fn()`` call, in start order (microseconds)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(int(0.05 * sleep_cycles_per_second(device.index)))
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    events = [e for e in events if "spin_kernel" not in e.name]  # the sleep
    kernels, end = [], events[0].time_range.start
    for e in events:
        kernels.append(dict(name=e.name, start_us=e.time_range.start - events[0].time_range.start,
                            duration_us=e.time_range.elapsed_us(), gap_us=e.time_range.start - end))
        end = max(end, e.time_range.end)
    return kernels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--configs", default="curdkv:0.2,curdkv:0.5,curdkv:0.9,curdkv-sketch:0.2,curdkv-sketch:0.5,"
                        "curdkv-sketch:0.9,adacurdkv:0.5,snapkv:0.5",
                        help="method:ratio pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("layer_timeline.py needs CUDA: it reads the GPU's kernel records")
    device = torch.device("cuda")
    keys, values, queries, module = llama_layer(args.tokens, device)
    rows = []
    for spec in args.configs.split(","):
        method, ratio = spec.split(":")
        press = curdkv.get_press(method, float(ratio))
        fn = lambda: compress_layer(press, keys, values, queries, module, 0, problems=[])  # noqa: E731
        for _ in range(3):  # compile and warm up
            fn()
        host = median_seconds(fn, device, args.repeats)
        kernels = timeline(fn, device)
        last = max(k["start_us"] + k["duration_us"] for k in kernels)
        row = dict(method=method, compression_ratio=float(ratio), kernels=len(kernels),
                   kernel_sum_us=sum(k["duration_us"] for k in kernels), span_us=last,
                   device_ms=device_seconds(fn, device, args.repeats, host_seconds=host) * 1000,
                   wall_ms=host * 1000, timeline=kernels)
        rows.append(row)
        print(f"{method} {ratio}: {row['kernels']} kernels, {row['kernel_sum_us']:.0f} us of kernels, "
              f"span {row['span_us']:.0f} us, device {row['device_ms']:.3f} ms, wall {row['wall_ms']:.3f} ms")
        for k in sorted(kernels, key=lambda k: -k["duration_us"])[:8]:
            print(f"    {k['duration_us']:8.1f} us  {k['name'][:90]}")
    if args.out:
        result = dict(environment=environment(), settings=vars(args), rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
