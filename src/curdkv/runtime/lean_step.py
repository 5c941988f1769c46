"""One decode step written out over a transformers model's own weights (Llama, Mistral, Qwen2, Qwen3).

A CUDA graph removes the host from a decode step, but not the GPU's cost of
each kernel: transformers' modules run about 45 kernels per layer, most of
them element-wise on a few kilobytes (the norms' casts and reductions,
RoPE's slices and concatenations, transposes). Each still costs a few
microseconds, which at batch 1 adds up to a third of the step. This step
runs the same arithmetic as the model's modules, in the same order and
dtype, with the element-wise work fused (:mod:`curdkv.kernels.decode_step`):
per layer, seven matrix products, two norm kernels, one RoPE-and-store
kernel, one activation kernel and the ragged attention kernel. For one row
in half precision on the kernels' device, the products go through
:mod:`curdkv.kernels.gemv` (``gemv=``): q/k/v in one launch, gate/up with
the activation in another, and o and down by the same kernel too (``"all"``,
the default); ``"grouped"`` keeps o and down on cuBLAS, ``"torch"`` all seven.

It reads the weights in place (nothing is copied or converted) and uses the
model's own rotary-embedding module for the cos/sin (so every RoPE scaling
transformers implements is honoured). :func:`lean_step_unsupported` names
what keeps a model off this path (then the graph replays transformers'
forward instead), and :meth:`LeanStep.check_against` compares its logits
with transformers' on a real step before a model's first use.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..cache.fixed import FixedCapacityCache
from ..kernels.decode_step import add_rmsnorm, rope_store, silu_mul
from ..kernels.gemv import gated_gemv, gemv_applies, grouped_gemv, weights_share_a_launch

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
GEMV_MODES = ("torch", "grouped", "all")
# The products' route for steps built without ``gemv=`` (benchmarks switch it with :func:`using_gemv`).
# Measured on an H100 (benchmarks/gemv_micro.py, Llama-3.1-8B shapes, results/decode/gemv_micro-h100.json):
# at one row the kernels beat cuBLAS on every product (q/k/v 19.3 against 30.4 us, o 13.9 against 16.4),
# and the whole step at 32K-128K gets 6-10% faster with all four; at 2-8 rows cuBLAS is faster for
# gate/up, o and down, so batched steps keep torch's products (KERNEL_ROWS).
DEFAULT_GEMV = "all"
KERNEL_ROWS = 1


@contextmanager
def using_gemv(mode: str):
    """Lean steps built inside take ``gemv=mode`` by default (what a benchmark compares)."""
    global DEFAULT_GEMV
    if mode not in GEMV_MODES:
        raise ValueError(f"gemv must be one of {GEMV_MODES}, got {mode!r}")
    before, DEFAULT_GEMV = DEFAULT_GEMV, mode
    try:
        yield
    finally:
        DEFAULT_GEMV = before


def lean_step_unsupported(model) -> str | None:
    """Why ``model`` cannot decode through :class:`LeanStep` (``None``: it can)."""
    config = model.config
    if config.model_type not in SUPPORTED_TYPES:
        return f"model_type {config.model_type!r} is not one of {list(SUPPORTED_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu is written out)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or getattr(inner, "rotary_emb", None) is None:
        return "the model does not have the model.layers / model.rotary_emb layout"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in _ATTENTION) \
                or not all(hasattr(mlp, n) for n in _MLP):
            return "a decoder layer without the q/k/v/o and gate/up/down projections"
    return None


class LeanStep:
    """The decode step of a supported model over a :class:`FixedCapacityCache`: ``logits [B, V]`` per call."""

    def __init__(self, model, cache: FixedCapacityCache, gemv: str | None = None):
        reason = lean_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"this model cannot use the lean decode step: {reason}")
        config = model.config
        self.model, self.cache = model, cache
        self.inner = model.model
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.gemv = DEFAULT_GEMV if gemv is None else gemv
        if self.gemv not in GEMV_MODES:
            raise ValueError(f"gemv must be one of {GEMV_MODES}, got {self.gemv!r}")
        # The weights are checked once here; the input's device, dtype and rows at each call.
        self._gemv_weights = self.gemv != "torch" and all(_groupable(group) for layer in self.inner.layers for group in (
            [getattr(layer.self_attn, n) for n in _ATTENTION[:3]], [layer.self_attn.o_proj],
            [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of ``input_ids [B, 1]`` at ``position_ids [B, 1]``; writes the token's K/V."""
        from ..attention.function import ragged_attention

        inner, eps = self.inner, self.eps
        x = inner.embed_tokens(input_ids[:, 0])  # [B, hidden]
        cos, sin = inner.rotary_emb(x[:, None], position_ids)
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [B, D], the model's dtype
        b = x.shape[0]
        index = self.cache.state.filled
        delta = None
        grouped = self._gemv_weights and b <= KERNEL_ROWS and gemv_applies(x, ())
        every = grouped and self.gemv == "all"
        for layer, store in zip(inner.layers, self.cache.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = add_rmsnorm(x, delta, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q, k, v = _linears(h, (attn.q_proj, attn.k_proj, attn.v_proj), grouped)
            q = q.view(b, self.heads, self.head_dim)
            k, v = k.view(b, self.kv_heads, self.head_dim), v.view(b, self.kv_heads, self.head_dim)
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            rope_store(q, k, v, cos, sin, store.tail_keys, store.tail_values, index,
                       None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
                       eps if q_norm is None else q_norm.variance_epsilon)
            out = ragged_attention(q[:, :, None], store.kv, attn.scaling)  # [B, 1, H, D]
            (o,) = _linears(out.reshape(b, -1), (attn.o_proj,), every)
            norm = layer.post_attention_layernorm
            h = add_rmsnorm(x, o, norm.weight, norm.variance_epsilon)
            if grouped:
                act = gated_gemv(h, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.gate_proj.bias, mlp.up_proj.bias)
            else:
                act = silu_mul(F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias),
                               F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias))
            (delta,) = _linears(act, (mlp.down_proj,), every)
        h = add_rmsnorm(x, delta, inner.norm.weight, inner.norm.variance_epsilon)
        return self.model.lm_head(h)


