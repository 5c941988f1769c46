"""``curdkv bench`` and ``curdkv analyze``: the speed and reconstruction commands."""

from __future__ import annotations

import sys

from .args import lengths, positive, presses, ratios


def add_bench(sub) -> None:
    from ..bench.speed import BenchSettings

    d = BenchSettings.__dataclass_fields__
    bench = sub.add_parser("bench", help="KV bytes, peak memory, prefill, decode and compression overhead")
    bench.add_argument("--model", default=d["model"].default, help="model name (default random:llama-3.1-8b)")
    bench.add_argument("--lengths", type=lengths, default=d["lengths"].default,
                       help="context lengths in tokens (default 4096,16384,32768,65536,131072)")
    bench.add_argument("--ratios", type=ratios, default=d["ratios"].default,
                       help="compression ratios (default 0,0.2,0.4,0.6,0.8,0.9; 0 is the full cache)")
    bench.add_argument("--methods", type=presses, default=d["methods"].default,
                       help="press specs (default curdkv,adacurdkv,snapkv); the full cache is always measured")
    bench.add_argument("--decode-tokens", type=positive, default=d["decode_tokens"].default,
                       help="greedy tokens per decode measurement (default 100, no early stop)")
    bench.add_argument("--repeats", type=positive, default=d["repeats"].default,
                       help="overhead measurements per configuration, median (default 3)")
    bench.add_argument("--decode-repeats", type=positive, default=d["decode_repeats"].default,
                       help="decode measurements per configuration, median (default 2)")
    bench.add_argument("--dtype", default=d["dtype"].default, choices=["bfloat16", "float16", "float32"])
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    bench.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.png (resumes the lengths, methods and ratios it holds)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench_command(args) -> int:
    from ..bench.speed import BenchSettings, run_bench

    try:
        settings = BenchSettings(
            model=args.model, lengths=args.lengths, ratios=args.ratios,
            methods=tuple(m for m in args.methods if m != "full"), decode_tokens=args.decode_tokens,
            repeats=args.repeats, decode_repeats=args.decode_repeats, dtype=args.dtype, device=args.device,
        )
        run_bench(settings, args.out, progress=not args.no_progress)
    except ValueError as error:
        print(f"curdkv bench: error: {error}", file=sys.stderr)
        return 2
    print(open(f"{args.out}/bench.md").read())
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


def add_analyze(sub) -> None:
    from ..models import DEFAULT_MODEL

    analyze = sub.add_parser("analyze", help="attention reconstruction error and single-token eviction (paper Figs 1-2)")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    rec = kinds.add_parser("reconstruction", help="errors of QKᵀ and softmax(QKᵀ)V per press, ratio, layer")
    rec.add_argument("--presses", type=presses,
                     default=presses("curdkv,adacurdkv,snapkv,adasnapkv,chunkkv,knorm,streamingllm"),
                     help="press specs (default curdkv,adacurdkv,snapkv,adasnapkv,chunkkv,knorm,streamingllm)")
    rec.add_argument("--ratios", type=ratios, default=(0.5, 0.9), help="compression ratios (default 0.5,0.9)")
    ev = kinds.add_parser("eviction", help="mean attention vs output error of evicting each token alone")
    ev.add_argument("--layer", type=int, default=None, help="layer (default: the middle one)")
    ev.add_argument("--head", type=int, default=0, help="query head (default 0)")
    for p in (rec, ev):
        p.add_argument("--model", default=DEFAULT_MODEL, help="model name (default smollm2-135m)")
        p.add_argument("--text", default=None, help="a text file (default: the bundled Paul Graham essays)")
        p.add_argument("--context-tokens", type=positive, default=2048, help="prefix to compress (default 2048)")
        p.add_argument("--future-tokens", type=positive, default=64,
                       help="following tokens whose queries measure the error (default 64)")
        p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="auto: bfloat16 on GPUs, float32 on CPUs")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--out", required=True, help="folder for the JSON, Markdown and PNG")


def run_analyze_command(args) -> int:
    from pathlib import Path

    from ..analysis.common import analysis_tokens
    from ..analysis.eviction import eviction_study
    from ..analysis.outputs import write_eviction, write_reconstruction
    from ..analysis.reconstruction import reconstruction_study
    from ..models import load_model
    from ..report import environment

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        if tokenizer is None:
            raise ValueError(f"model must have a tokenizer to read a text (a bundled model or a directory), got {args.model!r}")
        ids = analysis_tokens(tokenizer, args.text, args.context_tokens, args.future_tokens)
        ids = ids.to(next(model.parameters()).device)
        meta = dict(model=args.model, dtype=args.dtype, text=args.text or "Paul Graham essays (RULER's haystack)",
                    context_tokens=args.context_tokens, future_tokens=args.future_tokens, environment=environment())
        out = Path(args.out)
        if args.analysis == "reconstruction":
            presses = [p for p in args.presses if p != "full"]
            result = reconstruction_study(model, ids, args.future_tokens, presses, list(args.ratios))
            print(write_reconstruction(result, out, meta))
            print(f"wrote {out}/reconstruction.json, reconstruction.md, reconstruction.png")
        else:
            layer = model.config.num_hidden_layers // 2 if args.layer is None else args.layer
            result = eviction_study(model, ids, args.future_tokens, layer, args.head)
            print(write_eviction(result, out, meta))
            print(f"wrote {out}/eviction.json, eviction.png")
    except ValueError as error:
        print(f"curdkv analyze: error: {error}", file=sys.stderr)
        return 2
    return 0
