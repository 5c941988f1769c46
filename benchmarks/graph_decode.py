"""Decode speed over compressed caches, replayed as CUDA graphs, against what a user would pick and the bytes' limit.

Three parts (``--parts``), each a list of records in one JSON:

- ``batch1``: ms/token at batch 1 for every context length, for the full
  cache and each press, decoded by curdkv's CUDA-graph replay
  (``graph_ms``) and by the eager loop (``eager_ms``), beside transformers'
  static cache with its compiled decode step (``generate`` with
  ``cache_implementation="static"``, which compiles the forward in
  "reduce-overhead" mode). transformers' static cache attends over its whole
  capacity with a mask at every step, so its step time does not depend on
  how much of the capacity is filled: it is measured with a short prompt
  and a capacity of the context length.
- ``throughput``: at one length, the largest batch of one compressed context
  repeated that fits in the GPU's memory, and tokens/s at that batch.
- ``mixed``: many contexts of different lengths, presses and ratios through
  ``curdkv.ask_many``, tokens/s, and agreement with asking each alone; beside
  it the same batch with each question prefilled eagerly on its own row first.

``--gemv torch,grouped,all`` measures ``batch1``'s replayed step once per
route of the lean step's matrix products (:mod:`curdkv.runtime.lean_step`):
``graph_ms_by_gemv``; ``graph_ms`` is the first route's. ``--gemv-config``
takes the block sizes ``benchmarks/gemv_micro.py`` found fastest.

``limit_ms`` is the bandwidth limit of a step: the bytes it must read (the
weights, less the input embedding, of which a step reads one row, plus the
held keys and values) at the measured copy bandwidth, read once.

    python benchmarks/graph_decode.py --parts batch1 --lengths 32768 --out results/decode/batch1-32k.json
    python benchmarks/graph_decode.py --parts batch1 --lengths 32768 --gemv torch,grouped,all --graph-only \
        --no-hf --gemv-config results/decode/gemv_micro.json --out results/decode/batch1-gemv.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import curdkv
from curdkv.bench.timing import copy_bandwidth, decode_seconds_per_token, replayed_seconds_per_token
from curdkv.cache.dense import CompressedCache
from curdkv.cache.stack import stack_caches
from curdkv.context import CompressedContext, ask_many, decode_rows, fold_questions
from curdkv.kernels import gemv
from curdkv.presses import get_press
from curdkv.report import environment
from curdkv.runtime import graph_decode
from curdkv.runtime.hooks import compress
from curdkv.runtime.lean_step import DEFAULT_GEMV, GEMV_MODES, using_gemv
from curdkv.transformers_compat import forward_with_cache

CONFIGS = [("full", 0.0), ("curdkv", 0.5), ("curdkv", 0.9), ("adacurdkv", 0.9)]


class CharTokenizer:
    """Questions for a random-weight model: one token per character; answers read as token ids."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=True, return_tensors="pt"):
        return argparse.Namespace(input_ids=torch.tensor([[ord(c) % self.vocab_size for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def weight_bytes_read(model) -> int:
    """Bytes of the parameters one decode step reads: all but the input embedding (one row of it)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if tied or p.data_ptr() != embedding.data_ptr())


def random_ids(vocab: int, n: int, seed: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)


def graph_ms(model, cache, context_length: int, steps: int, lean: bool | None = None) -> float:
    """Milliseconds per replayed step over ``cache`` (batch = its rows), after the first step and the capture."""
    return replayed_seconds_per_token(model, cache, context_length, steps, lean) * 1000


def eager_ms(model, cache, context_length: int, steps: int) -> float:
    first = torch.zeros(cache.layers[0].keys.shape[0], 1, dtype=torch.int64, device=cache.layers[0].keys.device)
    decode_seconds_per_token(model, cache, first, context_length, 2)
    return decode_seconds_per_token(model, cache, first, context_length, steps) * 1000


def hf_static_compiled_ms(model, capacity: int, steps: int) -> float:
    """transformers' static cache + compiled decode step (its auto-compile in ``generate``), ms/token."""
    from transformers import StaticCache

    prompt = random_ids(model.config.vocab_size, 16, 1, model.device)

    def run(new_tokens: int) -> float:
        cache = StaticCache(config=model.config, max_cache_len=capacity)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(8)  # compiles
    run(8)
    short, long = run(8), run(8 + steps)
    return (long - short) / steps * 1000


def batch1(model, args, bandwidth: float, weights: int) -> list[dict]:
    records = []
    for n in args.lengths:
        ids = random_ids(model.config.vocab_size, n, n, model.device)
        capture = curdkv.capture_prefill(model, ids)
        for method, ratio in CONFIGS:
            cache = capture.build_cache(None if method == "full" else get_press(method, ratio))
            kv = cache.nbytes()
            limit = (weights + kv) / bandwidth * 1000
            by_gemv, agreed = {}, {}
            for route in args.gemv:
                graph_decode._LEAN_CHECKED.pop(model, None)  # each route's step is compared with transformers'
                with using_gemv(route):
                    by_gemv[route] = graph_ms(model, cache, n, args.steps)
                agreed[route] = graph_decode._LEAN_CHECKED.get(model)
            first = args.gemv[0]
            record = dict(part="batch1", length=n, method=method, ratio=ratio, kv_bytes=kv, limit_ms=limit,
                          graph_ms=by_gemv[first], gemv=first, graph_ms_by_gemv=by_gemv,
                          graph_over_limit_by_gemv={r: ms / limit for r, ms in by_gemv.items()})
            if not args.graph_only:
                record["graph_transformers_forward_ms"] = graph_ms(model, cache, n, args.steps, lean=False)
                record["eager_ms"] = eager_ms(model, cache, n, min(args.steps, 16))
            record["graph_over_limit"] = record["graph_ms"] / record["limit_ms"]
            record["lean_step_agreed"] = agreed[first]
            record["lean_step_agreed_by_gemv"] = agreed
            records.append(record)
            print(json.dumps(record), flush=True)
            del cache
        del capture
        torch.cuda.empty_cache()
        if args.hf:
            ms = hf_static_compiled_ms(model, n + args.steps + 32, args.steps)
            full_kv = [r for r in records if r["length"] == n and r["method"] == "full"][0]["kv_bytes"]
            record = dict(part="batch1", length=n, method="transformers-static-compiled", ratio=0.0,
                          kv_bytes=full_kv, limit_ms=(weights + full_kv) / bandwidth * 1000, graph_ms=ms,
                          compiled=hasattr(model, "_compiled_call"))
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def largest_batch(model, cache, n: int, steps: int, reserve: int) -> tuple[int, float]:
    """The largest number of rows of ``cache`` that fits beside ``reserve`` free bytes, and ms/step there."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    per_row = cache.nbytes()
    rows = max(1, int((free - reserve) // per_row))
    while rows >= 1:
        try:
            stacked = stack_caches([cache] * rows, n)
            ms = graph_ms(model, stacked, n, steps)
            del stacked
            return rows, ms
        except torch.OutOfMemoryError:
            stacked = None
            torch.cuda.empty_cache()
            rows = int(rows * 0.9)
    raise RuntimeError("not even one row fits")


def throughput(model, args, bandwidth: float, weights: int) -> list[dict]:
    n = args.throughput_length
    ids = random_ids(model.config.vocab_size, n, n, model.device)
    capture = curdkv.capture_prefill(model, ids)
    caches = {(m, r): capture.build_cache(None if m == "full" else get_press(m, r))
              for m, r in [("full", 0.0), ("curdkv", 0.9), ("adacurdkv", 0.9)]}
    del capture
    records = []
    for (method, ratio), cache in list(caches.items()):
        others = sum(c.nbytes() for key, c in caches.items() if key != (method, ratio))
        rows, ms = largest_batch(model, cache, n, args.steps, args.reserve_gib * 2**30)
        kv = cache.nbytes() * rows
        record = dict(part="throughput", length=n, method=method, ratio=ratio, batch=rows, ms_per_step=ms,
                      tokens_per_s=rows / ms * 1000, kv_bytes=kv, limit_ms=(weights + kv) / bandwidth * 1000,
                      other_caches_held_bytes=others)
        records.append(record)
        print(json.dumps(record), flush=True)
    full = [r for r in records if r["method"] == "full"][0]["tokens_per_s"]
    for r in records:
        r["tokens_per_s_over_full"] = r["tokens_per_s"] / full
    return records


MIXED_PRESSES = [("curdkv", 0.9), ("adacurdkv", 0.9), ("snapkv", 0.8), ("streamingllm", 0.9), ("curdkv", 0.8),
                 ("adacurdkv", 0.95), ("knorm", 0.9), ("curdkv", 0.95)]


def mixed(model, args, bandwidth: float, weights: int) -> list[dict]:
    tokenizer = CharTokenizer(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    lo, hi = math.log(args.mixed_min), math.log(args.mixed_max)
    lengths = [int(math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g)))) for _ in range(args.mixed_count)]
    contexts, start = [], time.perf_counter()
    for i, n in enumerate(lengths):
        method, ratio = MIXED_PRESSES[i % len(MIXED_PRESSES)]
        press = get_press(method, ratio)
        cache = CompressedCache()
        with compress(model, press):
            forward_with_cache(model, cache, input_ids=random_ids(model.config.vocab_size, n, i, model.device),
                               use_cache=True, logits_to_keep=1)
        contexts.append(CompressedContext(model, tokenizer, cache, n, press))
    prefill_s = time.perf_counter() - start
    requests = [(ctx, f"question {i}: what is the value?") for i, ctx in enumerate(contexts)]
    ask_many(requests[:2], 4)  # compiles the kernels of this batch's shapes
    torch.cuda.synchronize()
    start = time.perf_counter()
    together = ask_many(requests, args.steps)  # the questions read by the replayed step, every row at once
    torch.cuda.synchronize()
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    folded = fold_questions(requests)  # the alternative: each question prefilled eagerly on its own row
    torch.cuda.synchronize()
    fold_s = time.perf_counter() - start
    prefilled = decode_rows(model, tokenizer, *folded, args.steps)
    torch.cuda.synchronize()
    prefilled_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [ctx.ask(q, args.steps) for ctx, q in requests]
    torch.cuda.synchronize()
    alone_s = time.perf_counter() - start
    tokens = sum(len(a.split()) for a in together)
    same = sum(a == b for a, b in zip(together, alone))
    agree = [sum(x == y for x, y in zip(a.split(), b.split())) / max(len(b.split()), 1) for a, b in zip(together, alone)]
    first = sum(a.split()[:1] == b.split()[:1] for a, b in zip(together, alone))
    record = dict(part="mixed", contexts=len(requests), lengths=lengths,
                  presses=[f"{c.press.name}@{c.press.compression_ratio}" for c in contexts],
                  kv_bytes=sum(c.nbytes() for c in contexts), max_new_tokens=args.steps, prefill_s=prefill_s,
                  ask_many_s=batch_s, tokens=tokens, tokens_per_s=tokens / batch_s,
                  questions_prefilled_s=prefilled_s, question_prefill_s=fold_s,
                  decode_after_prefilled_questions_s=prefilled_s - fold_s,
                  prefilled_answers_identical=sum(a == b for a, b in zip(prefilled, alone)),
                  one_at_a_time_s=alone_s, one_at_a_time_tokens_per_s=tokens / alone_s,
                  answers_identical=same, first_tokens_identical=first, mean_token_agreement=sum(agree) / len(agree))
    print(json.dumps({k: v for k, v in record.items() if k not in ("lengths", "presses")}), flush=True)
    return [record]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--parts", default="batch1,throughput,mixed")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' static+compile baseline")
    parser.add_argument("--throughput-length", type=int, default=32768)
    parser.add_argument("--reserve-gib", type=float, default=6.0, help="memory left free for activations")
    parser.add_argument("--mixed-count", type=int, default=64)
    parser.add_argument("--mixed-min", type=int, default=4096)
    parser.add_argument("--mixed-max", type=int, default=65536)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--gemv", default=DEFAULT_GEMV, help=f"batch1: the lean step's product routes to time, "
                        f"comma-separated, of {', '.join(GEMV_MODES)}")
    parser.add_argument("--gemv-config", help="a gemv_micro.py JSON: use its fastest block sizes")
    parser.add_argument("--graph-only", action="store_true",
                        help="batch1: skip the eager loop and the replayed transformers forward")
    parser.add_argument("--out", default="results/decode/graph_decode.json")
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.gemv = args.gemv.split(",")
    if set(args.gemv) - set(GEMV_MODES):
        raise SystemExit(f"--gemv: unknown {sorted(set(args.gemv) - set(GEMV_MODES))}; choose from {GEMV_MODES}")
    if args.gemv_config:
        best = json.loads(Path(args.gemv_config).read_text())["best"]
        gemv.CONFIG.update({key: tuple(b["config"]) for key, b in best.items()})
    args.gemv_block_sizes = {key: list(c) for key, c in gemv.CONFIG.items()}
    parts = args.parts.split(",")
    unknown = set(parts) - {"batch1", "throughput", "mixed"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from batch1, throughput, mixed")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA-graph decoding: run it on a CUDA machine")
    model, _ = curdkv.load_model(args.model, dtype=args.dtype, device="cuda")
    weights = weight_bytes_read(model)
    bandwidth = copy_bandwidth(2 * 2**30, model.device)
    records = []
    with torch.no_grad():
        for part in parts:
            records += {"batch1": batch1, "throughput": throughput, "mixed": mixed}[part](model, args, bandwidth,
                                                                                        weights)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(environment=environment(), settings=vars(args), copy_bandwidth_bytes_per_s=bandwidth,
                  weight_bytes_read=weights, records=records)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
