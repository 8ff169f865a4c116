"""Depth transforms that produce a normal model: `apply(model, ["drop=12-15", ...])` runs registered steps
(`layerwise.transform.steps`); `drop_layers` and `save_pruned` are physical layer removal."""

from ..lazy import lazy_exports

_EXPORTS = {
    "fold_norms": ".norms", "pre_rmsnorm": ".norms", "pre_crmsnorm": ".norms",
    "DROPPED_LAYERS_KEY": ".prune", "drop_layers": ".prune", "original_layer_indices": ".prune",
    "parse_layer_list": ".prune", "save_pruned": ".prune", "save_transformed": ".prune",
    "parse_layer_program": ".program", "program_layers": ".program",
    "apply": ".steps", "parse_steps": ".steps", "registered_steps": ".steps", "Step": ".steps",
    "register_step": ".steps",
}

__all__ = ["DROPPED_LAYERS_KEY", "Step", "apply", "drop_layers", "original_layer_indices", "parse_layer_list",
           "parse_layer_program", "parse_steps", "program_layers", "register_step", "registered_steps",
           "save_pruned", "save_transformed"]


# Imported on first use: `layerwise --help` must not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
