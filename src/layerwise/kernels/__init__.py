"""Kernels: the same mathematics computed faster, chosen at run time and never stored in checkpoints or configs.

Each kernel module keeps a reference implementation (always available: CPU, float64, hooks) beside its fast
paths; `attnres.use("reference")` forces the reference where a test or benchmark compares the two.
"""
