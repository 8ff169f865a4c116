"""Layer programs: a new decoder stack that lists source layers in order, `layers=0-15,12-15,16-29[:tie]`.

A program can drop, repeat and reorder layers at once; a source layer it does not list is simply absent.
Repeated layers are materialised copies by default (mergekit's passthrough merge, SOLAR's depth up-scaling);
with `:tie` every occurrence after the first shares the first one's Parameters and buffers (one set of weights
run several times, as in looped or recursive transformers).

Either way every execution position gets its own KV-cache slot. A layer object run twice with one `layer_idx`
writes its keys into one slot twice, so cached decoding attends to the wrong keys while the cache-free forward
looks right. A tied occurrence is therefore a shallow copy of the modules on the path down to each module that
holds a `layer_idx` (the decoder layer, its attention), and every position's `layer_idx` is renumbered to the
position. Tensors are never copied.

The config follows the new stack: its depth, its per-layer lists (`layer_types`, `mlp_layer_types`) re-indexed
by the program, Qwen2/3's `max_window_layers`, and `layer_origin`: for each new position, the index in the
ORIGINAL model (before any transform) of the layer it runs. `layerwise_dropped_layers`, the field that
`layer_origin` replaces, is still read from old configs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedConfig

from ..arch import depth_view
from ..config import layer_origin_of
from ..errors import UserError
from .steps import Step, mark_unsaveable, register_step

ORIGIN_KEY = "layer_origin"
DROPPED_LAYERS_KEY = "layerwise_dropped_layers"  # the provenance field of configs written before layer_origin
# Config lists with one entry per layer (sliding vs full attention, dense vs MoE MLP); re-indexed by a program.
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")
_EXAMPLE = 'e.g. "0-15,12-15,16-29" or "0-15,12-15,16-29:tie" (0-based, ranges inclusive, repeats allowed)'


@dataclass(frozen=True)
class LayerProgram:
    """For each new position, the index of the current layer it runs; `tie`: repeats share weights."""

    order: tuple[int, ...]
    tie: bool = False


def layer_items(text: str, where: str, example: str) -> list[tuple[str, int, int]]:
    """The comma items of a layer list or program, each "a" or "a-b", as (item, a, b) with b included; a
    UserError names an item that is neither (`where` says which text, `example` a valid one)."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        first, dash, last = item.partition("-")
        if not first.strip().isdecimal() or (dash and not last.strip().isdecimal()):
            raise UserError(f"{item!r} in {where} is not an index or a range a-b; {example}")
        items.append((item, int(first), int(last) if dash else int(first)))
    return items


def parse_layer_program(text: str) -> LayerProgram:
    """A program from its text: "0-3,2-3,4-5" -> order (0, 1, 2, 3, 2, 3, 4, 5); a ":tie" suffix sets tie.

    Indices are 0-based and ranges include both ends, as in `drop=`; unlike a drop list, an index may repeat
    and the order is kept.
    """
    body, colon, suffix = text.strip().partition(":")
    if colon and suffix.strip() != "tie":
        raise UserError(f"layer program {text!r} ends with {':' + suffix!r}; the only suffix is ':tie' (repeated "
                        f"layers share one set of weights); {_EXAMPLE}")
    if not body.strip():
        raise UserError(f"layer program {text!r} lists no layers; {_EXAMPLE}")
    order: list[int] = []
    for item, start, stop in layer_items(body, f"layer program {text!r}", _EXAMPLE):
        if stop < start:
            raise UserError(f"range {item!r} in layer program {text!r} runs backwards; write {stop}-{start}, or "
                            f"list the layers one by one to run them in reverse: "
                            f"{','.join(map(str, range(start, stop - 1, -1)))}")
        order.extend(range(start, stop + 1))
    return LayerProgram(tuple(order), tie=bool(colon))


def original_layer_indices(config) -> list[int]:
    """For each current layer position, the index in the original (never transformed) model of the layer it
    runs (`layerwise.config.layer_origin_of`; positions themselves for a model never reshaped)."""
    origin = layer_origin_of(config)
    return origin if origin is not None else list(range(config.num_hidden_layers))


