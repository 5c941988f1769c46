"""``curdkv eval``: accuracy under compression on RULER and LongBench, and reports of finished runs."""

from __future__ import annotations

from ..models import DEFAULT_MODEL, model_names
from .args import EVAL_PRESSES, eval_ratios, grid, lengths, names, positive, presses


def add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="accuracy under compression: RULER, LongBench (one prefill per sample)")
    benches = evaluate.add_subparsers(dest="bench", required=True)
    ruler = benches.add_parser("ruler", help="RULER's 13 synthetic tasks, generated offline")
    ruler.add_argument("--tasks", type=names, default=None, help="comma-separated (default: all 13)")
    ruler.add_argument("--lengths", type=lengths, default=(4096,), help="prompt lengths in tokens (default 4096)")
    ruler.add_argument("--samples", type=positive, default=50, help="samples per task and length (default 50)")
    ruler.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    longbench = benches.add_parser("longbench", help="LongBench from its jsonl files (nothing is downloaded)")
    longbench.add_argument("--data", required=True, help="folder holding LongBench's {task}.jsonl files")
    longbench.add_argument("--tasks", type=names, default=None, help="comma-separated (default: the 16 English tasks)")
    longbench.add_argument("--max-tokens", type=positive, default=None,
                           help="middle-truncate prompts to this many tokens (default: the model's context)")
    longbench.add_argument("--samples", type=positive, default=None, help="first N samples per task (default all)")
    for p in (ruler, longbench):
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {model_names()}")
        p.add_argument("--presses", type=presses, default=presses(EVAL_PRESSES),
                       help=f"comma-separated press specs, e.g. curdkv,curdkv:leverage=key (default {EVAL_PRESSES})")
        p.add_argument("--ratios", type=eval_ratios, default=(0.3, 0.5, 0.7, 0.9),
                       help="compression ratios (default 0.3,0.5,0.7,0.9), or calibrated:TOL for presses that choose "
                            "their ratio per context (compactor); the full cache always runs")
        p.add_argument("--extra", type=grid, action="append", default=[],
                       help="another PRESSES@RATIOS grid answered from the same prefill (repeatable)")
        p.add_argument("--out", required=True, help="run folder: predictions, summary.csv, results.md, plot")
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="auto: bfloat16 on GPUs, float32 on CPUs")
        p.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, or auto (spread a large model over all GPUs); under torchrun each rank uses its own GPU")
        p.add_argument("--batch-size", type=positive, default=None,
                       help="configurations answered together (default: all on CUDA, 1 on CPU)")
        p.add_argument("--samples-only", action="store_true", help="build and write the samples, answer nothing")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = benches.add_parser("report", help="tables and plot for a subset of a finished run")
    rep.add_argument("run", help="the run folder")
    rep.add_argument("--presses", type=presses, default=None, help="press specs to keep (default all)")
    rep.add_argument("--ratios", type=eval_ratios, default=None, help="ratios to keep (default all)")
    rep.add_argument("--samples", type=positive, default=None,
                     help="keep each task's first N samples, so configurations run on different numbers compare "
                          "on the same samples (default all)")
    rep.add_argument("--out", default=None, help="where to write (default: the run folder)")


def run_eval_command(args) -> int:
    from ..eval.families import longbench_family, ruler_family
    from ..eval.results import results_table
    from ..eval.run import report, run_eval
    from ..eval.sweep import sweep_configs

    if args.bench == "report":
        rows = report(args.run, args.out, args.presses, args.ratios, args.samples)
        print(results_table(rows))
        return 0
    configs = sweep_configs(args.presses, args.ratios, args.extra)
    if args.bench == "ruler":
        family = ruler_family(args.tasks, args.lengths, args.samples, args.seed)
        for config in configs:  # before the model loads: each prompt is about its length long
            press = config.build()
            for length in args.lengths if press is not None else ():
                press.check_context(length)
    else:
        family = longbench_family(args.data, args.tasks, args.max_tokens, args.samples)
    rows = run_eval(family, args.model, configs, args.out, dtype=args.dtype, device=args.device,
                    batch_size=args.batch_size, progress=not args.no_progress, samples_only=args.samples_only)
    if rows is None:  # a torchrun rank other than 0: rank 0 prints and writes
        return 0
    if args.samples_only:
        print(f"wrote the samples to {args.out}")
        return 0
    print(open(f"{args.out}/results.md").read())
    print(f"wrote {args.out}/summary.csv, results.md, average_vs_ratio.png")
    return 0
