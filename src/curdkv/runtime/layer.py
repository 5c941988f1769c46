"""One layer's compression: the press's scores, the selection's choice, the cache layer that keeps it.

:func:`compress_layer` is the step both paths share (:func:`curdkv.compress`
during prefill, :meth:`PrefillCapture.build_cache` in sweeps); ``layout``
picks dense, ragged or masked storage.
"""

from __future__ import annotations

import torch

from ..cache.dense import CompressedLayer
from ..cache.gather import gather_kv_tokens
from ..cache.masked import MaskedLayer
from ..cache.ragged import RaggedLayer
from ..kernels.common import on_kernel_device
from ..presses.base import Press, ScoringView, check_choice
from ..selection import NaNScores, check_not_empty, select_adaptive, select_uniform
from .model import num_layers
from .overlap import empty_head_message, layer_problems, nan_message

LAYOUTS = ("dense", "ragged", "masked")


def layer_scores(
    press: Press, keys, values, queries, module, layer_idx: int, positions=None, pseudo_queries=None,
    reconstruction=None,
) -> torch.Tensor:
    """The press's scores ``[B, H_kv, N]`` for one layer, shape-checked."""
    view = ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=layer_idx,
                       positions=positions, pseudo_queries=pseudo_queries, reconstruction=reconstruction)
    scores = press.score(view)
    if tuple(scores.shape) != tuple(keys.shape[:3]):
        raise ValueError(
            f"{type(press).__name__}.score returned shape {tuple(scores.shape)}, expected {tuple(keys.shape[:3])}"
        )
    return scores


def fast_ragged(keys: torch.Tensor) -> bool:
    """Whether the ragged layout has its fast kernel here (CUDA + Triton).

    There, uniform presses use it too: appended tokens go into a preallocated
    tail instead of re-concatenating the whole kept cache at every decoding
    step, and attention reads the kept tokens once. On CPU the dense layout
    with PyTorch's sdpa is faster than the ragged reference.
    """
    if not on_kernel_device(keys):
        return False
    from ..kernels.ragged_attention import triton_available

    return triton_available()


def _nan_report(press: Press, scores, layer_idx: int, keys, values, queries) -> str:
    """Which press, layer and heads produced NaN scores, and whether what it read was finite."""
    inputs = ", ".join(f"{name} {'finite' if bool(torch.isfinite(t).all()) else 'NOT finite'}"
                       for name, t in (("keys", keys), ("values", values), ("queries", queries)) if t is not None)
    return nan_message(press, layer_idx, torch.isnan(scores).sum(-1), keys.shape[2], inputs)


def compress_layer(
    press: Press, keys, values, queries, module, layer_idx: int, layout: str | None = None,
    scores: torch.Tensor | None = None, n_keep: int | None = None, problems: list | None = None,
):
    """One layer's compressed cache: a :class:`CompressedLayer`, :class:`RaggedLayer` or :class:`MaskedLayer`.

    ``layout``: ``"dense"`` (uniform presses; their default on CPU),
    ``"ragged"`` (each head its own kept tokens; the default for head-adaptive
    presses, and for every press on CUDA with Triton) or ``"masked"`` (everything stored, evicted entries hidden: the
    reference layout, which saves no memory). ``scores`` and ``n_keep``
    (tokens per head) default to the press's own at this layer.
    ``problems``: on CUDA, a list to append this layer's checks to (NaN
    scores, heads left empty) instead of reading them back here
    (:mod:`curdkv.runtime.overlap`); the caller raises them later.
    """
    adaptive = press.head_adaptive
    layout = layout or ("ragged" if adaptive or fast_ragged(keys) else "dense")
    check_choice("layout", layout, LAYOUTS)
    if layout == "dense" and adaptive:
        raise ValueError(f"layout must be 'ragged' or 'masked' for the head-adaptive press {press.name!r}, got 'dense'")
    n = keys.shape[2]
    check_not_empty(n)
    if n_keep is None:
        n_keep = press.layer_keep(n, layer_idx, num_layers(module))
    if n_keep >= n:
        return CompressedLayer.from_states(keys, values, 0)
    if scores is None:
        scores = layer_scores(press, keys, values, queries, module, layer_idx)
    # On the GPU the checks wait until the layer's selection and copies are
    # queued: reading a flag earlier would drain the queue mid-layer and leave
    # the GPU idle while the host launches the rest.
    deferred = on_kernel_device(keys)
    chosen = select_tokens(press, keys, values, queries, module, layer_idx, scores=scores, n_keep=n_keep,
                           check_nan=not deferred)
    layer, empty_heads = _layer_from_choice(chosen, keys, values, layout, adaptive, n_keep)
    if deferred and problems is not None:
        problems.append(layer_problems(press, layer_idx, scores, empty_heads))
        return layer
    if deferred and bool(torch.isnan(scores).any()):  # on CPU, select_tokens refused NaN already
        raise ValueError(_nan_report(press, scores, layer_idx, keys, values, queries))
    if empty_heads is not None and bool(empty_heads.any()):
        raise ValueError(empty_head_message(layer_idx))
    return layer


