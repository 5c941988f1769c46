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

from ..models import load_model
from .results import write_outputs
from .sample import EvalSample
from .sweep import Sweep, distributed_rank, merge_ranks, read_predictions, sweep_configs


@dataclass
class TaskFamily:
    """A benchmark as the runner sees it.

    ``samples(tokenizer)`` builds the samples (the same for every press);
    ``scorer(sample, prediction)`` scores one answer 0-100; ``averages``
    maps a label to the tasks averaged under it (the first is plotted).
    """

    name: str
    samples: Callable[[object], list[EvalSample]]
    scorer: Callable[[EvalSample, str], float]
    averages: dict[str, list[str]] = field(default_factory=dict)


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


def run_eval(
    family: TaskFamily, model_name: str, presses, ratios, out_dir, dtype: str = "bfloat16",
    device: str | None = None, batch_size: int | None = None, progress: bool = True,
) -> list[dict] | None:
    """Sweep ``presses`` x ``ratios`` (plus the full cache) over the family's samples.

    Returns the summary rows (on rank 0; ``None`` on the other ranks).
    """
    configs = sweep_configs(presses, ratios)
    out_dir = Path(out_dir)
    device = _init_distributed(device)
    rank, world = distributed_rank()
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    samples = family.samples(tokenizer)
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
        merge_ranks(out_dir)
    records = read_predictions(out_dir)
    title = f"{family.name} on {model_name}"
    rows = write_outputs(records, out_dir, family.averages, title)
    settings = {
        "family": family.name, "model": model_name, "presses": list(presses), "ratios": list(ratios),
        "dtype": dtype, "device": str(device), "world_size": world, "samples": len(samples),
    }
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return rows
