"""The ``curdkv`` command line."""

from __future__ import annotations

import argparse
import sys

from .models import DEFAULT_MODEL, model_names
from .presses import PRESSES


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    return values


def _presses(text: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    allowed = {"full", *PRESSES}
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--presses must be a comma-separated subset of {sorted(allowed)}, got {text!r}")
    return names


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
    demo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument("--json", dest="json_path", default=None, help="write one record per table row to this file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("models", help="list the models load_model knows")
    sub.add_parser("presses", help="list the presses")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        print("\n".join(model_names()))
        return 0
    if args.command == "presses":
        from .presses import get_press

        for name in PRESSES:
            print(f"{name:14s} {get_press(name).describe()}")
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
