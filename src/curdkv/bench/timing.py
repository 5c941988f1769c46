"""Timers and bandwidth probes shared by the benchmarks."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch

from ..attention.function import using_curdkv_attention
from ..cache.fixed import FixedCapacityCache
from ..runtime.graph_decode import GraphDecoder
from ..transformers_compat import forward_with_cache


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


# Times the GPU sleep is doubled when the host falls behind, before the repeat is taken as it is.
SLEEP_DOUBLINGS = 3


@dataclass
class GpuTime:
    """:func:`gpu_time`'s result: the median GPU seconds and how far they can be trusted."""

    seconds: float
    repeats: int
    # Repeats in which the GPU reached ``fn`` before the host had queued all of it, even after
    # SLEEP_DOUBLINGS doublings of the sleep: their time includes the host's launches or a wait
    # on the host (a synchronisation inside ``fn``, or more launches than the GPU's queue holds).
    # None: not checked (``fn`` ends by reading back from the GPU, which leaves nothing to check).
    host_behind: int | None


def gpu_time(fn, device: torch.device, repeats: int, warmup: int = 1, host_seconds: float | None = None,
             check: bool = True) -> GpuTime:
    """Median GPU time of ``fn()`` while the host runs ahead of the GPU, as it does inside a prefill.

    Timed alone, a function that launches many small kernels measures the
    host's launch time, not the GPU's work. Inside a long prefill the host
    is far ahead (one layer's attention at 128K tokens keeps the GPU busy
    for hundreds of milliseconds), so what compression adds there is its GPU
    time plus any wait it forces on the host. Here a GPU sleep longer than
    ``fn``'s host time is queued first, so ``fn``'s launches are all queued
    before the GPU reaches them. Whether they were is checked, not assumed:
    if the sleep had already ended when the host finished queueing, the
    repeat runs again behind a sleep twice as long (see
    :attr:`GpuTime.host_behind`). A host synchronisation inside ``fn`` still
    shows up, as the idle time it causes. ``host_seconds``: ``fn`` timed alone
    (:func:`median_seconds`) if the caller has it already, else measured here,
    to size the first sleep. ``check=False`` for an ``fn`` that ends by
    reading back from the GPU (the sleep has always ended by then): one
    sleep, no retry, ``host_behind`` None. On CPU this is :func:`median_seconds`.
    """
    if device.type != "cuda":
        return GpuTime(median_seconds(fn, device, repeats, warmup), repeats, 0)
    if host_seconds is None:
        host_seconds = median_seconds(fn, device, max(1, min(repeats, 3)), warmup)
    cycles = int(2 * host_seconds * sleep_cycles_per_second(device.index)) + 1
    times, behind = [], 0
    for _ in range(repeats):
        if check:
            seconds, late, cycles = _ahead_of_host(lambda c: _behind_sleep(fn, c), cycles)
            behind += late
        else:
            seconds = _behind_sleep(fn, cycles)[0]
        times.append(seconds)
    return GpuTime(statistics.median(times), repeats, behind if check else None)


def device_seconds(fn, device: torch.device, repeats: int, warmup: int = 1, host_seconds: float | None = None,
                   check: bool = True) -> float:
    """:func:`gpu_time`'s median seconds alone."""
    return gpu_time(fn, device, repeats, warmup, host_seconds, check).seconds


