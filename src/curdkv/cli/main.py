"""The ``curdkv`` command line."""

from __future__ import annotations

import argparse
import sys

from ..models import DEFAULT_MODEL, model_names
from ..presses import PRESSES


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    return values


def _presses(text: str) -> tuple[str, ...]:
    """Comma-separated press specs: registry names, optionally with ``:option=value`` pairs."""
    from ..presses import parse_press_spec

    specs = tuple(t.strip() for t in text.split(",") if t.strip())
    if not specs:
        raise argparse.ArgumentTypeError(f"--presses must name at least one of {sorted({'full', *PRESSES})}")
    for spec in specs:
        if spec.lower() == "full":
            continue
        try:
            # A calibrated configuration is labelled PRESS@calibrated:TOL in a run's records.
            parse_press_spec(spec.split("@calibrated:")[0])
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--presses: {error}")
    return tuple("full" if s.lower() == "full" else s for s in specs)


def _eval_ratios(text: str) -> tuple[float | str, ...]:
    """Ratios in (0, 1), and ``calibrated:TOL`` for presses that choose their ratio per context."""
    from ..eval.sweep import parse_ratio

    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            ratio, tolerance = parse_ratio(item)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--{error} (the full cache is always run)")
        values.append(item if tolerance is not None else ratio)
    if not values:
        raise argparse.ArgumentTypeError(f"--ratios must name at least one ratio, got {text!r}")
    return tuple(values)


def _grid(text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``PRESSES@RATIOS``, e.g. ``curdkv:leverage=key,curdkv:leverage=value@0.5,0.9``."""
    presses, sep, ratios = text.rpartition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"--extra must look like PRESSES@RATIOS, got {text!r}")
    return _presses(presses), _eval_ratios(ratios)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(v < 256 for v in values):
        raise argparse.ArgumentTypeError(f"--lengths must be comma-separated integers >= 256, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curdkv", description="KV-cache compression for transformers LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="needle-in-a-haystack answers under compression on the bundled model")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {model_names()}")
    demo.add_argument("--presses", type=_presses, default=None, help="comma-separated, e.g. full,curdkv,snapkv")
    demo.add_argument("--ratios", type=_ratios, default=None, help="compression ratios, e.g. 0.5,0.9")
    demo.add_argument("--samples", type=_positive, default=None, help="needle prompts (default 6)")
    demo.add_argument("--context-tokens", type=_positive, default=None, help="prompt length (default 4096)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="auto: bfloat16 on GPUs, float32 on CPUs")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument("--json", dest="json_path", default=None, help="write one record per table row to this file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    _add_eval(sub)
    from .measure import add_analyze, add_bench

    parsers = dict(lengths=_lengths, ratios=_ratios, presses=_presses, positive=_positive)
    add_bench(sub, parsers)
    add_analyze(sub, parsers)
    sub.add_parser("models", help="list the models load_model knows")
    sub.add_parser("presses", help="list the presses")
    return parser


EVAL_PRESSES = "curdkv,adacurdkv,snapkv,adasnapkv,chunkkv,knorm,streamingllm"


def _add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="accuracy under compression: RULER, LongBench (one prefill per sample)")
    benches = evaluate.add_subparsers(dest="bench", required=True)
    ruler = benches.add_parser("ruler", help="RULER's 13 synthetic tasks, generated offline")
    ruler.add_argument("--tasks", type=_names, default=None, help="comma-separated (default: all 13)")
    ruler.add_argument("--lengths", type=_lengths, default=(4096,), help="prompt lengths in tokens (default 4096)")
    ruler.add_argument("--samples", type=_positive, default=50, help="samples per task and length (default 50)")
    ruler.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    longbench = benches.add_parser("longbench", help="LongBench from its jsonl files (nothing is downloaded)")
    longbench.add_argument("--data", required=True, help="folder holding LongBench's {task}.jsonl files")
    longbench.add_argument("--tasks", type=_names, default=None, help="comma-separated (default: the 16 English tasks)")
    longbench.add_argument("--max-tokens", type=_positive, default=None,
                           help="middle-truncate prompts to this many tokens (default: the model's context)")
    longbench.add_argument("--samples", type=_positive, default=None, help="first N samples per task (default all)")
    for p in (ruler, longbench):
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {model_names()}")
        p.add_argument("--presses", type=_presses, default=_presses(EVAL_PRESSES),
                       help=f"comma-separated press specs, e.g. curdkv,curdkv:leverage=key (default {EVAL_PRESSES})")
        p.add_argument("--ratios", type=_eval_ratios, default=(0.3, 0.5, 0.7, 0.9),
                       help="compression ratios (default 0.3,0.5,0.7,0.9), or calibrated:TOL for presses that choose "
                            "their ratio per context (compactor); the full cache always runs")
        p.add_argument("--extra", type=_grid, action="append", default=[],
                       help="another PRESSES@RATIOS grid answered from the same prefill (repeatable)")
        p.add_argument("--out", required=True, help="run folder: predictions, summary.csv, results.md, plot")
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="auto: bfloat16 on GPUs, float32 on CPUs")
        p.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, or auto (spread a large model over all GPUs); under torchrun each rank uses its own GPU")
        p.add_argument("--batch-size", type=_positive, default=None,
                       help="configurations answered together (default: all on CUDA, 1 on CPU)")
        p.add_argument("--samples-only", action="store_true", help="build and write the samples, answer nothing")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep = benches.add_parser("report", help="tables and plot for a subset of a finished run")
    rep.add_argument("run", help="the run folder")
    rep.add_argument("--presses", type=_presses, default=None, help="press specs to keep (default all)")
    rep.add_argument("--ratios", type=_eval_ratios, default=None, help="ratios to keep (default all)")
    rep.add_argument("--samples", type=_positive, default=None,
                     help="keep each task's first N samples, so configurations run on different numbers compare "
                          "on the same samples (default all)")
    rep.add_argument("--out", default=None, help="where to write (default: the run folder)")


def _run_eval(args) -> int:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        try:
            return _run_eval(args)
        except ValueError as error:
            print(f"curdkv eval: error: {error}", file=sys.stderr)
            return 2
    if args.command in ("bench", "analyze"):
        from .measure import run_analyze_command, run_bench_command

        return (run_bench_command if args.command == "bench" else run_analyze_command)(args)
    if args.command == "models":
        print("\n".join(model_names()))
        return 0
    if args.command == "presses":
        from ..presses import get_press

        width = max(len(name) for name in PRESSES)
        for name in PRESSES:
            print(f"{name:{width}s}  {get_press(name).describe()}")
        return 0
    from .demo import DemoSettings, format_results, run_demo, write_json

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


if __name__ == "__main__":
    sys.exit(main())
