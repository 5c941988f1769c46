"""Attention received versus the damage of evicting a token (CurDKV paper, Figure 1).

For one layer and query head, each prefix token ``j`` gets its mean
attention from the continuation's queries and the output error of
evicting it alone. With ``O_i`` the attention output of query ``i`` and
``a_ij`` its attention to ``j``, removing ``j`` renormalises the rest:
``O'_i = (O_i − a_ij v_j) / (1 − a_ij)``, so ``O_i − O'_i = a_ij (v_j − O_i) / (1 − a_ij)``
and the error ``‖O − O'‖_F / ‖O‖_F`` needs no extra attention pass.
A low rank correlation between the two is the paper's case against
attention-score eviction.
"""

from __future__ import annotations

import torch

from ..context import capture_prefill
from .common import expand_kv, full_attention


def eviction_errors(queries, keys, values, prefix: int, scaling: float):
    """Per prefix token: mean attention ``[B, H, N]`` and single-eviction output error ``[B, H, N]``."""
    _, probs, out = full_attention(queries, keys, values, scaling, prefix)
    a = probs[..., :prefix]  # [B, H, M, N]
    v = expand_kv(values.float(), queries.shape[1])[:, :, :prefix]  # [B, H, N, D]
    # ‖v_j − O_i‖² = ‖v_j‖² − 2 v_j·O_i + ‖O_i‖², for every (i, j) without an [M, N, D] tensor.
    dist2 = (v.square().sum(-1)[:, :, None, :] - 2 * out @ v.transpose(-1, -2)
             + out.square().sum(-1)[..., None]).clamp_min(0)
    weight = (a / (1 - a).clamp_min(1e-12)).square()
    error = (weight * dist2).sum(2).sqrt() / out.flatten(-2).norm(dim=-1)[..., None]
    return a.mean(2), error


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no tie correction: the values are continuous)."""
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


@torch.no_grad()
def eviction_study(model, ids: torch.Tensor, future_tokens: int, layer: int, head: int) -> dict:
    """Mean attention and eviction error of every prefix token at ``layer``/``head`` (a query head)."""
    num_layers = model.config.num_hidden_layers
    num_heads = model.config.num_attention_heads
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers - 1}], got {layer}")
    if not 0 <= head < num_heads:
        raise ValueError(f"head must be a query head in [0, {num_heads - 1}], got {head}")
    prefix = ids.shape[1] - future_tokens
    capture = capture_prefill(model, ids, query_window=future_tokens)
    k, v, q = capture.keys[layer], capture.values[layer], capture.queries[layer]
    attention, error = eviction_errors(q[:, :, -future_tokens:], k, v, prefix, capture.modules[layer].scaling)
    attention, error = attention[0, head], error[0, head]
    return {
        "layer": layer, "head": head, "context_tokens": prefix, "future_tokens": future_tokens,
        "mean_attention": attention.tolist(), "eviction_error": error.tolist(),
        "spearman": spearman(attention, error),
    }
