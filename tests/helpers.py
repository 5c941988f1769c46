"""Shortcuts the tests share that the library itself has no use for."""

from __future__ import annotations

import math
import sys

import torch
from conftest import tiny_model

from curdkv.attention.function import using_curdkv_attention
from curdkv.presses import ScoringView
from curdkv.runtime.layer import compress_layer
from curdkv.transformers_compat import forward_with_cache

B, H_KV = 2, 2  # batch and KV heads of make_states's states
# CurDKV's options to score states as cached: random states with no attention module carry no RoPE to undo.
CACHED_STATES = dict(key_space="post_rope", centre=False)


def compress_states(press, keys, values, queries, module, layer_idx: int):
    """Keep a uniform press's choice of tokens: returns ``(kept_keys, kept_values, evicted)``.

    keys, values: ``[B, H_kv, N, D]``; queries: ``[B, H, W, D]`` or ``None``.
    """
    layer = compress_layer(press, keys, values, queries, module, layer_idx, "dense")
    return layer.keys, layer.values, layer.evicted


def stored_lengths(cache) -> list[int]:
    """Tokens per head each layer of a compressed cache holds."""
    return [layer.stored_length for layer in cache.layers]


# --------------------------------------------------------------------------- states and references of the press tests


def make_states(n: int, d: int, seed: int, b: int = B, h: int = H_KV):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen)
    values = torch.randn(b, h, n, d, generator=gen)
    # Rows of different magnitudes so norms and leverages are well spread.
    keys = keys * (0.5 + torch.rand(b, h, n, 1, generator=gen))
    values = values * (0.5 + torch.rand(b, h, n, 1, generator=gen))
    return keys, values


def view_of(keys, values, queries=None, layer_idx=0) -> ScoringView:
    return ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=layer_idx)


def close(got: torch.Tensor, ref, rtol: float, atol: float) -> None:
    ref = torch.as_tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref.expand_as(got), rtol=rtol, atol=atol)


def ref_topk_indices(scores: torch.Tensor, n_keep: int, sinks: int = 0, recent: int = 0) -> list[int]:
    """Protected sinks and recent tokens, then the highest remaining scores."""
    n = len(scores)
    protected = set(range(min(sinks, n))) | set(range(max(n - recent, 0), n))
    rest = [j for j in range(n) if j not in protected]
    rest.sort(key=lambda j: -float(scores[j]))
    return sorted(protected | set(rest[: n_keep - len(protected)]))


def _view(n=40, d=8, h_kv=2, group=2, w=6, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h_kv, n, d, generator=g)
    values = torch.randn(b, h_kv, n, d, generator=g)
    queries = torch.randn(b, h_kv * group, w, d, generator=g)
    return ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=0)


def _softmax_row(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


# --------------------------------------------------------------------------- head-adaptive selection and greedy decoding


def slow_adaptive(scores: torch.Tensor, n_keep: int, alpha: float, sinks: int, recent: int) -> torch.Tensor:
    """AdaKV selection written out token by token: the obvious reference."""
    b, h, n = scores.shape
    keep = torch.zeros(b, h, n, dtype=torch.bool)
    protected = set(range(sinks)) | set(range(n - recent, n))
    for bi in range(b):
        # Rank key: protected first, then by score; ties broken by the lower flat position.
        def rank(hi, j):
            return (j in protected, float(scores[bi, hi, j]))

        safeguard = int(alpha * n_keep + 1e-9)
        for hi in range(h):
            order = sorted(range(n), key=lambda j: rank(hi, j), reverse=True)
            for j in order[:safeguard]:
                keep[bi, hi, j] = True
        rest = [(rank(hi, j), hi, j) for hi in range(h) for j in range(n) if not keep[bi, hi, j]]
        rest.sort(key=lambda item: item[0], reverse=True)
        for _, hi, j in rest[: h * (n_keep - safeguard)]:
            keep[bi, hi, j] = True
    return keep


def greedy(model, ids: torch.Tensor, cache, steps: int) -> list[list[int]]:
    n = ids.shape[1]
    token = model(input_ids=ids).logits[:, -1].argmax(-1)
    tokens = [token.tolist()]
    with using_curdkv_attention(model):
        for step in range(steps - 1):
            pos = torch.full((ids.shape[0], 1), n + step, device=ids.device)
            token = forward_with_cache(model, cache, input_ids=token[:, None], use_cache=True, position_ids=pos).logits[
                :, -1
            ].argmax(-1)
            tokens.append(token.tolist())
    return tokens


def attention_module(arch: str):
    return tiny_model(arch).model.layers[0].self_attn


def rotate(pre: torch.Tensor, arch: str) -> torch.Tensor:
    """Post-RoPE keys from pre-RoPE ``[B, H, N, D]`` by the model's own rotary embedding and rotation."""
    model = tiny_model(arch)
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    positions = torch.arange(pre.shape[2])[None].expand(pre.shape[0], -1)
    cos, sin = model.model.rotary_emb(pre, positions)
    _, post = module.apply_rotary_pos_emb(pre, pre, cos, sin)
    return post
