"""Depth transforms that produce a normal model: physical layer removal (`drop_layers`, `save_pruned`)."""

import importlib

_EXPORTS = {
    "DROPPED_LAYERS_KEY": ".prune", "drop_layers": ".prune", "original_layer_indices": ".prune",
    "parse_layer_list": ".prune", "save_pruned": ".prune",
}

__all__ = ["DROPPED_LAYERS_KEY", "drop_layers", "original_layer_indices", "parse_layer_list", "save_pruned"]


def __getattr__(name):  # imported on first use: `layerwise --help` must not import torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
