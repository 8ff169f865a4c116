"""Layer programs on layerwise models: run the current layers in a new order, with repeats and omissions.

A program is a list `order`: new execution position p runs the layer at current position `order[p]`. The
result is an ordinary `LayerwiseForCausalLM` whose config says what it runs:
  tie=False  every position gets its own layer (a repeated layer is a copy with its own weights, mergekit's
             passthrough, SOLAR's depth up-scaling); `layer_order` stays None.
  tie=True   a layer repeated in the program stays one set of weights run at several positions (a loop);
             `layer_order` maps each position to its stored layer, and the stored layers are renumbered in
             order of first use.
Either way `n_layers` becomes the number of positions, every position has its own KV-cache slot (the residual
scheme passes the position to each layer), and `layer_origin` records each position's index in the original
model. LayerNorm Scaling reads that origin index, so every layer keeps its own scale and the saved program
reloads exactly.
"""

from __future__ import annotations

import copy

from torch import nn

from ..config import layer_origin_of
from ..errors import UserError


def _origins(cfg) -> list[int]:
    """Each current position's index in the original model (its stored layer when never reshaped)."""
    origin = layer_origin_of(cfg)
    return origin if origin is not None else cfg.execution_order


def check_layerwise_program(model: nn.Module, order: list[int], tie: bool) -> None:
    """Raise UserError naming the reason when `model` cannot run program `order` (see the module docstring).

    `tie` is accepted for the common signature of program checks: a layerwise config can always state tied
    layers (`layer_order`), so only the variants decide. Refused: dropping under a variant that is not
    `drop_safe`, repeating under one that is not `repeat_safe` (AttnRes mixers and value-residual parameters
    belong to positions of the trained model). A `depth_dependent` variant (Mix-LN, DeepNorm) runs a program
    in memory, as `drop` does, but its result cannot be saved: its layers would be rebuilt differently at their
    new positions, and the config check refuses it at save."""
    from ..nn.registry import REGISTRIES, selected_variants

    cfg = model.config
    n = cfg.n_layers
    valid = f"positions of this {n}-layer model are 0..{n - 1}"
    if not order:
        raise UserError(f"layer program is empty; list at least one layer ({valid})")
    for index in order:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise UserError(f"layer {index!r} in the layer program is not a position of the model; {valid}")
    if list(order) == list(range(n)):
        return
    dropped, repeated = set(range(n)) - set(order), len(order) > len(set(order))
    for variant in selected_variants(cfg):
        field = variant.selector_field
        if dropped and not variant.drop_safe:
            action, hazard = "drop", variant.drop_hazard
        elif repeated and not variant.repeat_safe:
            action, hazard = "repeat", variant.repeat_hazard
        else:
            continue
        safe = [v.registered_name for v in REGISTRIES[field].classes()
                if v.drop_safe and v.repeat_safe] if field in REGISTRIES else []
        hint = f"; only {field}={' or '.join(map(repr, safe))} models take layer programs" if safe else ""
        raise UserError(f"cannot {action} layers of a {field}={getattr(cfg, field)!r} model: {hazard}{hint}")


def program_layerwise_model(model: nn.Module, order: list[int], tie: bool) -> nn.Module:
    """Reprogram `model` in place to run the layers at current positions `order` and return it.

    Example: `program_layerwise_model(model, [0, 1, 2, 1, 2, 3], tie=True)` runs layers 1 and 2 twice with one
    set of weights; with tie=False the second run of each is a copy that can be trained apart.
    """
    check_layerwise_program(model, order, tie)
    cfg = model.config
    if list(order) == list(range(cfg.n_layers)):
        return model
    stored = model.model.layers
    current, origins = cfg.execution_order, _origins(cfg)
    runs = [current[p] for p in order]  # the current stored layer of each new position
    if tie:
        kept = list(dict.fromkeys(runs))  # stored layers in order of first use
        layers = [stored[k] for k in kept]
        new_order = [kept.index(k) for k in runs]
    else:
        seen: set[int] = set()
        layers = []
        for k in runs:
            layers.append(copy.deepcopy(stored[k]) if k in seen else stored[k])
            seen.add(k)
        new_order = list(range(len(runs)))
    model.model.layers = nn.ModuleList(layers)
    for config in {id(c): c for c in (model.config, model.model.config)}.values():
        config.n_layers = len(order)
        config.layer_order = None if new_order == list(range(len(order))) else new_order
        config.layer_origin = [origins[p] for p in order]
        config.layerwise_dropped_layers = None  # superseded by layer_origin, which also says what repeats
    _renumber(model)
    return model


def _renumber(model: nn.Module) -> None:
    """Each stored layer's `layer_idx` (its own and its attention's) becomes its first execution position: the
    KV-cache slot it uses when run outside a residual scheme."""
    cfg = model.config
    for k, layer in enumerate(model.model.layers):
        position = cfg.first_position(k)
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
