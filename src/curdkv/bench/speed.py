"""``curdkv bench``: cache bytes, peak memory, prefill, decode and compression overhead.

For each context length: a plain full-cache prefill (time, peak memory),
then a prefill that compresses layer by layer (:func:`curdkv.compress`) for
every method and ratio (time including compression, peak memory; each
method's first prefill at a length is an untimed warm-up), then one
captured prefill from which every configuration's cache is built again
(:meth:`PrefillCapture.build_cache`) to time the compression alone
(scoring + selection + gather, every layer) and to decode a fixed number of
greedy tokens.

Derived columns, with the conventions they rest on:

- ``overhead_percent_of_prefill``: compression time of all layers over the
  full-cache prefill time (the paper's Appendix C.4 runtime comparison).
  The compression time is its GPU time with the host running ahead, as
  inside a prefill: each layer timed behind its own GPU sleep
  (:func:`curdkv.bench.timing.gpu_time`; host synchronisations still
  count) and summed over layers; ``overhead_host_behind_fraction``: the
  share of those timings in which the host had not queued all of a layer
  even after its sleep was doubled 3 times (0: each one is pure GPU time;
  None for presses timed as a whole build, which is not checked);
  ``overhead_wall_ms_total`` is a whole build timed alone, which on a fast
  GPU measures the host's kernel launches;
- ``overlapped_overhead_ms_per_layer``: what one layer's compression adds
  when it runs as :func:`curdkv.compress` runs it on CUDA, on a second
  stream beside the prefill (:mod:`curdkv.runtime.overlap`): measured on the middle
  layer beside compute-bound attention of the last
  ``min(8192, N)`` queries over the context
  (:func:`curdkv.bench.timing.overlapped_seconds`); at short contexts that
  attention is short too, so less is hidden than in a real prefill.
  ``overlapped_overhead_percent_of_prefill`` is it times the layers over
  the full-cache prefill time;
- ``bandwidth_limit_ms_per_layer``: one layer's K and V bytes read once at
  the measured copy bandwidth (read + write bytes per second of a
  device-to-device copy); ``overhead_vs_bandwidth`` is the measured
  per-layer overhead over it;
- ``overhead_floor_ms_per_layer``: the least memory traffic of the method
  as designed, in the same units: its scoring passes over K and V
  (:data:`SCORING_READS`: exact leverage reads both twice, SnapKV reads
  the keys once) plus reading and writing the kept ``1 - r`` once, which
  any compression that frees memory pays. ``overhead_vs_floor`` is the
  measured overhead over it: how far the kernels are from memory speed;
- ``ideal_decode_speedup``: what the smaller cache alone would give if the
  part of a decode step that grows with the cache shrank exactly with it:
  ``t_full / (t_fixed + (1 - r) (t_full - t_fixed))``, ``t_fixed`` being the
  step time with a near-empty cache (weights, host overhead);
  ``decode_efficiency`` is the measured speedup over the ideal one;
- ``decode_gpu_ms_per_token`` and the ``decode_gpu_*`` columns: the same
  from the GPU's own time per step (its kernels' summed durations,
  :func:`curdkv.bench.timing.decode_gpu_seconds_per_token`) over
  ``min(decode_tokens, 20)`` steps. Eager decoding at batch 1 is bound by
  the host's kernel launches, whose time swings from run to run on a
  shared host and does not shrink with the cache; the GPU time does.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..models import load_model
from ..presses import get_press, parse_press_spec
from ..report import environment
from ..context import capture_prefill
from ..runtime.graph_decode import graphs_possible
from ..runtime.hooks import compress
from ..runtime.layer import compress_layer
from ..runtime.model import attention_modules
from ..transformers_compat import forward_with_cache
from .timing import (
    copy_bandwidth,
    decode_gpu_seconds_per_token,
    decode_seconds_per_token,
    gpu_time,
    median_seconds,
    overlapped_seconds,
    replayed_seconds_per_token,
    timer,
)

GOALS = {
    "curdkv_overhead_percent_max": 0.2,
    "curdkv_overlapped_overhead_percent_max": 0.2,
    "curdkv_overhead_vs_bandwidth_max": 2.0,
    "snapkv_overhead_percent_max": 1.0,
    "decode_efficiency_min": 0.8,
}
# Passes over one layer's K and V bytes that each method's scoring needs at least.
SCORING_READS = {"curdkv": 2.0, "adacurdkv": 2.0, "curdkv-sketch": 1.0, "snapkv": 0.5, "adasnapkv": 0.5,
                 "knorm": 0.5}
# How the compression time alone is measured (see _alone_seconds); a bench.json timed another way is not resumed.
OVERHEAD_TIMING = "gpu time of each layer behind its own sleep, checked to be queued ahead of the gpu, summed"
# Decode steps whose kernels are summed for the GPU time (the profiler's records grow with every step).
GPU_DECODE_STEPS = 20
# Context of the near-empty cache that measures the fixed part of a decode step.
FIXED_CONTEXT = 64
# Queries of the attention that overlapped compression is timed beside.
BESIDE_QUERIES = 8192


@dataclass
class BenchSettings:
    """What ``curdkv bench`` measures; every field is recorded in the JSON."""

    model: str = "random:llama-3.1-8b"
    lengths: tuple[int, ...] = (4096, 16384, 32768, 65536, 131072)
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
    methods: tuple[str, ...] = ("curdkv", "curdkv-sketch", "adacurdkv", "snapkv")
    decode_tokens: int = 100
    repeats: int = 3
    decode_repeats: int = 2
    dtype: str = "bfloat16"
    device: str | None = None
    attn_implementation: str = "sdpa"
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        self.ratios = tuple(float(r) for r in self.ratios)
        self.methods = tuple(self.methods)
        if not self.lengths or any(n < FIXED_CONTEXT for n in self.lengths):
            raise ValueError(f"lengths must be integers >= {FIXED_CONTEXT}, got {self.lengths}")
        if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be numbers in [0, 1), got {self.ratios}")
        for method in self.methods:
            parse_press_spec(method)  # raises naming the registry
        for name in ("decode_tokens", "repeats", "decode_repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def same_run(self, other: dict) -> bool:
        """Whether a JSON's settings describe the same run up to the lengths and methods measured."""
        grown = ("lengths", "methods")
        mine = {k: v for k, v in self.as_dict().items() if k not in grown}
        theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in other.items() if k not in grown}
        return mine == theirs

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Memory:
    """Peak allocated bytes on a CUDA device over a block (``None`` on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, press=None) -> tuple[float, int | None]:
    """Seconds and peak bytes of one prefill (compressed layer by layer when ``press`` is given)."""
    with _Memory(ids.device) as memory:
        stop = timer(ids.device)
        cache = DynamicCache()
        if press is None:
            forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
        else:
            with compress(model, press):
                forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
        seconds = stop()
    del cache
    return seconds, memory.peak


def _tokens(vocab: int, length: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, vocab, (1, length), generator=gen).to(device)


def decode_timing(device) -> str:
    """How ``decode_ms_per_token`` is timed on ``device``; a bench.json timed another way is not resumed."""
    if graphs_possible(device):
        return "replayed CUDA graph, as ctx.ask decodes"
    return "eager loop of model(...) calls"


def _decode_ms(model, cache, first: torch.Tensor, position: int, settings: BenchSettings) -> tuple[float, float | None]:
    """Milliseconds per decode step: wall (median of ``decode_repeats`` runs) and the eager step's GPU time.

    On CUDA the wall time is the replayed graph's, what a user's ``ask``
    gets; elsewhere the eager loop's, after 3 untimed steps. The GPU time is
    always the eager step's kernels summed (what the cache size changes).
    """
    if graphs_possible(first.device):
        wall = replayed_seconds_per_token(model, cache, position, settings.decode_tokens,
                                          repeats=settings.decode_repeats)
    else:
        decode_seconds_per_token(model, cache, first, position, 3)
        wall = statistics.median(
            decode_seconds_per_token(model, cache, first, position, settings.decode_tokens)
            for _ in range(settings.decode_repeats)
        )
    gpu = decode_gpu_seconds_per_token(model, cache, first, position, min(settings.decode_tokens, GPU_DECODE_STEPS))
    return wall * 1000, None if gpu is None else gpu * 1000


def _fixed_decode_ms(model, settings: BenchSettings, device) -> tuple[float, float | None]:
    """Milliseconds per decode step (wall, GPU) with a near-empty cache: what does not shrink with the cache."""
    ids = _tokens(model.config.vocab_size, FIXED_CONTEXT, settings.seed, device)
    cache = capture_prefill(model, ids).build_cache(None)
    return _decode_ms(model, cache, ids[:, -1:], FIXED_CONTEXT, settings)


def _warm_up(model, settings: BenchSettings, device) -> None:
    """Compile every kernel once (Triton, cuBLAS plans) so no timing includes it."""
    ids = _tokens(model.config.vocab_size, 1024, settings.seed, device)
    capture = capture_prefill(model, ids)
    for method in settings.methods:
        cache = capture.build_cache(get_press(method, 0.5))
        decode_seconds_per_token(model, cache, ids[:, -1:], 1024, 2)
    _prefill(model, ids)


def _configs(settings: BenchSettings, done: set = frozenset()):
    """(method, ratio) of every row at one length, the full cache first, less those in ``done``."""
    configs = [("full", 0.0)] + [(m, r) for m in settings.methods for r in settings.ratios if r > 0]
    return [c for c in configs if c not in done]


@torch.no_grad()
def measure_length(
    model, settings: BenchSettings, length: int, bandwidth: float, fixed: tuple, bar=None, earlier: list | None = None,
) -> list[dict]:
    """Every configuration's row at one context length; ``fixed``: the near-empty cache's decode ms (wall, GPU).

    ``earlier``: rows of this length measured before (a resumed run); their
    configurations are not measured again, and their derived columns are
    recomputed with the new rows (the full cache's row is the reference).
    """
    device = next(model.parameters()).device
    ids = _tokens(model.config.vocab_size, length, settings.seed, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    earlier = earlier or []
    configs = _configs(settings, {(r["method"], r["compression_ratio"]) for r in earlier})
    # The first prefill of each method at a new length pays one-time costs: measured on an H100, the first
    # of a run was 0.4-2 s slower than the method's other ratios (13.7 against 11.7 s at 128K) and the
    # full cache's 1-5% slower than the compressed ones. One untimed prefill per method excludes them.
    for method in dict.fromkeys(method for method, _ in configs):
        ratio = next(r for m, r in configs if m == method)
        _prefill(model, ids, None if method == "full" else get_press(method, ratio))
    rows = {}
    for method, ratio in configs:
        press = None if method == "full" else get_press(method, ratio)
        prefill_s, peak = _prefill(model, ids, press)
        rows[method, ratio] = dict(
            context_tokens=length, method=method, compression_ratio=ratio, prefill_s=prefill_s,
            peak_prefill_bytes=peak, peak_prefill_above_weights_bytes=None if peak is None else peak - weights,
        )
    capture = capture_prefill(model, ids)
    layers = capture.num_layers
    layer_kv_bytes = capture.nbytes() / layers
    limit = layer_kv_bytes / bandwidth if bandwidth else None
    first = ids[:, -1:]
    for method, ratio in configs:
        press = None if method == "full" else get_press(method, ratio)
        built = []

        def build():
            # Scoring is part of the overhead: no reuse of an earlier repeat's scores.
            capture.forget_scores()
            built[:] = [capture.build_cache(press)]

        wall = 0.0 if press is None else median_seconds(build, device, settings.repeats)
        overhead, behind = (0.0, 0.0) if press is None else _alone_seconds(press, capture, build, wall, settings, device)
        overlapped = 0.0 if press is None else _overlapped_layer_seconds(press, capture, settings, device)
        if not built:
            build()
        cache = built[0]
        wall_ms, gpu_ms = _decode_ms(model, cache, first, length, settings)
        row = rows[method, ratio]
        row.update(
            kv_bytes=cache.nbytes(), decode_ms_per_token=wall_ms, decode_gpu_ms_per_token=gpu_ms,
            layers=layers, overhead_ms_total=overhead * 1000, overhead_ms_per_layer=overhead * 1000 / layers,
            overhead_wall_ms_total=wall * 1000, overhead_host_behind_fraction=behind,
            overlapped_overhead_ms_per_layer=None if overlapped is None else overlapped * 1000,
            bandwidth_limit_ms_per_layer=None if limit is None else limit * 1000,
        )
        del cache, built
        if bar is not None:
            bar.update(1)
    del capture
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _derive(earlier + list(rows.values()), *fixed)


def _layer_by_layer(press) -> bool:
    """Whether each layer is compressed on its own, right after its attention (no scores of later layers needed)."""
    return not press.compresses_after_prefill


def _alone_seconds(press, capture, build, wall: float, settings: BenchSettings, device) -> tuple[float, float | None]:
    """GPU time of compressing every layer with the host ahead of the GPU, each layer behind its own sleep.

    Also returns the fraction of timed repeats in which the host was still
    behind (:attr:`curdkv.bench.timing.GpuTime.host_behind`): 0 when every
    layer's launches were all queued before the GPU reached them; None for
    a whole build, which ends by reading its checks back (not checked).

    One sleep before a whole build does not keep the host ahead: the GPU's
    queue of pending launches is bounded, and a build of 32 layers at 60-120
    launches each overflows it, after which the host's launch rate paces the
    rest. Timed that way, exact CurDKV measured 0.7-1.3 ms per layer at
    every context from 4K to 128K tokens, although its memory traffic grows
    32-fold. Inside a prefill the queue does not run dry (each layer's
    attention is far longer than the host's launches), so compression adds
    each layer's own GPU time: that is what is summed here. Presses that
    need every layer's scores first are timed as a whole build.
    """
    if not _layer_by_layer(press):
        # A whole build reads its checks back at the end: unchecked (fraction None).
        times = [gpu_time(build, device, settings.repeats, host_seconds=wall, check=False)]
    else:
        queries = capture.window_queries(press)
        times = []
        for i in range(capture.num_layers):
            inputs = capture.keys[i], capture.values[i], queries[i], capture.modules[i], i
            # problems: the GPU route's checks stay on the device, as in a prefill (the CPU route ignores it).
            times.append(gpu_time(lambda: compress_layer(press, *inputs, problems=[]), device, settings.repeats))
    behind = None if any(t.host_behind is None for t in times) else \
        sum(t.host_behind for t in times) / sum(t.repeats for t in times)
    return sum(t.seconds for t in times), behind


def _overlapped_layer_seconds(press, capture, settings: BenchSettings, device) -> float | None:
    """GPU time the middle layer's compression adds beside compute-bound attention over its context."""
    if not _layer_by_layer(press):
        return None  # compressed after the whole prefill, not beside it
    i = capture.num_layers // 2
    keys, values, module = capture.keys[i], capture.values[i], capture.modules[i]
    window = capture.window_queries(press)[i]
    b, _, n, d = keys.shape
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    queries = torch.randn(b, module.config.num_attention_heads, min(BESIDE_QUERIES, n), d, generator=gen,
                          device=device).to(keys.dtype)
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(queries, keys, values, enable_gqa=True)
    return overlapped_seconds(
        lambda problems: compress_layer(press, keys, values, window, module, i, problems=problems),
        attend, device, 3 * settings.repeats,
    )


def _derive(rows: list[dict], fixed_ms: float, fixed_gpu_ms: float | None = None) -> list[dict]:
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        r["kv_gb"] = r["kv_bytes"] / 1e9
        r["kv_fraction_of_full"] = r["kv_bytes"] / full["kv_bytes"]
        r["peak_prefill_gb"] = None if r["peak_prefill_bytes"] is None else r["peak_prefill_bytes"] / 1e9
        r["overhead_percent_of_prefill"] = 100 * r["overhead_ms_total"] / 1000 / full["prefill_s"]
        overlapped = r.get("overlapped_overhead_ms_per_layer")
        r["overlapped_overhead_percent_of_prefill"] = None if overlapped is None else \
            100 * overlapped * r["layers"] / 1000 / full["prefill_s"]
        limit = r["bandwidth_limit_ms_per_layer"]
        r["overhead_vs_bandwidth"] = r["overhead_ms_per_layer"] / limit if limit and r["method"] != "full" else None
        _add_floor(r)
        for column, t_fixed, infix in (("decode_ms_per_token", fixed_ms, ""),
                                       ("decode_gpu_ms_per_token", fixed_gpu_ms, "_gpu")):
            t_full, t = full.get(column), r.get(column)
            if t_full is None or t is None or t_fixed is None:
                continue
            ideal_t = t_fixed + (1 - r["compression_ratio"]) * max(t_full - t_fixed, 0.0)
            r[f"decode{infix}_speedup"] = t_full / t
            r[f"ideal_decode{infix}_speedup"] = t_full / ideal_t
            r[f"decode{infix}_efficiency"] = r[f"decode{infix}_speedup"] / r[f"ideal_decode{infix}_speedup"]
    return rows


def _add_floor(r: dict) -> None:
    """The method's least memory traffic per layer (``overhead_floor_ms_per_layer``) and the overhead over it."""
    limit, reads = r.get("bandwidth_limit_ms_per_layer"), SCORING_READS.get(r["method"])
    floor = None if not limit or reads is None else limit * (reads + 2 * (1 - r["compression_ratio"]))
    r["overhead_floor_ms_per_layer"] = floor
    r["overhead_vs_floor"] = None if floor is None else r["overhead_ms_per_layer"] / floor


def check_goals(rows: list[dict]) -> dict:
    """The targets at the longest context measured: each with its value and whether it is met."""
    if not rows:
        return {}
    longest = max(r["context_tokens"] for r in rows)
    at = [r for r in rows if r["context_tokens"] == longest]
    full = next(r for r in at if r["method"] == "full")
    goals = {"context_tokens": longest}

    def worst(method: str, key: str):
        # .get: rows resumed from a JSON written before a column existed lack it.
        values = [r.get(key) for r in at if r["method"] == method and r.get(key) is not None]
        return max(values) if values else None

    # CurDKV's goals hold for both estimators: the exact default and the paper's sketch (named curdkv_sketch_*).
    targets = [(method, key, GOALS[f"curdkv_{goal}_max"], f"{method.replace('-', '_')}_{goal}")
               for method in ("curdkv", "curdkv-sketch")
               for key, goal in (("overhead_percent_of_prefill", "overhead_percent"),
                                 ("overlapped_overhead_percent_of_prefill", "overlapped_overhead_percent"),
                                 ("overhead_vs_bandwidth", "overhead_vs_bandwidth"))]
    targets.append(("snapkv", "overhead_percent_of_prefill", GOALS["snapkv_overhead_percent_max"],
                    "snapkv_overhead_percent"))
    for method, key, limit, name in targets:
        value = worst(method, key)
        if value is not None:
            goals[name] = {"worst": value, "max": limit, "met": value <= limit}
    for key in ("decode_efficiency", "decode_gpu_efficiency"):
        efficiencies = [r[key] for r in at if r["method"] != "full" and r.get(key) is not None]
        if efficiencies:
            value = min(efficiencies)
            goals[key] = {"worst": value, "min": GOALS["decode_efficiency_min"],
                          "met": value >= GOALS["decode_efficiency_min"]}
    peaks = [r["peak_prefill_bytes"] for r in at if r["method"] != "full" and r["peak_prefill_bytes"] is not None]
    if peaks and full["peak_prefill_bytes"] is not None:
        goals["peak_prefill_vs_full"] = {"worst": max(peaks) / full["peak_prefill_bytes"], "max": 1.0,
                                         "met": max(peaks) <= full["peak_prefill_bytes"]}
    return goals


def run_bench(settings: BenchSettings, out: str | Path | None = None, progress: bool = True) -> dict:
    """Measure every length, write JSON, table and plot.

    Resumes ``out/bench.json``: configurations (length, method, ratio) already
    there are kept, not measured again, so a long run can go in parts (by
    lengths, or by ``methods``) and a stopped one picks up where its last
    finished length left off.
    """
    from tqdm.auto import tqdm

    out = Path(out) if out is not None else None
    previous = _load_previous(out, settings)
    earlier = previous.get("rows", [])
    missing = {n: _configs(settings, {(r["method"], r["compression_ratio"]) for r in earlier if r["context_tokens"] == n})
               for n in settings.lengths}
    todo = [n for n in settings.lengths if missing[n]]
    methods = tuple(previous.get("settings", {}).get("methods", ()))
    methods += tuple(m for m in settings.methods if m not in methods)
    device = torch.device(settings.device)
    model, _ = load_model(settings.model, dtype=settings.dtype, device=device,
                          attn_implementation=settings.attn_implementation, seed=settings.seed)
    attention_modules(model)  # a clear error for unsupported models before anything runs
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and max(settings.lengths) > context:
        raise ValueError(f"lengths must not exceed the model's context of {context} tokens, got {max(settings.lengths)}")
    layer_bytes = _layer_kv_bytes(model, max(settings.lengths))
    result = {
        "environment": environment(),
        "settings": {**settings.as_dict(), "lengths": sorted({r["context_tokens"] for r in earlier} | set(settings.lengths)),
                     "methods": methods},
        "overhead_timing": OVERHEAD_TIMING,
        "decode_timing": decode_timing(device),
        "copy_bandwidth_gb_s": previous.get("copy_bandwidth_gb_s") or copy_bandwidth(layer_bytes, device) / 1e9,
        "rows": earlier,
    }
    if todo:
        _warm_up(model, settings, device)
    # A resumed run keeps its first part's near-empty decode: every row's ideal speedup then uses the same one.
    fixed = (previous.get("fixed_decode_ms_per_token"), previous.get("fixed_decode_gpu_ms_per_token"))
    if todo and fixed[0] is None:
        fixed = _fixed_decode_ms(model, settings, device)
    result["fixed_decode_ms_per_token"], result["fixed_decode_gpu_ms_per_token"] = fixed
    with tqdm(total=sum(len(missing[n]) for n in todo), desc="bench", unit="config", disable=not progress) as bar:
        for length in todo:
            bar.set_postfix_str(f"{length} tokens")
            kept = [r for r in result["rows"] if r["context_tokens"] != length]
            rows = measure_length(model, settings, length, result["copy_bandwidth_gb_s"] * 1e9, fixed, bar,
                                  earlier=[r for r in result["rows"] if r["context_tokens"] == length])
            result["rows"] = sorted(kept + rows, key=lambda r: (r["context_tokens"], r["method"] != "full"))
            result["goals"] = check_goals(result["rows"])
            if out is not None:  # after every length, so a run stopped part-way keeps what it measured
                write_outputs(result, out)
    if not todo:
        result["goals"] = check_goals(result["rows"])
        if out is not None:
            write_outputs(result, out)
    return result


def _layer_kv_bytes(model, length: int) -> int:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * length * heads * head_dim * next(model.parameters()).element_size()


def _load_previous(out: Path | None, settings: BenchSettings) -> dict:
    path = None if out is None else out / "bench.json"
    if path is None or not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if not settings.same_run(previous.get("settings", {})):
        raise ValueError(f"{path} holds a run with other settings; choose another --out or remove it")
    if previous.get("rows") and previous.get("overhead_timing") != OVERHEAD_TIMING:
        raise ValueError(f"{path} timed the compression overhead another way ({previous.get('overhead_timing')!r}, "
                         f"now {OVERHEAD_TIMING!r}); choose another --out or remove it")
    timing = decode_timing(torch.device(settings.device))
    if previous.get("rows") and previous.get("decode_timing", "eager loop of model(...) calls") != timing:
        raise ValueError(f"{path} timed decoding another way ({previous.get('decode_timing')!r}, now {timing!r}); "
                         "choose another --out or remove it")
    return previous


def write_outputs(result: dict, out: Path) -> None:
    """``bench.json``, ``bench.md`` (a table per length) and ``bench.png``."""
    from .plots import bench_table, plot_bench

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(bench_table(result))
    plot_bench(result, out / "bench.png")