def check_layer_program(model: nn.Module, order: Sequence[int], tie: bool = False) -> None:
    """Raise UserError naming the reason when `model` cannot run layer program `order`."""
    if getattr(model.config, "model_type", None) == "layerwise":
        from .layerwise_program import check_layerwise_program

        check_layerwise_program(model, list(order), tie)
        return
    check_reshapeable(model)
    n_layers = len(depth_view(model).layers)
    if model.config.num_hidden_layers != n_layers:
        raise UserError(f"config.num_hidden_layers={model.config.num_hidden_layers} disagrees with the model's "
                        f"{n_layers} layers; fix the config before reshaping it")
    valid = f"valid layer indices are 0..{n_layers - 1} (0-based)"
    if not order:
        raise UserError(f"the layer program is empty, which leaves no model; list at least one layer, {valid}")
    for index in order:
        if isinstance(index, bool) or not isinstance(index, int):
            raise UserError(f"layer index {index!r} is not an integer; {valid}")
        if not 0 <= index < n_layers:
            raise UserError(f"layer index {index} is out of range for a {n_layers}-layer model; {valid}")
    for config in _configs(model):
        _window_boundary(config, order)


def program_layers(model: nn.Module, order: Sequence[int], tie: bool = False) -> nn.Module:
    """Rebuild `model`'s decoder stack as the layers `order` lists (indices of current positions) and return
    the model (in place for HF families). `tie`: repeated layers share weights, and the model is marked
    unsaveable, since no HF family's config can say that two layers share weights."""
    order = list(order)
    check_layer_program(model, order, tie)
    origin = [original_layer_indices(model.config)[i] for i in order]
    if model.config.model_type == "layerwise":
        from .layerwise_program import program_layerwise_model

        model = program_layerwise_model(model, order, tie)
        _record_origin(model.config, origin)
        return model
    return rebuild_stack(model, order, origin, tie)


def rebuild_stack(model: nn.Module, order: list[int], origin: list[int], tie: bool = False) -> nn.Module:
    """The stack rebuild behind `program_layers` and `drop_layers`, once `order` is checked: each position's
    layer (a copy or a tied occurrence where it repeats), renumbered, and the config to match."""
    stack = depth_view(model).layers
    sources, configs = list(stack), _configs(model)
    keep_shared = {id(config): config for config in configs}  # a deep copy must not fork the model's config
    layers, seen = [], set()
    for index in order:
        layer = sources[index]
        if index in seen:
            layer = _tied_occurrence(layer) if tie else copy.deepcopy(layer, dict(keep_shared))
        seen.add(index)
        layers.append(layer)
    while len(stack):
        del stack[len(stack) - 1]
    stack.extend(layers)
    _renumber_layer_idx(stack)
    for config in configs:
        _program_config(config, order, origin)
    _refresh_sliding_flags(model)
    if tie and len(seen) < len(order):
        mark_unsaveable(model, f"its layers {sorted({i for i in order if order.count(i) > 1})} are tied (one set "
                               f"of weights run at several positions), which a {model.config.model_type} config "
                               "cannot express; save a program with materialised copies (drop ':tie'), or for "
                               "Llama-family models convert with `to-layerwise` first")
    return model


def check_reshapeable(model: nn.Module) -> None:
    """Refuse models whose layers would change behaviour when renumbered, saved or reloaded."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family == "layerwise":
        from ..nn.registry import REGISTRIES, selected_variants

        for variant in selected_variants(config):
            if not variant.drop_safe:
                field = variant.selector_field
                safe = " or ".join(f"{field}={v.registered_name!r}" for v in REGISTRIES[field].classes() if v.drop_safe)
                raise UserError(f"cannot drop layers of a {field}={getattr(config, field)!r} model: "
                                f"{variant.drop_hazard}; only {safe} models can be pruned")
    if family == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UserError(
            "cannot move or drop layers of a GPT-2 with scale_attn_by_inverse_layer_idx=True: layer i scales its "
            "attention by 1/(i+1), so a saved reshaped model would reload with different scales"
        )


def _tied_occurrence(module: nn.Module) -> nn.Module:
    """A copy of `module` and of every module below it that shares every Parameter and buffer (and their dicts,
    so a conversion that swaps tensors keeps the tie) but is its own object, with its own `layer_idx` and its
    own hook tables (copies: hooks registered later reach one position only), since diagnostics hook each
    position's modules and two positions must not share a hook."""
    occurrence = copy.copy(module)
    for table in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                  "_backward_pre_hooks"):
        if hasattr(module, table):
            setattr(occurrence, table, type(getattr(module, table))(getattr(module, table)))  # hooks so far kept
    occurrence._modules = {name: _tied_occurrence(child) if child is not None else None
                           for name, child in module._modules.items()}
    return occurrence


