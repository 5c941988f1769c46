"""Context reconstruction passes, for presses scored by how the model repeats its context (KVzip).

After the prefill, the model reads, chunk by chunk, a prompt asking it to
repeat the context followed by the chunk itself (teacher-forced), over the
full cache. Each pass's queries are recorded by curdkv's attention function
and handed, layer by layer, to the press's ``absorb_chunk`` with the cached
keys of the sinks and the chunk and the pass's own keys; then the pass is
dropped from the cache. The press never runs the model: it only says what
it gathers from one chunk (KVzip: the chunk's scores; CurDKV: the Gram of the
queries).
"""

from __future__ import annotations

import torch

from ..attention.function import using_curdkv_attention
from ..attention.recording import QueryRecorder, recording_queries
from ..models import chat_parts
from ..presses.base import Press
from ..presses.kvzip import FIRST_PROMPT, LATER_PROMPT
from ..transformers_compat import forward_with_cache


def _encode(tokenizer, text: str, device) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def reconstruction_scores(capture, press: Press) -> list[torch.Tensor]:
    """Per layer, what the press gathered (:meth:`Press.absorb_chunk`) while the captured context was reconstructed.

    ``capture`` is a :class:`curdkv.runtime.capture.PrefillCapture` that kept
    its model, the context's token ids and the tokenizer.
    """
    model, ids, tokenizer = capture.model, capture.input_ids, capture.tokenizer
    name = type(press).__name__
    if model is None or ids is None:
        raise ValueError(f"{name} reconstructs the context, which needs the model and the context's ids: "
                         "build the capture with curdkv.capture_prefill")
    if tokenizer is None:
        raise ValueError(f"{name} asks the model to repeat the context, which needs the tokenizer: pass it to "
                         "curdkv.compress(..., tokenizer=) or curdkv.capture_prefill(model, context, tokenizer)")
    device, (b, n) = ids.device, ids.shape
    _, suffix = chat_parts(tokenizer)
    suffix_ids = _encode(tokenizer, suffix or "\n", device)
    first_ids, later_ids = _encode(tokenizer, FIRST_PROMPT, device), _encode(tokenizer, LATER_PROMPT, device)
    cache = capture.build_cache(None)  # views of the captured keys: appending copies, the capture is untouched
    snapshot = cache.snapshot()
    states = [press.reconstruction_state(b, k.shape[1], n, k.shape[-1], k.device) for k in capture.keys]
    chunk_size, previous_tail = press.reconstruction_chunking()
    longest = max(first_ids.shape[1], later_ids.shape[1] + previous_tail) + suffix_ids.shape[1] + chunk_size
    recorder = QueryRecorder(longest, rolling=True)
    with using_curdkv_attention(model), recording_queries(capture.modules, recorder):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            prompt = first_ids if start == 0 else torch.cat(
                [later_ids.expand(b, -1), ids[:, max(0, start - previous_tail) : start]], dim=1)
            pass_ids = torch.cat([prompt.expand(b, -1), suffix_ids.expand(b, -1), ids[:, start:end]], dim=1)
            q = pass_ids.shape[1]
            recorder.queries.clear()
            positions = torch.arange(n, n + q, device=device)[None].expand(b, -1)
            forward_with_cache(model, cache, input_ids=pass_ids, position_ids=positions, use_cache=True,
                               logits_to_keep=1)
            sinks = min(press.protected_sinks, start)  # the first chunk holds the sinks itself
            for i, (layer, module) in enumerate(zip(cache.layers, capture.modules)):
                keys = layer.keys
                press.absorb_chunk(states[i], recorder.queries[i], keys[:, :, :sinks], keys[:, :, start:end],
                                   keys[:, :, n:], start, getattr(module, "scaling", keys.shape[-1] ** -0.5))
            cache.restore(snapshot)
    return states
