"""What both analyses share: a text prefix and its continuation, and causal attention in float32."""

from __future__ import annotations

from pathlib import Path

import torch


def analysis_tokens(tokenizer, text_path: str | None, context_tokens: int, future_tokens: int) -> torch.Tensor:
    """``[1, context_tokens + future_tokens]`` token ids of a text file, or of the bundled essays."""
    if context_tokens < 1 or future_tokens < 1:
        raise ValueError(f"context_tokens and future_tokens must be >= 1, got {context_tokens}, {future_tokens}")
    if text_path is None:
        from ..eval.ruler_data import paul_graham_essays

        text = paul_graham_essays()
    else:
        path = Path(text_path)
        if not path.is_file():
            raise ValueError(f"text must be a readable text file, got {text_path!r}")
        text = path.read_text(errors="replace")
    need = context_tokens + future_tokens
    ids = tokenizer(text[: need * 12], return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < need:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than context_tokens + future_tokens = {need}")
    return ids[:, :need]


def expand_kv(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, H_kv, ...]`` -> ``[B, H, ...]``: each KV head repeated for its query-head group."""
    return states.repeat_interleave(num_heads // states.shape[1], dim=1)


def full_attention(queries, keys, values, scaling: float, prefix: int):
    """Causal attention of the continuation's queries, in float32.

    queries ``[B, H, M, D]`` at positions ``prefix .. prefix+M-1``; keys/values
    ``[B, H_kv, prefix+M, D]``. Returns ``(logits [B, H, M, prefix+M] with -inf
    above the diagonal, probabilities, output [B, H, M, D])``.
    """
    h, m = queries.shape[1], queries.shape[2]
    k, v = expand_kv(keys.float(), h), expand_kv(values.float(), h)
    logits = queries.float() @ k.transpose(-1, -2) * scaling
    n = keys.shape[2]
    future = torch.arange(m, device=queries.device)[:, None] + prefix
    logits = logits.masked_fill(torch.arange(n, device=queries.device)[None, :] > future, float("-inf"))
    probs = logits.softmax(-1)
    return logits, probs, probs @ v
