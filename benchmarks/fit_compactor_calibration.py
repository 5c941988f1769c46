"""Fit Compactor's context-calibration curve for one model on RULER samples.

For each sample (a held-out seed, not the evaluation's), the context is
prefilled once; its token-averaged NLL comes from the same pass (a hook on
the decoder's output). For each retention ``r`` the cache is compressed by
Compactor to keep ``r`` of the tokens, and the NLL of the reference answer
after the question is measured; ``y = NLL(answer | full) / NLL(answer | r)``.
:func:`curdkv.presses.calibration.fit_calibration` fits ``alpha, beta`` to the
``(r, NLL(c), y)`` triples. The result is what
``compactor:calibration_alpha=A:calibration_beta=B`` takes, with
``--ratios calibrated:TOL`` in ``curdkv eval``.

    curdkv eval ruler --model qwen2.5-coder-0.5b --samples 3 --seed 1 --samples-only --out RUN
    python benchmarks/fit_compactor_calibration.py --samples-file RUN/samples.jsonl --out RUN/calibration.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import curdkv
from curdkv.attention.function import using_curdkv_attention
from curdkv.context import encode_context, encode_question
from curdkv.report import environment
from curdkv.transformers_compat import forward_with_cache
from curdkv.eval.sample import read_samples
from curdkv.presses import CompactorPress
from curdkv.runtime.nll import context_nll_from_hidden
from curdkv.presses.calibration import fit_calibration

RETENTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def answer_nll(model, cache, context_length: int, follow: torch.Tensor, answer_len: int) -> float:
    """Mean NLL of the last ``answer_len`` tokens of ``follow`` fed after the (compressed) context."""
    snapshot = cache.snapshot()
    try:
        positions = torch.arange(context_length, context_length + follow.shape[1], device=follow.device)[None]
        with using_curdkv_attention(model):
            logits = forward_with_cache(model, cache, input_ids=follow, position_ids=positions, use_cache=True).logits
    finally:
        cache.restore(snapshot)
    predicted = logits[:, -answer_len - 1 : -1].float()
    return float(F.cross_entropy(predicted.transpose(1, 2), follow[:, -answer_len:]))


@torch.no_grad()
def measure(model, tokenizer, sample, press: CompactorPress) -> list[dict]:
    device = next(model.parameters()).device
    ids = encode_context(tokenizer, sample.context, device)
    hidden = {}
    hook = model.get_decoder().register_forward_hook(lambda m, a, out: hidden.update(h=out.last_hidden_state))
    try:
        capture = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    finally:
        hook.remove()
    nll_context = float(context_nll_from_hidden(model, hidden.pop("h"), ids)[0])
    question = encode_question(tokenizer, sample.question, sample.answer_prefix, device, separator="")
    answer = tokenizer(", ".join(sample.answers), add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    follow = torch.cat([question, answer], dim=1)
    full = answer_nll(model, capture.build_cache(None), capture.seq_len, follow, answer.shape[1])
    rows = []
    for r in RETENTIONS:
        cache = capture.build_cache(press.with_ratio(1.0 - r))
        nll = answer_nll(model, cache, capture.seq_len, follow, answer.shape[1])
        rows.append({"task": sample.task, "index": sample.index, "retention": r, "context_nll": nll_context,
                     "answer_nll_full": full, "answer_nll": nll, "quality_ratio": full / max(nll, 1e-9)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-file", required=True)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = curdkv.load_model(args.model, dtype=args.dtype, device=device)
    press = CompactorPress()
    rows = []
    samples = read_samples(args.samples_file)
    for i, sample in enumerate(samples):
        rows += measure(model, tokenizer, sample, press)
        print(f"{i + 1}/{len(samples)} {sample.task} NLL(c) {rows[-1]['context_nll']:.3f} "
              + " ".join(f"{r['retention']:.1f}:{r['quality_ratio']:.2f}" for r in rows[-len(RETENTIONS):]), flush=True)
    curve = fit_calibration([r["retention"] for r in rows], [r["context_nll"] for r in rows],
                            [r["quality_ratio"] for r in rows])
    report = {
        "environment": environment(),
        "settings": {"model": args.model, "dtype": args.dtype, "press": press.describe(),
                     "samples": len(samples), "retentions": list(RETENTIONS)},
        "calibration_alpha": curve.alpha,
        "calibration_beta": curve.beta,
        "spec": f"compactor:calibration_alpha={curve.alpha:.6g}:calibration_beta={curve.beta:.6g}",
        "measurements": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(report["spec"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