def _groupable(linears) -> bool:
    """Whether one launch can take these ``nn.Linear``s: weights that share a launch, a bias on each or on none."""
    return weights_share_a_launch([m.weight for m in linears]) and len({m.bias is None for m in linears}) == 1


def _linears(h: torch.Tensor, linears, grouped: bool) -> list[torch.Tensor]:
    """``h`` through each of ``linears``: one :func:`grouped_gemv` launch, or ``F.linear`` each."""
    if grouped:
        biases = None if linears[0].bias is None else [m.bias for m in linears]
        return grouped_gemv(h, [m.weight for m in linears], biases)
    return [F.linear(h, m.weight, m.bias) for m in linears]


def lean_step_agrees(lean_logits: torch.Tensor, reference_logits: torch.Tensor) -> tuple[bool, float]:
    """Whether the lean step's logits match transformers' up to rounding: ``(ok, relative max error)``.

    In float32 the two agree to 1e-3 of the largest logit. In bfloat16 each
    rounds its own way, and on Llama-3.1-8B (random weights) the difference
    grows from 1% of the largest logit after one layer (two bf16 units) to
    6% after 32, with a cosine similarity of 0.9985; so half precision is
    judged by the cosine similarity of every row (>= 0.995), which a wrong
    step (a missing term, a wrong rotation) does not reach.
    """
    ref, lean = reference_logits.float(), lean_logits.float()
    err = float((lean - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    if reference_logits.dtype == torch.float32:
        return err <= 1e-3, err
    cosine = float(F.cosine_similarity(lean, ref, dim=-1).min())
    return cosine >= 0.995, err
