"""The model's RoPE, undone or averaged: for presses that reason about pre-RoPE keys and queries.

Computed from the attention module's config with transformers' own
initialisation functions, so every scaled RoPE type transformers implements
(linear, dynamic NTK, YaRN, Llama 3) is honoured.
"""

from __future__ import annotations

import sys

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..kernels.decode_step import rotate_half


def _standard_rope_init(config) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def _default_rope_init(module):
    """The model family's own default-RoPE function (``*RotaryEmbedding.compute_default_rope_parameters``).

    transformers 5 keeps the plain RoPE out of ``ROPE_INIT_FUNCTIONS``; each
    modelling file defines it on its rotary class, so it is looked up there.
    """
    family = sys.modules.get(type(module).__module__)
    for obj in vars(family).values() if family is not None else ():
        if isinstance(obj, type) and callable(getattr(obj, "compute_default_rope_parameters", None)):
            return obj.compute_default_rope_parameters
    return _standard_rope_init


def rope_frequencies(module, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies ``[D / 2]`` (float32) and the cos/sin factor of ``module``'s RoPE.

    Computed from ``module.config.rope_parameters`` with transformers' own
    initialisation functions, as the model's rotary embedding does at a first
    prefill of ``seq_len`` tokens (dynamic NTK scaling depends on it).
    """
    if module is None:
        raise ValueError("undoing RoPE needs the attention module (ScoringView.module), got None")
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"undoing RoPE needs the attention module's config; {type(module).__name__} has no .config")
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ValueError(
            f"undoing RoPE needs config.rope_parameters with a rope_theta (one RoPE for every layer); "
            f"{type(config).__name__} has rope_parameters={params!r}"
        )
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        inv_freq, scaling = _default_rope_init(module)(config)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        extra = {"seq_len": seq_len} if rope_type == "dynamic" else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **extra)
    else:
        raise ValueError(f"rope_type must be one of {sorted(['default', *ROPE_INIT_FUNCTIONS])}, got {rope_type!r}")
    return inv_freq.to(device=device, dtype=torch.float32), float(scaling)


def full_rotary_frequencies(module, seq_len: int, dim: int, device=None) -> tuple[torch.Tensor, float]:
    """:func:`rope_frequencies` for vectors of ``dim`` entries, all of which RoPE must rotate (else an error)."""
    inv_freq, scaling = rope_frequencies(module, seq_len, device)
    if 2 * inv_freq.numel() != dim:
        raise ValueError(
            f"partial rotary embeddings are not supported: RoPE rotates {2 * inv_freq.numel()} of {dim} head dims"
        )
    return inv_freq, scaling


def unrotate(keys: torch.Tensor, module, start: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-RoPE vectors, float32 ``[B, H, N, D]``, from post-RoPE keys (or queries) of the same shape.

    The model caches ``a (k cos + rotate_half(k) sin)`` with ``a`` the RoPE's
    attention factor (1 except YaRN/LongRoPE); the inverse rotation divides by
    ``a``. Positions are ``start .. start + N - 1``, or ``positions``
    (``[B, H, N]``) when given. For Qwen3 the result is the key after
    ``k_norm`` (the query after ``q_norm``), the input of RoPE.
    """
    n, d = keys.shape[-2], keys.shape[-1]
    inv_freq, scaling = full_rotary_frequencies(module, start + n, d, keys.device)
    if positions is None:
        positions = torch.arange(start, start + n, device=keys.device)
    # Angles in float32 as the model computes them, so large positions round the same way.
    freqs = positions.to(keys.device).float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    k = keys.float()
    return (k * emb.cos() - rotate_half(k) * emb.sin()) / scaling


def rotate_by(vectors: torch.Tensor, module, offset: int) -> torch.Tensor:
    """Post-RoPE queries or keys ``[..., N, D]`` moved ``offset`` positions later, float32.

    RoPE's angle is linear in the position, so a vector rotated for position
    ``i`` and then by ``offset`` is the vector rotated for ``i + offset``
    (the attention factor ``a`` is already in it and is not applied again).
    """
    d = vectors.shape[-1]
    inv_freq, _ = full_rotary_frequencies(module, vectors.shape[-2] + offset, d, vectors.device)
    angles = inv_freq * float(offset)
    emb = torch.cat((angles, angles))
    x = vectors.float()
    return x * emb.cos() + rotate_half(x) * emb.sin()


def average_rotation(module, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``positions`` of RoPE's linear map ``x -> a (x cos + rotate_half(x) sin)``: float32 ``[D, D]``.

    RoPE at one position is linear in ``x``, so the mean of the maps is the map
    with the mean cos and sin: ``a (diag(cos_bar) + diag(sin_bar) P)`` with
    ``P x = rotate_half(x)``.
    """
    inv_freq, scaling = full_rotary_frequencies(module, int(positions.max()) + 1, dim, positions.device)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().mean(0), emb.sin().mean(0)
    half = dim // 2
    rotate = torch.zeros(dim, dim, device=positions.device)
    rotate[:half, half:] = -torch.eye(half, device=positions.device)
    rotate[half:, :half] = torch.eye(half, device=positions.device)
    return scaling * (torch.diag(cos) + sin[:, None] * rotate)