def _layer_idx(module: nn.Module) -> int | None:
    index = getattr(module, "layer_idx", None)
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _renumber_layer_idx(stack: nn.ModuleList) -> None:
    """Every `layer_idx` below a layer (the layer's own, its attention's) becomes the layer's new position:
    it picks the layer's KV-cache slot, and a stale one makes cached decoding read another layer's keys."""
    for position, layer in enumerate(stack):
        for module in layer.modules():
            if _layer_idx(module) is not None:
                module.layer_idx = position


def _configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config the model's modules hold (usually one object shared by all)."""
    found = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            found.setdefault(id(config), config)
    return list(found.values())


def _window_boundary(config, order: Sequence[int]) -> int | None:
    """Qwen2/3's `max_window_layers` after the program: layers below it use full attention and the rest the
    sliding window (when sliding_window is set), and transformers rebuilds `layer_types` from it when the list
    is absent, so the program's layers below the old boundary must still come first."""
    boundary = getattr(config, "max_window_layers", None)
    if not isinstance(boundary, int):
        return None
    below = [i < boundary for i in order]
    if getattr(config, "sliding_window", None) is not None and below != sorted(below, reverse=True):
        raise UserError(f"this Qwen-style model runs full attention in its first max_window_layers={boundary} "
                        "layers and a sliding window above them; a program that puts a sliding-window layer before "
                        "a full-attention one cannot be stated that way; keep layers "
                        f"0..{boundary - 1} (in any order) ahead of the others")
    return sum(below)


def _program_config(config, order: list[int], origin: list[int]) -> None:
    n_layers = config.num_hidden_layers
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if values is None:
            continue
        if len(values) != n_layers:
            raise UserError(f"config.{name} has {len(values)} entries for {n_layers} layers; cannot re-index it")
        setattr(config, name, [values[i] for i in order])
    boundary = _window_boundary(config, order)
    if boundary is not None:
        config.max_window_layers = boundary
    config.num_hidden_layers = len(order)  # GPT-2's n_layer and layerwise's n_layers through attribute_map
    _record_origin(config, origin)


def _record_origin(config, origin: list[int]) -> None:
    setattr(config, ORIGIN_KEY, list(origin))
    if getattr(config, DROPPED_LAYERS_KEY, None) is not None:  # layer_origin now says it; two records could disagree
        if DROPPED_LAYERS_KEY in getattr(type(config), "__dataclass_fields__", {}):
            setattr(config, DROPPED_LAYERS_KEY, None)
        else:
            delattr(config, DROPPED_LAYERS_KEY)


def _refresh_sliding_flags(model: nn.Module) -> None:
    """Qwen2/3 models cache at construction whether any layer slides; recompute it from the new list."""
    for module in model.modules():
        layer_types = getattr(getattr(module, "config", None), "layer_types", None)
        if hasattr(module, "has_sliding_layers") and layer_types is not None:
            module.has_sliding_layers = "sliding_attention" in layer_types


@register_step("layers")
class ProgramLayers(Step):
    """Run a layer program: drop, repeat and reorder layers at once."""

    argument = "required"
    argument_help = ('the new stack as source layers in order, 0-based, ranges inclusive, repeats allowed; '
                     '":tie" makes repeats share weights: "0-15,12-15,16-29" or "0-15,12-15,16-29:tie"')
    summary = ("a new layer stack from source layers in order (drop, repeat, reorder); repeats are copies, or "
               "share weights with :tie; every position keeps its own KV-cache slot")

    def parse(self, value):
        try:
            self.program = parse_layer_program(value)
        except UserError as err:
            self.refuse(str(err))

    def check(self, model):
        try:
            check_layer_program(model, self.program.order, self.program.tie)
        except UserError as err:
            self.refuse(str(err))

    def apply(self, model):
        return program_layers(model, self.program.order, self.program.tie)
