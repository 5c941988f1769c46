"""The sweep engine: one prefill per sample, every (press, ratio) from it.

For each sample the context is prefilled once with the full cache
(:func:`curdkv.capture_prefill`); every requested configuration's
compressed cache is built from that capture without running the model
again, and the question is answered on each. Configurations are answered
together, one batch row each (:mod:`curdkv.cache.stack`), which is what makes a
sweep of many presses x ratios cost little more than one of them on a GPU.

Predictions are appended to ``predictions.jsonl`` as they are made; a rerun
skips every (sample, configuration) already written. Under ``torchrun`` each
rank takes every world_size-th sample and writes its own file; rank 0 merges
them into the same outputs as a single-process run.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..cache.stack import stack_caches
from ..context import answer_greedily, capture_prefill
from ..presses import get_press, parse_press_spec
from .sample import EvalSample

FULL = "full"
PREDICTIONS = "predictions.jsonl"


CALIBRATED = "calibrated:"


@dataclass(frozen=True)
class Config:
    """One compression setting: a press spec (registry name with options, or ``"full"``) and a ratio.

    With ``tolerance`` set, the ratio is not fixed: the press chooses it for
    each context (context-calibrated compression, :meth:`Press.calibrated_ratio`),
    and the records carry the ratio chosen under the label ``PRESS@calibrated:TOL``.
    """

    press: str
    ratio: float
    tolerance: float | None = None

    @property
    def label(self) -> str:
        return self.press if self.tolerance is None else f"{self.press}@{CALIBRATED}{self.tolerance:g}"

    def build(self):
        return None if self.press == FULL else get_press(self.press, self.ratio)

    def build_for(self, capture):
        """The press for one captured context: calibrated configurations choose their ratio here."""
        press = self.build()
        if self.tolerance is None or press is None:
            return press
        return press.with_ratio(press.calibrated_ratio(capture.context_nll, self.tolerance))


def parse_ratio(value) -> tuple[float, float | None]:
    """``0.5`` -> ``(0.5, None)``; ``"calibrated:0.05"`` -> ``(0.0, 0.05)`` (the ratio is chosen per context)."""
    if isinstance(value, str) and value.startswith(CALIBRATED):
        try:
            tolerance = float(value[len(CALIBRATED):])
        except ValueError:
            tolerance = math.nan
        if not 0.0 < tolerance < 1.0:
            raise ValueError(f"ratios: a calibrated ratio must look like calibrated:TOL with TOL in (0, 1), got {value!r}")
        return 0.0, tolerance
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ratios must be numbers in (0, 1) or calibrated:TOL, got {value!r}") from None
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratios must be in (0, 1), got {value!r}")
    return ratio, None


def sweep_configs(
    presses: Iterable[str], ratios: Iterable[float], extra: Iterable[tuple[Iterable[str], Iterable[float]]] = ()
) -> list[Config]:
    """The full cache first, then every press at every ratio, then each ``extra`` (presses, ratios) grid.

    Presses are specs (``"curdkv"``, ``"curdkv:leverage=key"``, see
    :func:`curdkv.presses.parse_press_spec`); each is built once here so a
    bad spec fails before any model runs. A ratio may be ``"calibrated:TOL"``
    (presses that choose their ratio per context). Repeated configurations are dropped.
    """
    configs = [Config(FULL, 0.0)]
    for group_presses, group_ratios in [(presses, ratios), *extra]:
        group_presses, group_ratios = list(group_presses), [parse_ratio(r) for r in group_ratios]
        for spec in group_presses:
            if spec == FULL:
                continue
            parse_press_spec(spec)
            for r, tolerance in group_ratios:
                config = Config(spec, r, tolerance)
                press = config.build()
                if tolerance is not None and not press.calibrates:
                    raise ValueError(f"press {spec!r} cannot choose its ratio per context (calibrated:TOL)")
                if config not in configs:
                    configs.append(config)
    return configs


def record_key(record: dict) -> tuple:
    # A calibrated configuration's ratio differs per sample; its label alone names it.
    ratio = None if "calibration_tolerance" in record else float(record["compression_ratio"])
    return record["task"], record["length"], record["index"], record["press"], ratio


def config_key(sample, config: Config) -> tuple:
    ratio = None if config.tolerance is not None else config.ratio
    return sample.task, sample.length, sample.index, config.label, ratio


def read_predictions(out_dir: Path) -> list[dict]:
    """Every prediction written so far in ``out_dir`` (all ranks' files), later duplicates dropped.

    ``predictions*.jsonl.gz`` are archived predictions (committed run folders keep them
    gzipped, a tenth of the size); they are read first, so an answer redone since wins.
    """
    records: dict[tuple, dict] = {}
    archived = sorted(out_dir.glob("predictions*.jsonl.gz"))
    for path in archived + sorted(out_dir.glob("predictions*.jsonl")):
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for line in text.splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run; it is simply redone
                records[record_key(record)] = record
    return list(records.values())


def answer_order(samples: list[EvalSample]) -> dict[tuple, int]:
    """Each sample's place, by ``(task, length, index)``, in the order a run answers them.

    Round-robin over tasks and lengths (sample 0 of every task, then sample
    1, ...), so a run stopped part-way has answered every task on its first
    samples rather than some tasks only. Merged ranks are written in this
    order too, so that a sharded run's outputs read as one process's.
    """
    task_rank: dict[tuple, int] = {}
    for s in samples:
        task_rank.setdefault((s.task, s.length), len(task_rank))
    ordered = sorted(samples, key=lambda s: (s.index, task_rank[(s.task, s.length)]))
    return {(s.task, s.length, s.index): i for i, s in enumerate(ordered)}


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shared_query_window(presses: Iterable) -> int:
    """The context queries one shared prefill must keep for ``presses`` (``None``: the full cache): the most any reads."""
    return max([p.query_window for p in presses if p is not None] + [0])


class Sweep:
    """Answer samples under many configurations and append the predictions to ``out_dir``.

    ``scorer(sample, prediction) -> float`` gives one prediction's score
    (0-100). ``batch_size``: configurations answered together (``None``: all
    on CUDA, one at a time on CPU, where batching does not pay).
    """

    def __init__(
        self, model, tokenizer, model_name: str, configs: list[Config], out_dir, scorer: Callable,
        batch_size: int | None = None,
    ):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.configs = list(configs)
        self.out_dir = Path(out_dir)
        self.scorer = scorer
        device = next(model.parameters()).device
        self.batch_size = batch_size or (len(self.configs) if device.type == "cuda" else 1)
        self.presses = {c: c.build() for c in self.configs}
        self.query_window = shared_query_window(self.presses.values())

    def pending(self, samples: list[EvalSample]) -> list[tuple[EvalSample, list[Config]]]:
        """The samples of this rank with the configurations not yet written for them, tasks interleaved."""
        done = {record_key(r) for r in read_predictions(self.out_dir)}
        rank, world = distributed_rank()
        todo = []
        for i, sample in enumerate(samples):
            if i % world != rank:
                continue
            left = [c for c in self.configs if config_key(sample, c) not in done]
            if left:
                todo.append((sample, left))
        position = answer_order(samples)
        todo.sort(key=lambda item: position[(item[0].task, item[0].length, item[0].index)])
        return todo

    def run(self, samples: list[EvalSample], progress=None) -> None:
        """Answer every pending (sample, configuration); ``progress(n)`` is called after each answer."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank, world = distributed_rank()
        path = self.out_dir / (PREDICTIONS if world == 1 else f"predictions-rank{rank}.jsonl")
        with path.open("a") as out:
            if out.tell() and _last_byte(path) != b"\n":
                out.write("\n")  # end a line an interrupted run cut short, or the next record joins it
            for sample, configs in self.pending(samples):
                for record in self.answer(sample, configs):
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    if progress is not None:
                        progress(1)

    @torch.no_grad()
    def answer(self, sample: EvalSample, configs: list[Config]) -> list[dict]:
        prefill_seconds, capture = _timed(lambda: capture_prefill(self.model, sample.context, self.tokenizer,
                                                                  query_window=self.query_window))
        records = []
        for start in range(0, len(configs), self.batch_size):
            chunk = configs[start : start + self.batch_size]
            presses = [c.build_for(capture) if c.tolerance is not None else self.presses[c] for c in chunk]
            timed = [_timed(lambda p=p: capture.build_cache(p)) for p in presses]
            caches = [cache for _, cache in timed]
            cache = caches[0] if len(caches) == 1 else stack_caches(caches, capture.seq_len)
            predictions = answer_greedily(
                self.model, self.tokenizer, cache, capture.seq_len, sample.question, sample.max_new_tokens,
                sample.answer_prefix, separator="",
            )
            for config, press, (seconds, c), prediction in zip(chunk, presses, timed, predictions):
                records.append(
                    {
                        "model": self.model_name,
                        "task": sample.task,
                        "length": sample.length,
                        "index": sample.index,
                        "press": config.label,
                        "compression_ratio": 0.0 if press is None else press.compression_ratio,
                        "prediction": prediction,
                        "answers": list(sample.answers),
                        "score": float(self.scorer(sample, prediction)),
                        "context_tokens": capture.seq_len,
                        "kv_bytes": c.nbytes(),
                        # The captured prefill, and building this configuration's cache from it (scoring
                        # included for the first ratio of a press; later ratios reuse its scores).
                        "prefill_seconds": prefill_seconds,
                        "compression_seconds": seconds,
                        **({} if config.tolerance is None else {"calibration_tolerance": config.tolerance}),
                    }
                )
            del caches, cache, timed
        return records


def _timed(fn):
    """``(seconds, fn())``, the GPU's queue drained at both ends so its work is counted."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def merge_ranks(out_dir, samples: list[EvalSample], configs: list[Config]) -> Path:
    """Rank 0 after a distributed run: fold every rank's file into ``predictions.jsonl``.

    Records are written in the order one process would have answered them
    (:func:`answer_order`, then the configurations' order), so the summary,
    whose tasks and presses keep the order they first appear in, is the
    one-process run's. Records of samples or configurations outside this
    run (an earlier run's, in the same folder) follow, in key order.
    """
    out_dir = Path(out_dir)
    position = answer_order(samples)
    config_rank = {(c.label, None if c.tolerance is not None else float(c.ratio)): i for i, c in enumerate(configs)}

    def order(record: dict) -> tuple:
        task, length, index, press, ratio = record_key(record)
        return (position.get((task, length, index), len(position)), config_rank.get((press, ratio), len(config_rank)),
                task, length, index, press, -1.0 if ratio is None else ratio)

    records = sorted(read_predictions(out_dir), key=order)
    target = out_dir / PREDICTIONS
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, target)
    for path in out_dir.glob("predictions-rank*.jsonl"):
        path.unlink()
    return target

