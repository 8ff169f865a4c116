"""Layer-wise diagnostics of causal LMs (ours and Hugging Face families): one streaming pass, removal effects."""

from ..lazy import lazy_exports

_EXPORTS = {
    "SUPPORTED_FAMILIES": "..arch", "DepthView": "..arch", "depth_view": "..arch", "DepthDiagnosis": ".metrics",
    "diagnose": ".metrics",
}

__all__ = ["DepthView", "depth_view", "SUPPORTED_FAMILIES", "DepthDiagnosis", "diagnose"]


# Imported on first use: `layerwise --help` must not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
