"""Triton kernels of prefprune (installed as `prefprune.kernels`); import only when Triton exists."""
