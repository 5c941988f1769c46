"""Speed and memory measurements: ``curdkv bench``."""

from .speed import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
