"""The sweep engine against a plain loop: wall time for many presses x ratios, same answers.

The plain loop does what a script without the sweep engine would: for every
sample and configuration, a fresh prefill compressed layer by layer
(:func:`curdkv.prefill`), then the question. The sweep engine prefills each
sample once, builds every configuration's cache from that capture and
answers all of them in one batch (:class:`curdkv.eval.sweep.Sweep`). Both
produce the same predictions records; the script checks that the answers
agree and prints where they do not.

Samples come from a run folder's ``samples.jsonl`` (``curdkv eval ruler ...
--samples-only`` writes one), so the machine running this needs no data packages.

    python benchmarks/sweep_vs_loop.py --samples-file results/ruler-qwen2.5-coder-0.5b-4k/samples.jsonl \\
        --model qwen2.5-coder-0.5b --out results/sweep_vs_loop.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

import torch

import curdkv
from curdkv.context import answer_greedily
from curdkv.report import environment
from curdkv.eval.ruler import score_sample
from curdkv.eval.sample import read_samples
from curdkv.eval.sweep import FULL, Sweep, read_predictions, sweep_configs

PRESSES = "curdkv,curdkv-sketch,adacurdkv,snapkv,adasnapkv,chunkkv,knorm,streamingllm"


def pick(samples, count: int):
    """``count`` samples taken round-robin over the tasks, so every kind of answer is timed."""
    by_task = defaultdict(list)
    for s in samples:
        by_task[s.task].append(s)
    chosen = []
    while len(chosen) < count and any(by_task.values()):
        for task in list(by_task):
            if by_task[task] and len(chosen) < count:
                chosen.append(by_task[task].pop(0))
    return chosen


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_loop(model, tokenizer, samples, configs) -> dict[tuple, str]:
    answers = {}
    for sample in samples:
        for config in configs:
            context = curdkv.prefill(model, tokenizer, sample.context, config.build())
            answers[(sample.task, sample.index, config.press, config.ratio)] = answer_greedily(
                model, tokenizer, context.cache, context.context_length, sample.question, sample.max_new_tokens,
                sample.answer_prefix, separator="",
            )[0]
    return answers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-file", required=True, help="a run folder's samples.jsonl")
    parser.add_argument("--num-samples", type=int, default=8, help="samples timed (round-robin over tasks)")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--presses", default=PRESSES)
    parser.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="sweep batch (default: the engine's)")
    parser.add_argument("--require-match", action="store_true",
                        help="exit 1 unless every answer matches (use with float32: in bfloat16 a batch of "
                             "different size rounds differently and near-tie tokens can flip)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model, tokenizer = curdkv.load_model(args.model, dtype=args.dtype, device=device)
    samples = pick(read_samples(args.samples_file), args.num_samples)
    configs = sweep_configs(args.presses.split(","), [float(r) for r in args.ratios.split(",")])

    # Warm-up: kernels compiled and the allocator grown before either side is timed.
    warm = samples[:1]
    plain_loop(model, tokenizer, warm, configs[:2])
    with tempfile.TemporaryDirectory() as tmp:
        Sweep(model, tokenizer, args.model, configs, tmp, score_sample, args.batch_size).run(warm)

    sync(device)
    start = time.perf_counter()
    loop_answers = plain_loop(model, tokenizer, samples, configs)
    sync(device)
    loop_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Sweep(model, tokenizer, args.model, configs, tmp, score_sample, args.batch_size)
        sync(device)
        start = time.perf_counter()
        sweep.run(samples)
        sync(device)
        sweep_s = time.perf_counter() - start
        records = read_predictions(sweep.out_dir)
    sweep_answers = {(r["task"], r["index"], r["press"], r["compression_ratio"]): r["prediction"] for r in records}

    mismatches = [
        {"sample": f"{k[0]}#{k[1]}", "press": k[2], "ratio": k[3], "loop": loop_answers[k], "sweep": sweep_answers.get(k)}
        for k in loop_answers if loop_answers[k].strip() != (sweep_answers.get(k) or "").strip()
    ]
    result = {
        "environment": environment(),
        "settings": {
            "model": args.model, "presses": args.presses, "ratios": args.ratios, "dtype": args.dtype,
            "device": str(device), "samples": [f"{s.task}#{s.index}" for s in samples],
            "configurations": len(configs), "sweep_batch_size": sweep.batch_size,
        },
        "answers": len(loop_answers),
        "plain_loop_seconds": loop_s,
        "sweep_seconds": sweep_s,
        "speedup": loop_s / sweep_s,
        "answers_matching": len(loop_answers) - len(mismatches),
        "mismatches": mismatches,
        "full_cache_answers_matching": sum(
            1 for k in loop_answers if k[2] == FULL and loop_answers[k].strip() == sweep_answers.get(k, "").strip()
        ),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"{len(samples)} samples x {len(configs)} configurations on {device}: plain loop {loop_s:.1f} s, "
        f"sweep {sweep_s:.1f} s, {result['speedup']:.1f}x faster; answers matching "
        f"{result['answers_matching']}/{len(loop_answers)}"
    )
    for m in mismatches:
        print(f"  differs: {m['sample']} {m['press']}@{m['ratio']}: loop {m['loop']!r} vs sweep {m['sweep']!r}")
    print(f"wrote {args.out}")
    if args.require_match and mismatches:
        raise SystemExit(f"{len(mismatches)} answers differ between the plain loop and the sweep")


if __name__ == "__main__":
    main()
