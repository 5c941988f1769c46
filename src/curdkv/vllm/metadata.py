"""What the scheduler side of curdkv's connector tells the workers each step (vLLM 0.32.0's connector metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .config import CompressionSpec
from .queries import WindowSlice


@dataclass(frozen=True)
class CompressOrder:
    """What the scheduler asks a worker to compress after this step's forward pass.

    context_tokens: the prompt's first tokens, scored and cut to ``kept`` per head.
    kv_tokens: tokens whose keys and values are held once this step ran (context + tail).
    block_ids: the request's blocks before compaction, in order; the first
        ``ceil((kept + tail) / block_size)`` keep the compacted tokens.
    """

    req_id: str
    spec: CompressionSpec
    context_tokens: int
    kv_tokens: int
    kept: int
    block_ids: tuple[int, ...]

    @property
    def tail_tokens(self) -> int:
        return self.kv_tokens - self.context_tokens

    def blocks_kept(self, block_size: int) -> int:
        return -(-(self.kept + self.tail_tokens) // block_size)


@dataclass
class CurDKVMetadata(KVConnectorMetadata):
    """One step's orders: the evicted count of every scheduled compressed request, what to compress, which
    window queries this step computes, and the requests whose window queries are no longer needed."""

    evicted: dict[str, int] = field(default_factory=dict)
    orders: list[CompressOrder] = field(default_factory=list)
    windows: dict[str, WindowSlice] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
