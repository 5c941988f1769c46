"""Attention reconstruction error under compression (CurDKV paper, Figure 2).

The prefix is compressed by each press; the queries of the following
tokens (those of the full model: every layer is measured against the same
inputs) then attend to the compressed prefix plus, causally, the
continuation itself. Per layer and query head:

- logit error ``‖QKᵀ − QK'ᵀ‖_F / ‖QKᵀ‖_F`` over the prefix columns, where
  ``K'`` is ``K`` with evicted rows set to zero (their logits count as 0,
  the paper's selection-matrix form ``K' = S K``);
- output error ``‖softmax(QKᵀ)V − softmax(QK'ᵀ)V'‖_F / ‖softmax(QKᵀ)V‖_F``
  with evicted tokens removed from the softmax, as the compressed cache
  really attends.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..presses import get_press
from ..context import capture_prefill
from ..runtime.layer import kept_mask
from .common import expand_kv, full_attention


def attention_errors(queries, keys, values, keep, scaling: float):
    """Logit and output errors per query head: two float32 ``[B, H]`` tensors.

    queries ``[B, H, M, D]`` follow the prefix; keys/values
    ``[B, H_kv, N + M, D]``; keep ``[B, H_kv, N]`` says which prefix tokens
    each KV head kept.
    """
    prefix = keep.shape[-1]
    logits, _, out = full_attention(queries, keys, values, scaling, prefix)
    kept = expand_kv(keep, queries.shape[1])[:, :, None, :]  # [B, H, 1, N]
    prefix_logits = logits[..., :prefix]
    logit_err = (prefix_logits * ~kept).flatten(-2).norm(dim=-1) / prefix_logits.flatten(-2).norm(dim=-1)
    masked = logits.clone()
    masked[..., :prefix] = prefix_logits.masked_fill(~kept, float("-inf"))
    v = expand_kv(values.float(), queries.shape[1])
    out_c = masked.softmax(-1) @ v
    out_err = (out - out_c).flatten(-2).norm(dim=-1) / out.flatten(-2).norm(dim=-1)
    return logit_err, out_err


@torch.no_grad()
def reconstruction_study(model, ids: torch.Tensor, future_tokens: int, presses: list[str], ratios: list[float]) -> dict:
    """Rows ``{press, compression_ratio, layer, head, logit_error, output_error}`` plus averages.

    ``ids [1, N + future_tokens]``: the prefix to compress and its continuation.
    """
    if not presses or not ratios:
        raise ValueError("presses and ratios must each name at least one value")
    configs = [(spec, ratio, get_press(spec, ratio)) for spec in presses for ratio in ratios]
    window = max(p.query_window for _, _, p in configs)
    prefix = ids.shape[1] - future_tokens
    if prefix <= window:
        raise ValueError(f"the prefix has {prefix} tokens; it must be longer than the presses' window of {window}")
    capture = capture_prefill(model, ids, query_window=future_tokens + window)  # window, then continuation
    rows = []
    for layer in range(capture.num_layers):
        k, v, q = capture.keys[layer], capture.values[layer], capture.queries[layer]
        future_q, window_q = q[:, :, -future_tokens:], q[:, :, :-future_tokens]
        module = capture.modules[layer]
        for spec, ratio, press in configs:
            press_q = window_q[:, :, window_q.shape[2] - press.query_window:] if press.query_window else None
            keep = kept_mask(press, k[:, :, :prefix], v[:, :, :prefix], press_q, module, layer)
            logit_err, out_err = attention_errors(future_q, k, v, keep, module.scaling)
            for head in range(logit_err.shape[1]):
                rows.append(dict(press=spec, compression_ratio=ratio, layer=layer, head=head,
                                 logit_error=float(logit_err[0, head]), output_error=float(out_err[0, head])))
    return {"rows": rows, "summary": summarise(rows), "per_layer": per_layer(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean errors over layers and heads, per press and ratio."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["press"], r["compression_ratio"]].append(r)
    return [
        dict(press=p, compression_ratio=c,
             logit_error=sum(r["logit_error"] for r in g) / len(g),
             output_error=sum(r["output_error"] for r in g) / len(g))
        for (p, c), g in groups.items()
    ]


def per_layer(rows: list[dict]) -> list[dict]:
    """Mean errors over heads, per press, ratio and layer."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["press"], r["compression_ratio"], r["layer"]].append(r)
    return [
        dict(press=p, compression_ratio=c, layer=l,
             logit_error=sum(r["logit_error"] for r in g) / len(g),
             output_error=sum(r["output_error"] for r in g) / len(g))
        for (p, c, l), g in groups.items()
    ]
