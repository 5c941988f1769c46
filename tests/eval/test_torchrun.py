"""A sharded run on real ranks: ``torchrun`` with two CPU processes (gloo) against one process.

The other sharding tests fake the ranks in one process; this one starts
them, so the process group, the barrier and rank 0's merge run as a user's
``torchrun --nproc-per-node 2 -m curdkv eval ...`` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import needs_smollm2

pytestmark = needs_smollm2

RUN = ["eval", "ruler", "--model", "smollm2-135m", "--tasks", "vt,niah_single_1", "--samples", "1",
       "--lengths", "1024", "--presses", "curdkv,snapkv", "--ratios", "0.5", "--dtype", "float32", "--no-progress"]
TIMINGS = ("prefill_seconds", "compression_seconds")


def _run(launcher: list[str], out) -> None:
    # One thread per process on both sides, so that the float32 matmuls add up in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, *launcher, "-m", "curdkv", *RUN, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _records(out) -> list[dict]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def test_two_ranks_merge_into_the_one_process_outputs(tmp_path):
    alone, sharded = tmp_path / "alone", tmp_path / "sharded"
    _run([], alone)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], sharded)
    assert not list(sharded.glob("predictions-rank*.jsonl"))  # rank 0 folded them in
    assert len(_records(alone)) == 2 * 3  # tasks x (full + 2 configurations), one sample each: one per rank
    assert _records(sharded) == _records(alone)  # the same answers, in the same order
    assert (sharded / "summary.csv").read_text() == (alone / "summary.csv").read_text()
    settings = json.loads((sharded / "settings.json").read_text())
    assert settings["world_size"] == 2 and settings["samples"] == 2
