"""Fused GPU kernels (Triton); each module imports Triton lazily so the package imports without it."""
