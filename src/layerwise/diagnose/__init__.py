"""Layer-wise diagnostics of causal LMs (ours and Hugging Face families): one streaming pass, removal effects."""

import importlib

_EXPORTS = {
    "SUPPORTED_FAMILIES": "..arch", "DepthView": "..arch", "depth_view": "..arch", "DepthDiagnosis": ".metrics",
    "diagnose": ".metrics",
}

__all__ = ["DepthView", "depth_view", "SUPPORTED_FAMILIES", "DepthDiagnosis", "diagnose"]


def __getattr__(name):  # imported on first use: `layerwise --help` must not import torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
