"""What a benchmark ran on, recorded next to its numbers."""

from __future__ import annotations

import platform

import torch


def environment() -> dict:
    """Machine, device and library versions, for benchmark JSON files."""
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    return info
