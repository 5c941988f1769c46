"""Tables and figures of ``curdkv bench`` results (the paper's Figures 4-5 layout)."""

from __future__ import annotations

from collections import defaultdict

from ..report import markdown_table, pyplot

METRICS = (
    ("kv_gb", "KV cache (GB)"),
    ("peak_prefill_gb", "peak prefill memory (GB)"),
    ("prefill_s", "prefill incl. compression (s)"),
    ("decode_ms_per_token", "decode wall (ms/token)"),
    ("decode_gpu_ms_per_token", "decode GPU time (ms/token)"),
    ("overhead_ms_per_layer", "compression overhead (ms/layer)"),
)

COLUMNS = [
    ("method", "method"), ("ratio", "ratio"), ("kv_text", "KV GB"), ("peak_text", "peak GB"),
    ("prefill_s", "prefill s"), ("overhead_ms_per_layer", "overhead ms/layer"),
    ("overhead_percent_text", "overhead % prefill"), ("overhead_vs_bandwidth", "x bandwidth limit"),
    ("overhead_vs_floor", "x design floor"),
    ("overlapped_text", "overlapped ms/layer"), ("overlapped_percent_text", "overlapped % prefill"),
    ("decode_ms_per_token", "decode ms/token"), ("decode_speedup", "speedup"),
    ("ideal_decode_speedup", "ideal"), ("decode_efficiency", "efficiency"),
    ("decode_gpu_ms_per_token", "decode GPU ms/token"), ("decode_gpu_speedup", "GPU speedup"),
    ("ideal_decode_gpu_speedup", "GPU ideal"), ("decode_gpu_efficiency", "GPU efficiency"),
]


def bench_table(result: dict) -> str:
    """Markdown: the settings line, one table per context length, then the goals."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"Model {settings['model']} ({settings['dtype']}, {settings['attn_implementation']}) on {env['device']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, Triton {env.get('triton')}. "
        f"Decode: {settings['decode_tokens']} greedy tokens, median of {settings['decode_repeats']}, "
        f"{result.get('decode_timing', 'eager loop of model(...) calls')}; "
        f"overhead: median of {settings['repeats']}, {result.get('overhead_timing', 'gpu time of a whole build')}. "
        f"Copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s "
        f"(read + write); fixed decode cost {result['fixed_decode_ms_per_token']:.2f} ms/token "
        f"(GPU time {_optional(result.get('fixed_decode_gpu_ms_per_token'), '.2f') or 'n/a'}).",
    ]
    by_length = defaultdict(list)
    for r in result["rows"]:
        by_length[r["context_tokens"]].append(
            {**r, "ratio": f"{r['compression_ratio']:.0%}", "kv_text": f"{r['kv_gb']:.4g}",
             "peak_text": "" if r["peak_prefill_gb"] is None else f"{r['peak_prefill_gb']:.4g}",
             "overhead_percent_text": f"{r['overhead_percent_of_prefill']:.3f}",
             "overlapped_text": _optional(r.get("overlapped_overhead_ms_per_layer"), ".3f"),
             "overlapped_percent_text": _optional(r.get("overlapped_overhead_percent_of_prefill"), ".3f")}
        )
    for length, rows in sorted(by_length.items()):
        lines += ["", f"### {length} tokens", "", markdown_table(rows, COLUMNS)]
        behind = [f"{r['method']} {r['ratio']} ({r['overhead_host_behind_fraction']:.0%})" for r in rows
                  if r.get("overhead_host_behind_fraction")]
        if behind:
            lines += ["", "The host fell behind the GPU in part of the overhead timings (their time includes "
                          "host launches or waits): " + ", ".join(behind) + "."]
    goals = result.get("goals") or {}
    if goals:
        lines += ["", f"### Goals at {goals['context_tokens']} tokens", ""]
        for name, goal in goals.items():
            if isinstance(goal, dict):
                bound = f"<= {goal['max']}" if "max" in goal else f">= {goal['min']}"
                lines.append(f"- {name}: worst {goal['worst']:.4g} ({bound}): {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def _optional(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def plot_bench(result: dict, path) -> None:
    """One row of panels per method (one panel per metric), one line per context length; full cache at ratio 0."""
    plt = pyplot()
    rows = result["rows"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"] or ["full"]
    lengths = sorted({r["context_tokens"] for r in rows})
    fig, axes = plt.subplots(len(methods), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, (key, label) in enumerate(METRICS):
            ax = axes[i][j]
            for length in lengths:
                points = sorted(
                    (r["compression_ratio"], r[key]) for r in rows
                    if r["context_tokens"] == length and r["method"] in (method, "full") and r.get(key) is not None
                )
                if points:
                    ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=f"{length // 1024}K")
            ax.set_title(f"{method}: {label}", fontsize=9)
            ax.set_xlabel("compression ratio (%)")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, title="context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