def _layer_from_choice(chosen: torch.Tensor, keys, values, layout: str, adaptive: bool, n_keep: int):
    """The layer keeping ``chosen`` (sorted indices, or a head-adaptive keep mask), and which heads
    kept nothing (``[B, H_kv]`` bool on the device; ``None`` where every head keeps the same count)."""
    n = keys.shape[2]
    if adaptive:
        keep = chosen
    elif layout == "dense":
        kept_keys, kept_values = gather_kv_tokens(keys, values, chosen)
        return CompressedLayer.from_states(kept_keys, kept_values, n - chosen.shape[-1]), None
    elif layout == "ragged":
        return RaggedLayer.from_dense(*gather_kv_tokens(keys, values, chosen), n), None
    else:
        keep = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device).scatter_(-1, chosen, True)
    if layout == "masked":
        return MaskedLayer.from_mask(keys, values, keep), keep.sum(-1) == 0
    # Only a head-adaptive selection gets here, and it keeps exactly its budget
    # per batch element: the packed size is known without reading a count back.
    layer = RaggedLayer.from_mask(keys, values, keep, total=keys.shape[0] * keys.shape[1] * n_keep)
    return layer, layer.empty_heads()


def select_tokens(
    press: Press, keys, values, queries, module, layer_idx: int,
    scores: torch.Tensor | None = None, n_keep: int | None = None, positions: torch.Tensor | None = None,
    check_nan: bool = True,
) -> torch.Tensor:
    """The press's choice at one layer: sorted kept indices ``[B, H_kv, k]`` for a uniform
    press, a keep mask ``[B, H_kv, N]`` for a head-adaptive one.

    ``n_keep`` (tokens per head) defaults to the press's budget at this layer;
    ``positions`` are the cached tokens' RoPE positions when not ``0 .. N-1``.
    """
    n = keys.shape[2]
    check_not_empty(n)
    if n_keep is None:
        n_keep = press.layer_keep(n, layer_idx, num_layers(module))
    if scores is None:
        scores = layer_scores(press, keys, values, queries, module, layer_idx, positions)
    sinks, recent = press.protected_sinks, press.protected_recent
    try:
        if press.head_adaptive:
            return select_adaptive(scores, n_keep, press.alpha, sinks, recent, check_nan)
        return select_uniform(scores, n_keep, sinks, recent, check_nan)
    except NaNScores:
        raise ValueError(_nan_report(press, scores, layer_idx, keys, values, queries)) from None


def kept_mask(press: Press, keys, values, queries, module, layer_idx: int) -> torch.Tensor:
    """Which context tokens each KV head keeps at one layer: bool ``[B, H_kv, N]``."""
    if press.layer_keep(keys.shape[2], layer_idx, num_layers(module)) >= keys.shape[2]:
        return torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    chosen = select_tokens(press, keys, values, queries, module, layer_idx)
    if chosen.dtype == torch.bool:
        return chosen
    return torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device).scatter_(-1, chosen, True)