def _behind_sleep(fn, cycles: int) -> tuple[float, bool]:
    """GPU seconds of ``fn()`` queued behind a sleep of ``cycles``; and whether the GPU reached it too early."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    start.record()
    fn()
    end.record()
    # Start not reached yet: every launch of fn was queued while the GPU still slept.
    early = start.query()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000, early


def _ahead_of_host(run, cycles: int) -> tuple[float, bool, int]:
    """``run(cycles) -> (seconds, behind)``, again behind a doubled sleep while the host falls behind.

    Returns the last run's seconds, whether the host was still behind, and
    the sleep to start the next repeat with.
    """
    for doubling in range(SLEEP_DOUBLINGS + 1):
        seconds, behind = run(cycles)
        if not behind or doubling == SLEEP_DOUBLINGS:
            return seconds, behind, cycles
        cycles *= 2


def overlapped_seconds(work, beside, device: torch.device, rounds: int) -> float:
    """Median GPU time that ``work`` adds to ``beside()`` when queued next to it on a second stream.

    ``work(problems)`` is one layer's compression (:mod:`curdkv.runtime.overlap`);
    ``beside()`` compute-bound work that takes far longer, like the prefill
    it overlaps. Each round times ``beside()`` alone and then the pair,
    back to back, so that clock drift cancels in the difference; what is
    not added was hidden in resources ``beside`` left idle. On CPU there
    is no second stream and this is ``work``'s time.
    """
    from ..runtime.overlap import SideStream

    if device.type != "cuda":
        return median_seconds(lambda: work([]), device, rounds)
    side = SideStream()

    def both():
        side.run(work, (), device)
        beside()
        side.finish()

    host = median_seconds(both, device, 3)
    added = []
    for _ in range(rounds):
        alone = device_seconds(beside, device, 1, warmup=0, host_seconds=host)
        # both() ends by reading the side stream's checks back: nothing left to check, no retries.
        added.append(device_seconds(both, device, 1, warmup=0, host_seconds=host, check=False) - alone)
    return statistics.median(added)


@functools.cache
def sleep_cycles_per_second(device_index: int | None) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1000)


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
    """Seconds per greedy decode step over ``steps`` steps (fixed length); the cache is restored afterwards.

    Positions are on the device before the first step: a per-step
    ``torch.tensor`` is a copy from pageable host memory, which waits for the
    GPU's queue to drain and so stops the host from running ahead.
    """
    snapshot = cache.snapshot()
    token = first_token
    positions = torch.arange(position, position + steps, device=token.device).view(steps, 1, 1)
    stop = timer(first_token.device)
    with using_curdkv_attention(model):
        for step in range(steps):
            logits = forward_with_cache(model, cache, input_ids=token, position_ids=positions[step], use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    seconds = stop()
    cache.restore(snapshot)
    return seconds / steps


def replayed_seconds_per_token(model, cache, position: int, steps: int, lean: bool | None = None,
                               repeats: int = 1) -> float:
    """Seconds per greedy step replayed as a CUDA graph (:class:`curdkv.runtime.graph_decode.GraphDecoder`).

    What ``ctx.ask`` runs on CUDA: ``cache`` (every row at context length
    ``position``) gets a tail for the steps, one graph is captured, and the
    median over ``repeats`` runs of ``steps - 1`` replays is returned; the
    first step, the capture and one replay are not timed. ``lean``: the
    decoder's choice of step (``None``: the lean step where it applies).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one untimed replay, then the timed ones), got {steps}")
    rows = cache.layers[0].keys.shape[0]
    device = cache.layers[0].keys.device
    replays = 1 + repeats * (steps - 1)
    fixed = FixedCapacityCache.from_cache(cache, replays + 2)
    token = torch.zeros(rows, dtype=torch.int64, device=device)
    no_end = torch.tensor([-1], device=device)  # no token id is -1: every step runs
    times = []
    with using_curdkv_attention(model):
        decoder = GraphDecoder(model, fixed, token, torch.full((rows,), position, device=device), no_end,
                               replays + 1, lean=lean)
        decoder.start()
        decoder.graph.replay()
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps - 1):
                decoder.graph.replay()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / (steps - 1))
    return statistics.median(times)


def decode_gpu_seconds_per_token(model, cache, first_token: torch.Tensor, position: int, steps: int) -> float | None:
    """GPU time per greedy decode step: the summed durations of its kernels and copies (``None`` off CUDA).

    At batch 1 an eager decode step launches over a thousand small kernels,
    and the host, not the GPU, sets the wall time: on a shared host it swung
    between 20 and 60 ms per step for the same step of an 8B model. The
    GPU's own time is what the cache size changes, and what a decode that
    keeps the GPU fed (CUDA graphs, larger batches) gets; it comes from the
    profiler's kernel records, so gaps where the GPU waits for the host are
    not counted.
    """
    if first_token.device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        decode_seconds_per_token(model, cache, first_token, position, steps)
    # CUDA-only records are the kernels, copies and fills themselves: no operator double counts them.
    microseconds = sum(event.self_device_time_total for event in profile.key_averages())
    return microseconds / 1e6 / steps
