"""What to compress with, checked before an engine serves anything.

Engine-wide settings come from ``kv_transfer_config.kv_connector_extra_config``
(vLLM 0.32's one place for a connector's own options, also reachable from
the server's ``--kv-transfer-config``); a request may override them through
``SamplingParams.extra_args["curdkv"]``. Every bad value raises a
``ValueError`` that names the parameter and what it may be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..presses import PRESSES, Press, get_press
from ..presses.base import ALL_QUERIES
from ..runtime.layer import layer_scores

# The keys of kv_connector_extra_config and of SamplingParams.extra_args["curdkv"].
ENGINE_KEYS = ("press", "compression_ratio", "press_options")
REQUEST_KEYS = ENGINE_KEYS + ("context_tokens",)
EXTRA_ARGS_KEY = "curdkv"


@dataclass(frozen=True)
class CompressionSpec:
    """A press by registry name, its ratio and other constructor options: what a worker builds a press from."""

    press: str = "curdkv"
    compression_ratio: float = 0.0
    press_options: tuple[tuple[str, object], ...] = ()

    def build(self) -> Press:
        return get_press(self.press, self.compression_ratio, **dict(self.press_options))


def spec_from_mapping(mapping, where: str, base: CompressionSpec | None = None,
                      allowed: tuple[str, ...] = ENGINE_KEYS, rope: ModelRope | None = None) -> CompressionSpec:
    """A checked :class:`CompressionSpec` from engine or request settings (``base`` fills what is missing),
    on the served model's RoPE where it is known."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a dict with keys from {list(allowed)}, got {mapping!r}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {list(allowed)}")
    base = base or CompressionSpec()
    press = mapping.get("press", base.press)
    if not isinstance(press, str) or press.split(":")[0].lower() not in PRESSES:
        raise ValueError(f"{where}['press'] must be one of {sorted(PRESSES)} (optionally with :option=value), "
                         f"got {press!r}")
    ratio = mapping.get("compression_ratio", base.compression_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{where}['compression_ratio'] must be a float in [0, 1), got {ratio!r}")
    options = mapping.get("press_options", dict(base.press_options))
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"{where}['press_options'] must be a dict of press constructor arguments, got {options!r}")
    spec = CompressionSpec(press, float(ratio), tuple(sorted(options.items())))
    check_supported(spec.build(), where, rope)
    return spec


def context_tokens_from(mapping, where: str, prompt_tokens: int) -> int:
    """The request's ``context_tokens`` (the prompt's first tokens compressed before the rest is prefilled)."""
    value = mapping.get("context_tokens", prompt_tokens) if isinstance(mapping, dict) else prompt_tokens
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= prompt_tokens:
        raise ValueError(f"{where}['context_tokens'] must be an integer in [1, {prompt_tokens}] "
                         f"(the prompt's length), got {value!r}")
    return value


@dataclass(frozen=True)
class ModelRope:
    """What a press reads of a layer inside vLLM in place of the HF attention module: the model's config.

    vLLM keeps no transformers attention modules, but its model config is a
    transformers config, and a press that undoes RoPE (CurDKV's default
    pre-RoPE keys) needs nothing else (:func:`curdkv.presses.rope.unrotate`).
    The paged cache holds post-RoPE keys at positions ``0 .. context - 1``,
    as the HF cache after a prefill does.
    """

    config: object
    # The attention's own scale (vLLM's ``Attention.impl.scale``), which window presses' logits use; the HF
    # module's ``scaling`` is ``head_dim ** -0.5`` for the models served here.
    attention_scale: float | None = None

    @property
    def head_dim(self) -> int:
        config = self.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def scaling(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    @property
    def query_group(self) -> int:
        """Query heads per KV head."""
        config = self.config
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return heads // kv_heads if heads and kv_heads else 1


def plain_rope(head_dim: int = 16) -> ModelRope:
    """A model with plain RoPE, to check a press before the served model is known."""
    from transformers import LlamaConfig

    return ModelRope(LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
                                 head_dim=head_dim))


def unsupported_reasons(press: Press, rope: ModelRope | None = None) -> list[str]:
    """Why the paged cache cannot serve ``press`` (empty: it can), on the model whose config ``rope`` holds
    (default: one with plain RoPE). It must keep the same count of tokens per head at every layer and score
    from keys, values, the model's RoPE and at most a window of the last context queries (the worker
    keeps those, :mod:`curdkv.vllm.queries`): vLLM keeps no attention modules for it."""
    reasons = []
    if press.head_adaptive:
        reasons.append("its heads keep different counts (head-adaptive)")
    if press.query_window >= ALL_QUERIES:
        reasons.append("it reads the queries of every context token (the worker keeps a window of them)")
    if press.needs_full_prefill or press.lookahead_tokens or press.reconstructs_context:
        reasons.append("it needs the whole prefill, lookahead decoding or reconstruction passes")
    if press.calibrates:
        reasons.append("it chooses its ratio from the context's likelihood")
    # At ratio 0 every layer keeps all, whatever the press does at the ratio a request brings later.
    sized = press if press.compression_ratio else press.with_ratio(0.5)
    if len({sized.layer_keep(1000, i, 32) for i in range(32)}) > 1:
        reasons.append("its layers keep different counts")
    if reasons:
        return reasons
    rope = rope or plain_rope()
    try:  # a press that reads more of the attention module than its RoPE (W_o, say) fails here, not mid-serving
        gen = torch.Generator().manual_seed(0)
        window = press.query_window
        length = 64 + 2 * window  # longer than the window, which window presses need
        keys, values = torch.randn(2, 1, 2, length, rope.head_dim, generator=gen)
        queries = torch.randn(1, 2 * rope.query_group, window, rope.head_dim, generator=gen) if window else None
        if not bool(torch.isfinite(layer_scores(press, keys, values, queries, rope, 0)).all()):
            reasons.append("it returned non-finite scores on a test layer")
    except Exception as error:  # noqa: BLE001 - any failure means this press cannot run here
        reasons.append(f"scoring from keys, values, window queries and the model's RoPE failed ({error})")
    return reasons


def check_supported(press: Press, where: str, rope: ModelRope | None = None) -> None:
    reasons = unsupported_reasons(press, rope)
    if reasons:
        raise ValueError(f"{where}['press']={press.name!r} cannot run inside vLLM: " + "; ".join(reasons)
                         + f". Supported presses: {supported_presses()}")


def supported_presses() -> list[str]:
    """Registry names of the presses vLLM can run (checked at ratio 0.5 with default options)."""
    return [name for name in sorted(PRESSES) if not unsupported_reasons(get_press(name, 0.5))]
