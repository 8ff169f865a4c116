"""Physical layer removal: delete decoder layers from a causal LM in place, leaving a normal model.

Deleting `model.layers[i]` is the easy part; what else indexes the layers must follow, or the pruned model
decodes wrongly with its KV cache while its cache-free forward looks right: each attention module's
`layer_idx` picks its KV-cache slot (transformers #30508), the config states the depth and per-layer lists
(`layer_types`) from which a cache and a reloaded model are built, and a saved model should say what was
removed. Surviving layers keep their own math: nothing is rebuilt. Dropping is the layer program that lists
the survivors in order (`layerwise.transform.program` does the renumbering and the config).

Indices are 0-based positions in the model as given; the config's `layer_origin` records the survivors as
indices of the *original* model, so pruning twice composes.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..arch import depth_view
from .program import (DROPPED_LAYERS_KEY, PER_LAYER_CONFIG_LISTS, check_reshapeable, layer_items,
                      original_layer_indices, program_layers, rebuild_stack)
from .save import save_transformed
from .steps import Step, register_step

__all__ = ["DROPPED_LAYERS_KEY", "PER_LAYER_CONFIG_LISTS", "drop_layers", "original_layer_indices",
           "parse_layer_list", "save_pruned", "save_transformed"]


def drop_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Delete decoder layers `layers` (0-based) from `model` in place and return it.

    The result runs forward, `generate` with a KV cache and `save_pretrained` / `from_pretrained` like any model
    of its family with fewer layers; its config says under `layer_origin` which original layer each survivor
    is. Example: `drop_layers(model, parse_layer_list("14,20-23"))`.
    """
    check_reshapeable(model)
    stack = depth_view(model).layers
    if model.config.num_hidden_layers != len(stack):
        raise ValueError(f"config.num_hidden_layers={model.config.num_hidden_layers} disagrees with the model's "
                         f"{len(stack)} layers; fix the config before pruning")
    drop = _validated_indices(layers, len(stack))
    if not drop:
        return model
    keep = [i for i in range(len(stack)) if i not in drop]
    if getattr(model.config, "layer_order", None) is not None:  # a layerwise model running a program already
        return program_layers(model, keep, tie=True)  # no repeats are added, so tie only keeps existing sharing
    return rebuild_stack(model, keep, [original_layer_indices(model.config)[i] for i in keep])


def parse_layer_list(text: str) -> list[int]:
    """0-based layer indices from a comma list with inclusive ranges: "14,20-23" -> [14, 20, 21, 22, 23].

    Ranges include both ends (unlike mergekit's end-exclusive `layer_range`); indices count from 0 (unlike
    PruneMe's printed 1-based ones). Sorted; an index listed twice is an error, as it usually means a typo.
    """
    example = 'e.g. "14,20-23" (0-based, ranges inclusive)'
    indices: set[int] = set()
    for item, start, stop in layer_items(text, f"layer list {text!r}", example):
        if stop < start:
            raise ValueError(f"range {item!r} in layer list {text!r} runs backwards; write it as {stop}-{start}")
        span = set(range(start, stop + 1))
        if indices & span:
            raise ValueError(f"layer {min(indices & span)} appears twice in layer list {text!r}; {example}")
        indices |= span
    return sorted(indices)


def _validated_indices(layers: Iterable[int], n_layers: int) -> list[int]:
    valid = f"valid layer indices are 0..{n_layers - 1} (0-based)"
    drop: list[int] = []
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"layer index {index!r} is not an integer; {valid}")
        if not 0 <= index < n_layers:
            raise ValueError(f"layer index {index} is out of range for a {n_layers}-layer model; {valid}")
        if index in drop:
            raise ValueError(f"layer index {index} is listed twice; {valid}")
        drop.append(index)
    if len(drop) == n_layers:
        raise ValueError(f"dropping all {n_layers} layers leaves no model; keep at least one of 0..{n_layers - 1}")
    return sorted(drop)


save_pruned = save_transformed  # the name from before transform steps; pruning is one of them


@register_step("drop")
class DropLayers(Step):
    """Delete layers (the step behind `layerwise prune --drop`)."""

    argument = "required"
    argument_help = 'layers to delete, 0-based, ranges inclusive: "12-15,20"'
    summary = "delete decoder layers; the survivors are renumbered and keep their own math"

    def parse(self, value):
        try:
            self.layers = parse_layer_list(value)
        except ValueError as err:
            self.refuse(str(err))

    def check(self, model):
        try:
            check_reshapeable(model)
            _validated_indices(self.layers, len(depth_view(model).layers))
        except ValueError as err:
            self.refuse(str(err))

    def apply(self, model):
        return drop_layers(model, self.layers)
