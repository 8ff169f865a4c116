"""Family adapters: where each causal-LM architecture keeps its embedding, layers, norms, linears and head.

Diagnosis, transforms and (later) norm folding and quantization ask an adapter instead of knowing module names.
"""

from .adapters import SUPPORTED_FAMILIES, depth_view, model_map
from .maps import FEEDS, LINEAR_GROUPS, ROLES, DepthView, LayerMap, ModelMap, NormSite

__all__ = ["DepthView", "depth_view", "ModelMap", "LayerMap", "NormSite", "model_map", "SUPPORTED_FAMILIES",
           "ROLES", "FEEDS", "LINEAR_GROUPS"]
