"""Family adapters: where each causal-LM architecture keeps its embedding, layers, norms and head.

Diagnosis, transforms and (later) quantization ask an adapter instead of knowing module names.
"""

from .adapters import SUPPORTED_FAMILIES, DepthView, depth_view

__all__ = ["DepthView", "depth_view", "SUPPORTED_FAMILIES"]
