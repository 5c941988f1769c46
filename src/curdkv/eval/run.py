"""Run an evaluation: samples of a task family, a sweep over configurations, the outputs.

Works in one process (any device, or a model spread over GPUs with
``device="auto"``) and under ``torchrun --nproc-per-node N``, where each
rank takes its share of the samples on its own GPU and rank 0 writes the
merged outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..models import dtype_name, load_model
from ..report import environment
from .results import write_outputs
from .sample import EvalSample, read_samples, write_samples
from .sweep import Config, Sweep, distributed_rank, merge_ranks, read_predictions

SAMPLES = "samples.jsonl"
SAMPLES_META = "samples.json"


@dataclass
class TaskFamily:
    """A benchmark as the runner sees it.

    ``samples(tokenizer, max_length)`` builds the samples (the same for
    every press; ``max_length`` is the model's context, or None);
    ``scorer(sample, prediction)`` scores one answer 0-100; ``averages``
    maps a label to the tasks averaged under it (the first is plotted);
    ``params`` are what the samples depend on, recorded beside them.
    """

    name: str
    samples: Callable[[object, int | None], list[EvalSample]]
    scorer: Callable[[EvalSample, str], float]
    averages: dict[str, list[str]] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def _init_distributed(device: str | None) -> str | None:
    """Join the process group when launched by torchrun; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return device
    if device == "auto":
        raise ValueError("device must not be 'auto' under torchrun: each rank runs its own copy of the model")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device or "cpu"


def model_context(model) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), if it says."""
    return getattr(model.config, "max_position_embeddings", None)


def prepare_samples(family: TaskFamily, model_name: str, tokenizer, max_length, out_dir: Path) -> list[EvalSample]:
    """The run's samples: read from ``out_dir`` when an earlier run wrote them, else built and written there.

    Keeping them beside the predictions makes a resumed or sharded run
    answer exactly the same samples, and lets a machine without the data
    packages run samples built elsewhere.
    """
    meta = {"family": family.name, "model": model_name, **family.params}
    meta_path, samples_path = out_dir / SAMPLES_META, out_dir / SAMPLES
    if samples_path.exists() and meta_path.exists():
        written = json.loads(meta_path.read_text())
        if written != meta:
            raise ValueError(
                f"out_dir {str(out_dir)!r} holds samples built with {written}, not {meta}: use another --out"
            )
        return read_samples(samples_path)
    if tokenizer is None:
        raise ValueError(f"model {model_name!r} has no tokenizer; evaluations need a bundled or local model")
    samples = family.samples(tokenizer, max_length)
    if not samples:
        raise ValueError(f"the {family.name} settings {family.params} produced no samples")
    rank, _ = distributed_rank()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_samples(samples, samples_path)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return samples


def run_eval(
    family: TaskFamily, model_name: str, configs: list[Config], out_dir, dtype: str = "auto",
    device: str | None = None, batch_size: int | None = None, progress: bool = True, samples_only: bool = False,
) -> list[dict] | None:
    """Answer the family's samples under every configuration (see :func:`~curdkv.eval.sweep.sweep_configs`).

    ``samples_only``: build and write the samples, answer nothing (returns ``[]``).
    Returns the summary rows (on rank 0; ``None`` on the other ranks).
    """
    out_dir = Path(out_dir)
    device = _init_distributed(device)
    rank, world = distributed_rank()
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    samples = prepare_samples(family, model_name, tokenizer, model_context(model), out_dir)
    if samples_only:
        return []
    sweep = Sweep(model, tokenizer, model_name, configs, out_dir, family.scorer, batch_size)
    pending = sweep.pending(samples)
    total = sum(len(c) for _, c in pending)
    with tqdm(total=total, desc=f"{family.name} rank {rank}" if world > 1 else family.name, unit="answer",
              disable=not progress, position=rank, dynamic_ncols=True) as bar:
        sweep.run(samples, progress=bar.update)
    if world > 1:
        torch.distributed.barrier()
        if rank != 0:
            return None
        merge_ranks(out_dir, samples, configs)
    settings = {
        "family": family.name, "model": model_name, **family.params,
        "configs": [[c.label, c.ratio] for c in configs], "averages": family.averages,
        "dtype": dtype_name(model),
        "device": str(device), "world_size": world, "samples": len(samples), "environment": environment(),
    }
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return write_outputs(read_predictions(out_dir), out_dir, family.averages, f"{family.name} on {model_name}")


def report(run_dir, out_dir=None, presses=None, ratios=None, samples: int | None = None) -> list[dict]:
    """Re-render a run's outputs for a subset of its configurations (the full cache is always kept).

    ``presses``: press specs to keep (all by default), as labelled in the
    run (a calibrated press is ``PRESS@calibrated:TOL``); ``ratios``: fixed compression
    ratios to keep (calibrated presses are kept whatever their ratio); ``samples``:
    keep each task's first ``samples`` samples (compare configurations that
    ran on different numbers of samples on the same ones). Writes summary.csv, results.md and the plot to
    ``out_dir`` (default: ``run_dir``) and returns the summary rows.
    """
    run_dir = Path(run_dir)
    settings_path = run_dir / "settings.json"
    if not settings_path.exists():
        raise ValueError(f"run_dir {str(run_dir)!r} holds no finished run (settings.json is missing)")
    settings = json.loads(settings_path.read_text())
    records = read_predictions(run_dir)
    keep_press = set(presses) if presses else None
    keep_ratio = {round(float(r), 6) for r in ratios if not isinstance(r, str)} if ratios else None
    if samples is not None:
        records = [r for r in records if r["index"] < samples]
    chosen = [
        r for r in records
        if r["press"] == "full" or (
            (keep_press is None or r["press"] in keep_press)
            and (keep_ratio is None or "calibration_tolerance" in r
                 or round(float(r["compression_ratio"]), 6) in keep_ratio)
        )
    ]
    missing = sorted((keep_press or set()) - {r["press"] for r in chosen})
    if missing:
        raise ValueError(f"presses {missing} are not in the run {str(run_dir)!r}")
    if len(chosen) == sum(r["press"] == "full" for r in records):
        raise ValueError(f"no predictions in {str(run_dir)!r} match presses={presses} ratios={ratios}")
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{settings['family']} on {settings['model']}"
    return write_outputs(chosen, out_dir, settings.get("averages") or {}, title)
