"""The ``curdkv`` command line."""

from __future__ import annotations

import argparse
import sys

from ..models import model_names
from ..presses import PRESSES
from .demo import add_demo, run_demo_command
from .eval import add_eval, run_eval_command
from .measure import add_analyze, add_bench, run_analyze_command, run_bench_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curdkv", description="KV-cache compression for transformers LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    add_demo(sub)
    add_eval(sub)
    add_bench(sub)
    add_analyze(sub)
    sub.add_parser("models", help="list the models load_model knows")
    sub.add_parser("presses", help="list the presses")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        try:
            return run_eval_command(args)
        except ValueError as error:
            print(f"curdkv eval: error: {error}", file=sys.stderr)
            return 2
    if args.command in ("bench", "analyze"):
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
    return run_demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
