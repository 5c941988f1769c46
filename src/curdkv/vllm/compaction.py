"""One request's compression in the paged cache: score each layer's context, keep the top tokens per KV
head, and write them (then any tokens after the context) back into the request's first slots.

Per head the kept tokens differ, yet one cache slot holds every head of a
"token": slot ``i`` of head ``h`` then holds head ``h``'s ``i``-th kept token.
Attention over the kept set does not depend on their order, because the
cached keys already carry their RoPE rotation (vLLM's Llama applies
``rotary_emb`` before ``attn`` writes the cache) and the causal mask only
separates the context from tokens after it, whose slots stay after every
kept slot. The choice is the one :func:`curdkv.runtime.layer.compress_layer`
makes: the press's scores, then :func:`curdkv.runtime.layer.select_tokens`.
"""

from __future__ import annotations

import torch

from ..presses import Press
from ..runtime.layer import select_tokens
from .config import ModelRope
from .metadata import CompressOrder
from .paged import RegionLayout, slots_of, write_tokens


@torch.no_grad()
def compact_layer(kv_cache: torch.Tensor, layout: RegionLayout, isa: str, layer_idx: int, press: Press,
                  order: CompressOrder, rope: ModelRope, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Compress one layer of one request in place; returns the kept context indices ``[H_kv, kept]``.

    ``queries``: the context's last window queries ``[1, H, W, D]`` for presses that read them.
    """
    blocks = list(order.block_ids)
    keys, values = layout.read(kv_cache, blocks, order.kv_tokens)  # [H_kv, L, D] copies
    context = order.context_tokens
    chosen = select_tokens(press, keys[None, :, :context], values[None, :, :context], queries, rope, layer_idx,
                           n_keep=order.kept)[0]
    index = chosen[:, :, None].expand(-1, -1, keys.shape[-1])
    kept_keys = torch.cat([keys[:, :context].gather(1, index), keys[:, context:]], dim=1)
    kept_values = torch.cat([values[:, :context].gather(1, index), values[:, context:]], dim=1)
    slots = slots_of(blocks, kept_keys.shape[1], layout.block_size)
    write_tokens(kv_cache, kept_keys.transpose(0, 1), kept_values.transpose(0, 1), slots, isa)
    return chosen
