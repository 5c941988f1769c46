"""Pseudo queries from a short look ahead (Lookahead Q-Cache, arXiv 2505.20334).

A press whose ``lookahead_tokens`` is ``m > 0`` scores with the observation
window's queries followed by the queries of ``m`` tokens the model would
generate next: the context is compressed temporarily (by the press's
``lookahead_press()``), ``m`` tokens are decoded greedily from that cache,
the queries every layer computes for them are recorded, and the temporary
cache is dropped. The pseudo queries stand in for the unseen question.
"""

from __future__ import annotations

import torch

from ..attention.function import using_curdkv_attention
from ..attention.recording import QueryRecorder, recording_queries
from ..presses.base import Press
from ..transformers_compat import forward_with_cache


@torch.no_grad()
def pseudo_queries(capture, press: Press) -> list[torch.Tensor]:
    """Per layer, the post-RoPE queries ``[B, H, m, D]`` of ``m = press.lookahead_tokens`` greedy tokens.

    ``capture`` is a :class:`curdkv.runtime.capture.PrefillCapture` that kept its
    model and the greedy token after the context.
    """
    m = press.lookahead_tokens
    model, token = capture.model, capture.next_token
    if model is None or token is None:
        raise ValueError(
            f"{type(press).__name__} decodes {m} lookahead tokens, which needs the model and the prefill's last "
            "logits: build the capture with curdkv.capture_prefill"
        )
    cache = capture.build_cache(press.lookahead_press())
    recorder = QueryRecorder(m, rolling=True)
    ids = token[:, None]
    position = capture.seq_len
    with using_curdkv_attention(model), recording_queries(capture.modules, recorder):
        for step in range(m):
            positions = torch.full_like(ids, position + step)
            out = forward_with_cache(model, cache, input_ids=ids, position_ids=positions, use_cache=True,
                                     logits_to_keep=1)
            ids = out.logits[:, -1:].argmax(-1)
    return [recorder.queries[i] for i in range(capture.num_layers)]
