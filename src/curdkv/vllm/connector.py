"""CurDKV inside vLLM 0.32.0 (CPU build) as a KV connector: compress a request's context once, right after
its prefill, and give the freed blocks back to vLLM's block pool.

vLLM runs one connector object per role, and this one plays both:

- scheduler side (:meth:`build_connector_meta`, called once per step after
  the scheduler placed every request): when a request's prefill reaches the
  end of its context this step, it decides the budget (the press's
  ``layer_keep``; the same count per head at every layer), orders the worker
  to compress, and frees the request's blocks past the kept tokens through
  ``BlockPool.free_blocks`` at once (the worker runs steps in order, so the
  blocks are read before any later step can write them). From then on the
  request's ``evicted`` count travels with every step's metadata.
- worker side (:meth:`wait_for_save`, called after each step's forward
  pass): it reads each layer's keys and values of the ordered requests from
  the paged cache, keeps what the press chooses, writes the kept tokens into
  the request's first slots (:mod:`curdkv.vllm.compaction`) and shortens the
  model runner's block table to the kept blocks. For presses that read the
  observation window, a forward pre-hook on each ``Attention`` module keeps
  the window's queries as the chunks that hold them are prefilled
  (:mod:`curdkv.vllm.queries`).

What the connector API cannot do is done by the patches of
:mod:`curdkv.vllm.patches` (KV length apart from positions). Prefix caching
must be off: compressed blocks hold a different content than their hash says.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from vllm.logger import init_logger
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)

from . import patches
from .compaction import compact_layer
from .config import (
    EXTRA_ARGS_KEY,
    REQUEST_KEYS,
    CompressionSpec,
    ModelRope,
    context_tokens_from,
    spec_from_mapping,
)
from .metadata import CompressOrder, CurDKVMetadata
from .model_check import check_attention_layers, check_engine
from .paged import RegionLayout
from .queries import WindowQueries, layer_queries, window_slice

# Under "vllm.": vLLM 0.32.0 configures handlers for its own logger tree only (vllm/logger.py), so a line
# logged as "curdkv..." would not reach the engine's or the server's log.
logger = init_logger("vllm.curdkv")


@dataclass
class _Tracked:
    """A request the scheduler side will compress (or has compressed)."""

    request: Any
    spec: CompressionSpec
    context_tokens: int
    kept: int
    evicted: int = 0


class CurDKVConnector(KVConnectorBase_V1):
    """A KV connector that moves no KV anywhere: it compresses the context in place (see the module doc)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._rope = ModelRope(vllm_config.model_config.hf_config)
        self.spec = spec_from_mapping(extra, "kv_connector_extra_config", rope=self._rope)
        self.num_layers = check_engine(vllm_config, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self._presses: dict[CompressionSpec, Any] = {}
        # Under torch.compile a hook's copies would be traced once and not run again.
        self._eager = _runs_eagerly(vllm_config)
        self.check_queries_capturable(self.press(self.spec), "kv_connector_extra_config")
        if role == KVConnectorRole.SCHEDULER:
            self._tracked: dict[str, _Tracked] = {}
            # The patched KVCacheManager.allocate_slots reads the evicted counts here.
            self._evicted: dict[str, int] = {}
            patches.apply_scheduler_patches()
        else:
            self._layers: list[tuple[int, Any]] = []
            self._layer_ropes: dict[int, ModelRope] = {}
            self._heads: dict[int, int] = {}
            self._queries = WindowQueries({})
            self._planned_for = None
            self._layout: RegionLayout | None = None
            self._isa = ""
            self._runner = None
            patches.apply_worker_patches()
        logger.info("curdkv: compressing contexts with %s at ratio %s (patched: %s)", self.spec.press,
                    self.spec.compression_ratio, patches.applied())

    def press(self, spec: CompressionSpec):
        if spec not in self._presses:
            self._presses[spec] = spec.build()
        return self._presses[spec]

    def check_queries_capturable(self, press, where: str) -> None:
        if press.query_window and not self._eager:
            raise ValueError(f"{where}['press']={press.name!r} reads the last {press.query_window} context "
                             "queries, which curdkv captures only in eager mode: set enforce_eager=True "
                             "(--enforce-eager)")

    # ------------------------------------------------------------------ scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        kv_cache_manager.curdkv_evicted = self._evicted

    def on_new_request(self, request) -> None:
        """Decide this request's press, ratio and context.

        The scheduler has queued the request when it calls this, so bad
        per-request settings cannot be refused here (raising would leave it
        queued): they are logged and the request keeps its whole context.
        :func:`curdkv.vllm.request_options` checks them before they are sent.
        """
        where = f"SamplingParams.extra_args[{EXTRA_ARGS_KEY!r}]"
        params = getattr(request, "sampling_params", None)
        options = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY, {})
        if options is False:
            return  # this request asked for no compression
        try:
            if isinstance(options, str):
                # The OpenAI server's vllm_xargs holds no nested dicts (vLLM 0.32.0's CompletionRequest):
                # there the options come as their JSON text.
                try:
                    options = json.loads(options)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where} is a string but not JSON ({error})") from None
                if options is False:
                    return
            if not isinstance(options, dict):
                raise ValueError(f"{where} must be a dict with keys from {list(REQUEST_KEYS)} or False, got {options!r}")
            spec = self.spec if not options else spec_from_mapping(
                {k: v for k, v in options.items() if k != "context_tokens"}, where, self.spec, REQUEST_KEYS, self._rope)
            context = context_tokens_from(options or {}, where, request.num_prompt_tokens)
            press = self.press(spec)
            press.check_context(context)
            self.check_queries_capturable(press, where)
        except ValueError as error:
            logger.warning("curdkv: request %s keeps its whole context: %s", request.request_id, error)
            return
        kept = press.layer_keep(context, 0, self.num_layers)
        if kept < context:
            self._tracked[request.request_id] = _Tracked(request, spec, context, kept)

    def context_boundary(self, request) -> int | None:
        """Where the patched scheduler ends a prefill chunk: the end of a not yet compressed context."""
        tracked = self._tracked.get(request.request_id)
        return tracked.context_tokens if tracked is not None and not tracked.evicted else None

    def build_connector_meta(self, scheduler_output) -> CurDKVMetadata:
        meta = CurDKVMetadata()
        # Window queries of requests gone or sent back to waiting are of no use (a recompute captures them again).
        meta.dropped = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            before = tracked.request.num_computed_tokens  # not yet advanced by this step
            if tracked.evicted and before < tracked.context_tokens:
                self._forget_compression(tracked)  # preempted and recomputed from the start: compress again
            if tracked.evicted:
                meta.evicted[req_id] = tracked.evicted
                continue
            window = min(self.press(tracked.spec).query_window, tracked.context_tokens)
            part = window_slice(before, scheduled, tracked.context_tokens, window) if window else None
            if part is not None:
                meta.windows[req_id] = part
            if before < tracked.context_tokens <= before + scheduled:
                meta.orders.append(self._compress(tracked, before + scheduled))
        return meta

    def _compress(self, tracked: _Tracked, kv_tokens: int) -> CompressOrder:
        """Order the worker's compaction and free the blocks past the kept tokens now."""
        manager = self._kv_cache_manager.coordinator.single_type_managers[0]
        req_id = tracked.request.request_id
        blocks = manager.req_to_blocks[req_id]
        order = CompressOrder(req_id, tracked.spec, tracked.context_tokens, kv_tokens, tracked.kept,
                              tuple(block.block_id for block in blocks))
        keep = order.blocks_kept(self.block_size)
        freed = blocks[keep:]
        del blocks[keep:]
        self._kv_cache_manager.block_pool.free_blocks(reversed(freed))  # tail first, as vLLM frees
        tracked.evicted = tracked.context_tokens - tracked.kept
        self._evicted[req_id] = tracked.evicted
        return order

    def _forget_compression(self, tracked: _Tracked) -> None:
        tracked.evicted = 0
        self._evicted.pop(tracked.request.request_id, None)

    def request_finished(self, request, block_ids):
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is not None:
            self._forget_compression(tracked)
        return False, None

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        # vLLM 0.32.0 asks this of each waiting request that holds no computed tokens, before allocate_slots:
        # a new one, or one preempted (blocks freed, num_computed_tokens reset to 0) and now recomputed from
        # its first token. Its eviction must be forgotten here, or the patched allocate_slots counts its
        # blocks from a negative KV length; the recompute ends a chunk at the context and compresses again.
        tracked = self._tracked.get(request.request_id)
        if tracked is not None and tracked.evicted:
            self._forget_compression(tracked)
        return 0, False  # nothing is ever loaded from outside

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches) -> None:
        """Keep each attention layer's cache tensor by layer index, learn the kernel's cache layout and hook
        each ``Attention`` module for the window queries."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        isa = check_attention_layers(self._vllm_config, list(kv_caches))
        layers = sorted((_layer_index(name), tensor) for name, tensor in kv_caches.items())
        self._queries = WindowQueries({idx: where for where, (idx, _) in enumerate(layers)})
        for name, module in get_layers_from_vllm_config(self._vllm_config, Attention, list(kv_caches)).items():
            idx = _layer_index(name)
            self._layer_ropes[idx] = replace(self._rope, attention_scale=float(module.impl.scale))
            self._heads[idx] = module.num_heads
            if self._eager:
                module.register_forward_pre_hook(functools.partial(self._capture_queries, idx, name),
                                                 with_kwargs=True)
        tensor = layers[0][1]
        block_size, head_size = tensor.shape[2], tensor.shape[3] // 2
        if block_size != self.block_size:
            raise ValueError(f"curdkv needs the KV cache's kernel block size ({block_size}) to equal "
                             f"cache_config.block_size ({self.block_size}); set block_size={block_size}")
        self._layers, self._isa = layers, isa
        self._layout = RegionLayout.probe(tensor.dtype, block_size, head_size, isa)

    def _capture_queries(self, layer_idx: int, layer_name: str, module, args, kwargs) -> None:
        """Forward pre-hook of an ``Attention`` module: copy this step's window rows of its (post-RoPE) query."""
        if not self.has_connector_metadata():
            return  # a warm-up or profiling pass
        meta = self._get_connector_metadata()
        if meta is not self._planned_for:
            self._planned_for = meta
            self._queries.clear_plan()
            if isinstance(meta, CurDKVMetadata) and meta.windows:
                from vllm.forward_context import get_forward_context

                attn_metadata = get_forward_context().attn_metadata
                if isinstance(attn_metadata, dict):
                    attn_metadata = attn_metadata[layer_name]
                self._queries.plan(meta.windows, self._runner.input_batch.req_id_to_index,
                                   attn_metadata.query_start_loc)
        if self._queries.planned:
            self._queries.capture(layer_idx, args[0] if args else kwargs["query"])

    def handle_preemptions(self, kv_connector_metadata) -> None:
        if isinstance(kv_connector_metadata, CurDKVMetadata):
            self._queries.drop(kv_connector_metadata.dropped)

    def bind_model_runner(self, runner) -> None:
        """The runner whose block tables this worker shortens (bound by the patched ``_prepare_inputs``)."""
        self._runner = runner

    def wait_for_save(self) -> None:
        """After the forward pass: compress the requests ordered this step, then shorten their block tables."""
        meta = self._get_connector_metadata()
        self._planned_for = None
        self._queries.clear_plan()
        if not isinstance(meta, CurDKVMetadata) or not meta.orders:
            return
        for order in meta.orders:
            press = self.press(order.spec)
            window = self._queries.take(order.req_id)
            if press.query_window and window is None:
                raise RuntimeError(f"curdkv: no window queries were captured for request {order.req_id}")
            for where, (layer_idx, kv_cache) in enumerate(self._layers):
                queries = layer_queries(window, where, self._heads[layer_idx]) if press.query_window else None
                compact_layer(kv_cache, self._layout, self._isa, layer_idx, press, order,
                              self._layer_ropes.get(layer_idx, self._rope), queries)
            self._shorten_block_table(order)

    def _shorten_block_table(self, order: CompressOrder) -> None:
        runner = self._runner
        if runner is None:
            raise RuntimeError("curdkv compressed a request but no model runner was bound; "
                               "GPUModelRunner._prepare_inputs is not patched")
        keep = order.blocks_kept(self.block_size)
        state = runner.requests.get(order.req_id)
        if state is not None:
            del state.block_ids[0][keep:]
        row = runner.input_batch.req_id_to_index.get(order.req_id)
        if row is not None:
            table = runner.input_batch.block_table.block_tables[0]
            held = int(table.num_blocks_per_row[row])
            if held > keep:
                table.block_table.np[row, keep:held] = 0
                table.num_blocks_per_row[row] = keep

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None


def _runs_eagerly(vllm_config) -> bool:
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode == CompilationMode.NONE


def _layer_index(name: str) -> int:
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    if not found:
        raise ValueError(f"curdkv cannot tell the layer index of the attention layer {name!r}")
    return int(found[-1])
