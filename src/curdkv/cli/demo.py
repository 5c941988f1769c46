"""The demo: needle-in-a-haystack answers under compression on the bundled model.

One prefill per prompt (the sweep path); every (press, ratio) cache is built
from it, so the table compares methods on identical prefills.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..cache.stack import stack_caches
from ..context import answer_greedily, capture_prefill
from ..eval.needle import answered, needle_samples
from ..eval.sweep import shared_query_window, sweep_configs
from ..models import DEFAULT_MODEL, dtype_name, load_model, model_names
from ..report import markdown_table
from .args import DEMO_PRESSES, positive, presses, ratios

@dataclass
class DemoSettings:
    model: str = DEFAULT_MODEL
    presses: tuple[str, ...] = DEMO_PRESSES
    ratios: tuple[float, ...] = (0.5, 0.9)
    samples: int = 6
    context_tokens: int = 4096
    max_new_tokens: int = 16
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0


def configurations(settings: DemoSettings) -> list[tuple[str, float, object]]:
    """``(method, ratio, press)`` rows, as an evaluation sweep lists them: the full cache first, at
    ratio 0, then every press at every ratio (:func:`curdkv.eval.sweep.sweep_configs`)."""
    return [(c.label, c.ratio, c.build()) for c in sweep_configs(settings.presses, settings.ratios)]


def ratio_groups(configs: list[tuple[str, float, object]]) -> list[list[tuple[str, float, object]]]:
    """Configurations grouped by ratio, in order: uniform presses at one ratio keep the same
    number of tokens, so a group's caches stack densely and are answered in one batch."""
    groups: dict[float, list] = {}
    for config in configs:
        groups.setdefault(config[1], []).append(config)
    return list(groups.values())


def run_demo(settings: DemoSettings, progress: bool = True) -> list[dict]:
    """Answer needle prompts with every configuration; one record per (method, ratio).

    Each prompt is prefilled once (the sweep path); the configurations of one
    ratio are answered together, one batch row each (every row decodes as it
    would alone, greedily). Decoding a small model on a CPU reads all its
    weights at every step, so a batch of five costs little more than one row.
    """
    configs = configurations(settings)  # validates names and ratios before the model loads
    for _, _, press in configs:
        if press is not None:
            press.check_context(settings.context_tokens)
    model, tokenizer = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    samples = needle_samples(tokenizer, settings.samples, settings.context_tokens, seed=settings.seed)
    stats = {(m, r): {"correct": 0, "seconds": 0.0, "kv_bytes": 0, "answers": []} for m, r, _ in configs}
    prefill_seconds = 0.0
    groups = ratio_groups(configs)
    query_window = shared_query_window(press for _, _, press in configs)
    bar = tqdm(total=len(samples) * len(configs), desc="demo", unit="answer", disable=not progress)
    for sample in samples:
        start = time.perf_counter()
        capture = capture_prefill(model, sample.context, tokenizer, query_window=query_window)
        prefill_seconds += time.perf_counter() - start
        for group in groups:
            start = time.perf_counter()
            caches = [capture.build_cache(press) for _, _, press in group]
            answers = answer_greedily(model, tokenizer, stack_caches(caches, capture.seq_len), capture.seq_len,
                                      sample.question, settings.max_new_tokens, sample.answer_prefix)
            share = (time.perf_counter() - start) / len(group)
            for (method, ratio, _), cache, answer in zip(group, caches, answers):
                row = stats[(method, ratio)]
                row["seconds"] += share
                row["correct"] += answered(sample, answer)
                row["kv_bytes"] += cache.nbytes()
                row["answers"].append(answer)
            bar.set_postfix_str(f"{group[0][1]:.0%}")
            bar.update(len(group))
        del capture
    bar.close()
    n = len(samples)
    return [
        {
            "method": method,
            "compression_ratio": ratio,
            "accuracy": stats[(method, ratio)]["correct"] / n,
            "correct": stats[(method, ratio)]["correct"],
            "samples": n,
            "kv_bytes": stats[(method, ratio)]["kv_bytes"] // n,
            "seconds": stats[(method, ratio)]["seconds"] / n,
            "answers": stats[(method, ratio)]["answers"],
            "prefill_seconds": prefill_seconds / n,
            "model": settings.model,
            "dtype": dtype_name(model),
            "context_tokens": settings.context_tokens,
        }
        for method, ratio, _ in configs
    ]


def format_results(records: list[dict]) -> str:
    rows = [
        {
            "method": r["method"],
            "ratio": f"{r['compression_ratio']:.0%}",
            "accuracy": f"{r['correct']}/{r['samples']}",
            "mb": r["kv_bytes"] / 2**20,
            "seconds": r["seconds"],
        }
        for r in records
    ]
    table = markdown_table(
        rows,
        [("method", "method"), ("ratio", "ratio"), ("accuracy", "accuracy"), ("mb", "KV cache MB held"),
         ("seconds", "seconds / answer")],
    )
    first = records[0]
    note = (
        f"\n{first['model']} ({first['dtype']}), {first['samples']} needles in ~{first['context_tokens']}-token "
        f"essays; one shared prefill per prompt ({first['prefill_seconds']:.1f} s, not in 'seconds'); "
        "seconds = building the compressed cache + answering (the configurations of one ratio are answered "
        "in one batch, whose time is shared among them)."
    )
    return table + note


def write_json(records: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=2)


def add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="needle-in-a-haystack answers under compression on the bundled model")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {model_names()}")
    demo.add_argument("--presses", type=presses, default=None, help="comma-separated, e.g. full,curdkv,snapkv")
    demo.add_argument("--ratios", type=ratios, default=None, help="compression ratios, e.g. 0.5,0.9")
    demo.add_argument("--samples", type=positive, default=None, help="needle prompts (default 6)")
    demo.add_argument("--context-tokens", type=positive, default=None, help="prompt length (default 4096)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="auto: bfloat16 on GPUs, float32 on CPUs")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument("--json", dest="json_path", default=None, help="write one record per table row to this file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_demo_command(args) -> int:
    settings = DemoSettings(model=args.model, dtype=args.dtype, device=args.device)
    for field, value in (("presses", args.presses), ("ratios", args.ratios), ("samples", args.samples),
                         ("context_tokens", args.context_tokens)):
        if value is not None:
            setattr(settings, field, value)
    try:
        records = run_demo(settings, progress=not args.no_progress)
    except ValueError as error:
        print(f"curdkv demo: error: {error}", file=sys.stderr)
        return 2
    print(format_results(records))
    if args.json_path:
        write_json(records, args.json_path)
        print(f"wrote {args.json_path}")
    return 0
