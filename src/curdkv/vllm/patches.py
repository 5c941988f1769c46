"""The three places where vLLM 0.32.0 offers no extension point, patched while a CurDKV connector runs.

After compression a request holds fewer keys and values (``kept``) than it
has tokens, but vLLM derives both the KV length and the RoPE position of the
next token from one number, ``num_computed_tokens``. Each patch subtracts the
request's evicted count where a KV length is meant and leaves positions as
they are. Each is inert for requests that were not compressed, and for
engines without the CurDKV connector (it looks for the connector's state and
returns the original result when there is none).

============================================  ===================================================
patched (vLLM 0.32.0)                          why
============================================  ===================================================
``KVCacheManager.allocate_slots``              the blocks a compressed request needs are counted
(vllm/v1/core/kv_cache_manager.py)             from its KV length, not its token count; otherwise
                                               the freed blocks would be allocated again
``Scheduler._reserve_prefill_lookahead``       the last hook on a chunk's size: a prefill chunk
(vllm/v1/core/sched/scheduler.py)              ends at the end of the context, so the question
                                               is prefilled over the compressed context
``GPUModelRunner._prepare_inputs``             seq_lens and slot mapping are KV lengths and
(vllm/v1/worker/gpu_model_runner.py,           slots, positions stay the tokens' own: RoPE
inherited by CPUModelRunner)                   continues after the original prompt
============================================  ===================================================

What vLLM would need to make these unnecessary: a per-request "KV offset"
(tokens whose KV was dropped) honoured by the block accounting and by the
runner's seq_lens/slot mapping, and a connector hook that may end a prefill
chunk at a given token.
"""

from __future__ import annotations

import functools

import torch

_APPLIED: set[str] = set()


def _once(name: str):
    def decorate(install):
        @functools.wraps(install)
        def run():
            if name not in _APPLIED:
                install()
                _APPLIED.add(name)
        return run
    return decorate


@_once("allocate_slots")
def patch_allocate_slots() -> None:
    """Count a compressed request's blocks from its KV length (``num_computed_tokens - evicted``)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.allocate_slots

    @functools.wraps(original)
    def allocate_slots(self, request, *args, **kwargs):
        evicted = getattr(self, "curdkv_evicted", {}).get(request.request_id, 0)
        if not evicted:
            return original(self, request, *args, **kwargs)
        # The manager reads the count from the request itself; it is put back before anyone else reads it.
        request.num_computed_tokens -= evicted
        try:
            return original(self, request, *args, **kwargs)
        finally:
            request.num_computed_tokens += evicted

    KVCacheManager.allocate_slots = allocate_slots


@_once("reserve_prefill_lookahead")
def patch_prefill_chunks() -> None:
    """End a prefill chunk at the request's context boundary, where the connector compresses."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler._reserve_prefill_lookahead

    @functools.wraps(original)
    def reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = original(self, request, num_computed_tokens, num_new_tokens)
        boundary = getattr(self.connector, "context_boundary", None)
        end = boundary(request) if boundary is not None else None
        if end is not None and num_computed_tokens < end < num_computed_tokens + num_new_tokens:
            return end - num_computed_tokens
        return num_new_tokens

    Scheduler._reserve_prefill_lookahead = reserve_prefill_lookahead


@_once("prepare_inputs")
def patch_prepare_inputs() -> None:
    """Give compressed requests KV lengths and slots ``evicted`` lower than their positions."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .metadata import CurDKVMetadata

    original = GPUModelRunner._prepare_inputs

    @functools.wraps(original)
    def prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        meta = scheduler_output.kv_connector_metadata
        if isinstance(meta, CurDKVMetadata):
            # The connector's worker side shortens this runner's block tables after it compresses.
            get_kv_transfer_group().bind_model_runner(self)
            if meta.evicted:
                shift_kv_lengths(self, meta.evicted, int(scheduler_output.total_num_scheduled_tokens))
        return result

    GPUModelRunner._prepare_inputs = prepare_inputs


def shift_kv_lengths(runner, evicted: dict[str, int], num_tokens: int) -> None:
    """Lower seq_lens by each request's evicted count and recompute slots from ``positions - evicted``."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    per_request = torch.tensor([evicted.get(req_id, 0) for req_id in batch.req_ids[:num_reqs]], dtype=torch.int32)
    if not bool(per_request.any()):
        return
    runner.seq_lens[:num_reqs] -= per_request.to(runner.seq_lens.dtype)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= per_request.to(runner.optimistic_seq_lens_cpu.dtype)
    req_indices = runner.req_indices.gpu[:num_tokens].long()
    kv_positions = runner.positions[:num_tokens] - per_request.to(runner.positions.dtype)[req_indices]
    batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], kv_positions)


def apply_scheduler_patches() -> None:
    patch_allocate_slots()
    patch_prefill_chunks()


def apply_worker_patches() -> None:
    patch_prepare_inputs()


def applied() -> list[str]:
    return sorted(_APPLIED)
