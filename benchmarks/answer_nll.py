"""How much each press costs the gold answer: its teacher-forced NLL over the compressed cache.

Exact match is a step function: on a few samples of a hard task (RULER's
niah_multikey_3) every press scores 0 and nothing separates them. The mean
negative log-likelihood of the gold answer's tokens, read after the question
over each press's cache, moves continuously, so a handful of samples on a CPU
already ranks presses. Each sample is prefilled once (every context query is
kept) and every press and ratio is built from that capture.

    python benchmarks/answer_nll.py --samples-file RUN/samples.jsonl \\
        --tasks niah_multikey_3,niah_multikey_2 --limit 3 \\
        --presses curdkv,kvzip,kvzip-layerwise --ratios 0.5,0.7 --out nll.json

``RUN/samples.jsonl`` comes from ``curdkv eval ruler ... --samples-only``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import curdkv
from curdkv.attention.function import using_curdkv_attention
from curdkv.context import encode_context, encode_question
from curdkv.presses import get_press
from curdkv.presses.base import ALL_QUERIES
from curdkv.report import environment
from curdkv.transformers_compat import forward_with_cache


@torch.no_grad()
def answer_scores(model, cache, context_length: int, question: torch.Tensor, answer: torch.Tensor) -> dict:
    """NLL and teacher-forced token accuracy of ``answer [1, A]`` after ``question [1, Q]``; the cache is restored."""
    ids = torch.cat([question, answer], dim=1)
    positions = torch.arange(context_length, context_length + ids.shape[1], device=ids.device)[None]
    snapshot = cache.snapshot()
    try:
        with using_curdkv_attention(model):
            logits = forward_with_cache(model, cache, input_ids=ids, position_ids=positions, use_cache=True).logits
    finally:
        cache.restore(snapshot)
    # The logit at position t predicts token t + 1: the answer's tokens are predicted from Q - 1 on.
    predicting = logits[0, question.shape[1] - 1 : -1].float()
    nll = -predicting.log_softmax(-1).gather(-1, answer[0, :, None])[:, 0]
    if not torch.isfinite(nll).all():
        raise ValueError("the answer's NLL is not finite: the compressed cache produced NaN or inf logits")
    return dict(nll=float(nll.mean()), token_accuracy=float((predicting.argmax(-1) == answer[0]).float().mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--samples-file", required=True, help="samples.jsonl of `curdkv eval ruler --samples-only`")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks to keep (default: all in the file)")
    parser.add_argument("--limit", type=int, default=3, help="samples per task")
    parser.add_argument("--presses", default="curdkv,kvzip")
    parser.add_argument("--ratios", default="0.5,0.7")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="answer_nll.json")
    args = parser.parse_args()

    ratios = [float(r) for r in args.ratios.split(",")]
    specs = args.presses.split(",")
    for spec in specs:  # bad names and options fail here, before the model loads
        get_press(spec, ratios[0])
    tasks = None if args.tasks is None else set(args.tasks.split(","))
    samples, per_task = [], {}
    for line in Path(args.samples_file).read_text().splitlines():
        sample = json.loads(line)
        if (tasks is None or sample["task"] in tasks) and per_task.get(sample["task"], 0) < args.limit:
            per_task[sample["task"]] = per_task.get(sample["task"], 0) + 1
            samples.append(sample)
    if not samples:
        raise SystemExit(f"no samples of tasks {sorted(tasks or [])} in {args.samples_file}")

    model, tokenizer = curdkv.load_model(args.model, dtype=getattr(torch, args.dtype))
    device = next(model.parameters()).device
    configs = [("full", 0.0)] + [(spec, ratio) for spec in specs for ratio in ratios]
    records = []
    for sample in samples:
        start = time.perf_counter()
        context = encode_context(tokenizer, sample["context"], device)
        capture = curdkv.capture_prefill(model, context, tokenizer, query_window=ALL_QUERIES)
        question = encode_question(tokenizer, sample["question"], sample["answer_prefix"], device)
        answer = tokenizer(" " + sample["answers"][0], add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        for spec, ratio in configs:
            cache = capture.build_cache(None if spec == "full" else get_press(spec, ratio))
            scores = answer_scores(model, cache, context.shape[1], question, answer)
            records.append(dict(task=sample["task"], index=sample["index"], press=spec, ratio=ratio, **scores))
        print(f"{sample['task']} #{sample['index']}: {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{'press':<32} {'ratio':>5} {'mean NLL':>9} {'token acc':>9}")
    for spec, ratio in dict.fromkeys((r["press"], r["ratio"]) for r in records):
        rows = [r for r in records if r["press"] == spec and r["ratio"] == ratio]
        print(f"{spec:<32} {ratio:>5.2f} {statistics.mean(r['nll'] for r in rows):>9.3f} "
              f"{statistics.mean(r['token_accuracy'] for r in rows):>9.2f}")
    Path(args.out).write_text(json.dumps(dict(environment=environment(), settings=vars(args), records=records),
                                         indent=1))


if __name__ == "__main__":
    main()
