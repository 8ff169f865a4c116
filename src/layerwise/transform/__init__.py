"""Depth transforms that produce a normal model: physical layer removal (`drop_layers`, `save_pruned`)."""

from .prune import DROPPED_LAYERS_KEY, drop_layers, original_layer_indices, parse_layer_list, save_pruned

__all__ = ["DROPPED_LAYERS_KEY", "drop_layers", "original_layer_indices", "parse_layer_list", "save_pruned"]
