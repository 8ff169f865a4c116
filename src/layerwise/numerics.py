"""Small numeric helpers shared by the model, diagnostics and evaluation."""

from __future__ import annotations

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is: statistics never run in bf16, and float64 checks stay exact."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
