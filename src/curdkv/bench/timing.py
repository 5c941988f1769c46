"""Timers and bandwidth probes shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import torch

from ..attention import using_curdkv_attention


def timer(device: torch.device):
    """Start a clock; the returned function gives seconds since (CUDA events on GPU, wall time on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop() -> float:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()

        def stop() -> float:
            return time.perf_counter() - t0

    return stop


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        stop = timer(device)
        fn()
        times.append(stop())
    return statistics.median(times)


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy of ``nbytes``.

    The convention of CUDA's bandwidthTest and STREAM's copy: a copy of B
    bytes moves 2B. Reading B bytes once therefore takes ``B / copy_bandwidth``.
    """
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / seconds


@torch.no_grad()
def decode_seconds_per_token(model, cache, first_token: torch.Tensor, position: int, steps: int) -> float:
    """Seconds per greedy decode step over ``steps`` steps (fixed length); the cache is restored afterwards."""
    snapshot = cache.snapshot()
    token = first_token
    stop = timer(first_token.device)
    with using_curdkv_attention(model):
        for step in range(steps):
            pos = torch.tensor([[position + step]], device=token.device)
            logits = model(input_ids=token, past_key_values=cache, position_ids=pos, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    seconds = stop()
    cache.restore(snapshot)
    return seconds / steps
