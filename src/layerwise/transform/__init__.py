"""Depth transforms that produce a normal model: physical layer removal (`drop_layers`, `save_pruned`)."""

from ..lazy import lazy_exports

_EXPORTS = {
    "DROPPED_LAYERS_KEY": ".prune", "drop_layers": ".prune", "original_layer_indices": ".prune",
    "parse_layer_list": ".prune", "save_pruned": ".prune",
}

__all__ = ["DROPPED_LAYERS_KEY", "drop_layers", "original_layer_indices", "parse_layer_list", "save_pruned"]


# Imported on first use: `layerwise --help` must not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
