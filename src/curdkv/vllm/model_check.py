"""Which engines curdkv's connector can serve, refused with a clear error when the engine starts.

The compaction relies on (vLLM 0.32.0): one KV cache group of full attention
(no sliding window, no MLA, no hybrid or encoder-decoder model), the CPU
attention backend's cache layout, no ALiBi or attention sinks (they make
attention depend on where a kept token sits), no prefix caching (compressed
blocks no longer hold what their hash says), no speculative decoding (its
drafts write KV past the budget the scheduler counts), one process per model
(tensor and pipeline parallelism untested) and a cache dtype of the model's
own ("auto": the reader does not undo fp8 scales).
"""

from __future__ import annotations


def check_engine(vllm_config, kv_cache_config) -> int:
    """Raise ``ValueError`` if the engine cannot be served; return the model's number of layers."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    problems = []
    if not current_platform.is_cpu():
        problems.append(f"platform: the CPU build of vLLM is supported, got {current_platform.device_name!r}")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("enable_prefix_caching must be False (compressed blocks cannot be shared)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative_config must be None (speculative decoding is not supported)")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"kv_cache_dtype must be 'auto', got {vllm_config.cache_config.cache_dtype!r}")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        problems.append("tensor_parallel_size and pipeline_parallel_size must be 1")
    if model.get_sliding_window() is not None:
        problems.append(f"model: sliding-window attention (window {model.get_sliding_window()}) is not supported")
    if model.use_mla:
        problems.append("model: multi-head latent attention (MLA) is not supported")
    if model.is_encoder_decoder:
        problems.append("model: encoder-decoder models are not supported")
    if kv_cache_config is not None:
        groups = kv_cache_config.kv_cache_groups
        from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

        specs = [type(g.kv_cache_spec).__name__ for g in groups]
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec) \
                or isinstance(groups[0].kv_cache_spec, SlidingWindowSpec):
            problems.append(f"model: one KV cache group of full attention is supported, got {specs}")
    if problems:
        raise ValueError(f"curdkv cannot compress the KV cache of {model.model!r}: " + "; ".join(problems))
    return model.get_num_layers(parallel)


def check_attention_layers(vllm_config, layer_names: list[str]) -> str:
    """Check the attention layers a worker holds a cache for; return their CPU kernel ISA."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    problems, isas = [], set()
    for name in layer_names:
        layer = layers.get(name)
        impl = getattr(layer, "impl", None)
        if not isinstance(impl, CPUAttentionBackendImpl):
            problems.append(f"{name}: attention backend {type(impl).__name__} (CPU_ATTN is supported)")
            continue
        if impl.sliding_window not in (None, -1):
            problems.append(f"{name}: sliding window {impl.sliding_window}")
        if impl.alibi_slopes is not None:
            problems.append(f"{name}: ALiBi")
        if getattr(impl, "sinks", None) is not None:
            problems.append(f"{name}: attention sinks")
        isas.add(getattr(layer, "isa", None))
    if len(isas) > 1 or None in isas:
        problems.append(f"the layers' CPU kernels differ or are unknown: {sorted(map(str, isas))}")
    if problems:
        raise ValueError("curdkv cannot compress these attention layers: " + "; ".join(problems))
    return isas.pop()
