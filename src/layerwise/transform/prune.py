"""Physical layer removal: delete decoder layers from a causal LM in place, leaving a normal model.

Deleting `model.layers[i]` is the easy part; what else indexes the layers must follow, or the pruned model
decodes wrongly with its KV cache while its cache-free forward looks right: each attention module's
`layer_idx` picks its KV-cache slot (transformers #30508), the config states the depth and per-layer lists
(`layer_types`) from which a cache and a reloaded model are built, and a saved model should say what was
removed. Surviving layers keep their own math: nothing is rebuilt.

Indices are 0-based positions in the model as given; the config records them as indices of the *original*
model, so pruning twice accumulates one list.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import PreTrainedConfig

from ..arch import depth_view
from ..outputs import write_model_folder
from .steps import Step, register_step

DROPPED_LAYERS_KEY = "layerwise_dropped_layers"
# Config lists with one entry per layer (sliding vs full attention, dense vs MoE MLP); sliced to the survivors.
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def drop_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Delete decoder layers `layers` (0-based) from `model` in place and return it.

    The result runs forward, `generate` with a KV cache and `save_pretrained` / `from_pretrained` like any model
    of its family with fewer layers; its config lists the removed layers under `layerwise_dropped_layers`.
    Example: `drop_layers(model, parse_layer_list("14,20-23"))`.
    """
    _check_prunable(model)
    stack = depth_view(model).layers
    if model.config.num_hidden_layers != len(stack):
        raise ValueError(f"config.num_hidden_layers={model.config.num_hidden_layers} disagrees with the model's "
                         f"{len(stack)} layers; fix the config before pruning")
    drop = _validated_indices(layers, len(stack))
    if not drop:
        return model
    if getattr(model.config, "layer_order", None) is not None:  # a layerwise model with tied layers
        from .layerwise_program import program_layerwise_model

        return program_layerwise_model(model, [i for i in range(len(stack)) if i not in drop], tie=True)
    originals = original_layer_indices(model.config)
    dropped_originals = sorted(set(getattr(model.config, DROPPED_LAYERS_KEY, None) or [])
                               | {originals[i] for i in drop})
    keep = [i for i in range(len(stack)) if i not in drop]
    for i in sorted(drop, reverse=True):  # descending, so each index still names the layer it meant
        del stack[i]
    _renumber_layer_idx(stack)
    for config in _configs(model):
        _prune_config(config, keep, drop, dropped_originals, [originals[i] for i in keep])
    _refresh_sliding_flags(model)
    return model


def parse_layer_list(text: str) -> list[int]:
    """0-based layer indices from a comma list with inclusive ranges: "14,20-23" -> [14, 20, 21, 22, 23].

    Ranges include both ends (unlike mergekit's end-exclusive `layer_range`); indices count from 0 (unlike
    PruneMe's printed 1-based ones). Sorted; an index listed twice is an error, as it usually means a typo.
    """
    example = 'e.g. "14,20-23" (0-based, ranges inclusive)'
    indices: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        first, dash, last = item.partition("-")
        if not first.strip().isdecimal() or (dash and not last.strip().isdecimal()):
            raise ValueError(f"{item!r} in layer list {text!r} is not an index or a range a-b; {example}")
        start, stop = int(first), int(last) if dash else int(first)
        if stop < start:
            raise ValueError(f"range {item!r} in layer list {text!r} runs backwards; write it as {stop}-{start}")
        span = set(range(start, stop + 1))
        if indices & span:
            raise ValueError(f"layer {min(indices & span)} appears twice in layer list {text!r}; {example}")
        indices |= span
    return sorted(indices)


def original_layer_indices(config) -> list[int]:
    """For each current layer position, its index in the original (never pruned) model."""
    if getattr(config, "layer_origin", None) is not None:  # written by layer programs, and by drop below
        return list(config.layer_origin)
    dropped = set(getattr(config, DROPPED_LAYERS_KEY, None) or [])
    total = config.num_hidden_layers + len(dropped)
    return [i for i in range(total) if i not in dropped]


def _check_prunable(model: nn.Module) -> None:
    """Refuse models whose surviving layers would change behaviour when renumbered, saved or reloaded."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family == "layerwise":
        from ..nn.registry import REGISTRIES, selected_variants

        for variant in selected_variants(config):
            if not variant.drop_safe:
                field = variant.selector_field
                safe = " or ".join(f"{field}={v.registered_name!r}" for v in REGISTRIES[field].classes() if v.drop_safe)
                raise ValueError(f"cannot drop layers of a {field}={getattr(config, field)!r} model: "
                                 f"{variant.drop_hazard}; only {safe} models can be pruned")
    if family == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "cannot drop layers of a GPT-2 with scale_attn_by_inverse_layer_idx=True: layer i scales its "
            "attention by 1/(i+1), so a saved pruned model would reload with different scales"
        )


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


def _renumber_layer_idx(stack: nn.ModuleList) -> None:
    """Every `layer_idx` below a layer (the layer's own, its attention's) becomes the layer's new position:
    it picks the layer's KV-cache slot, and a stale one makes cached decoding read another layer's keys."""
    for position, layer in enumerate(stack):
        for module in layer.modules():
            index = getattr(module, "layer_idx", None)
            if isinstance(index, int) and not isinstance(index, bool):
                module.layer_idx = position


def _configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct config the model's modules hold (usually one object shared by all)."""
    found = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            found.setdefault(id(config), config)
    return list(found.values())


def _prune_config(config, keep: list[int], drop: list[int], dropped_originals: list[int],
                  kept_originals: list[int]) -> None:
    n_layers = config.num_hidden_layers
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if values is None:
            continue
        if len(values) != n_layers:
            raise ValueError(f"config.{name} has {len(values)} entries for {n_layers} layers; cannot slice it")
        setattr(config, name, [values[i] for i in keep])
    # Qwen2/3: layers below max_window_layers use full attention, the rest the sliding window (when
    # use_sliding_window). The sliced layer_types is what the model and its cache read; shifting the boundary
    # by the dropped layers below it keeps the field consistent with that list if layer_types is rebuilt.
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers -= sum(i < config.max_window_layers for i in drop)
    config.num_hidden_layers = len(keep)  # GPT-2's n_layer and layerwise's n_layers through attribute_map
    setattr(config, DROPPED_LAYERS_KEY, dropped_originals)
    if getattr(config, "layer_origin", None) is not None:  # kept in step with the list above, which it supersedes
        config.layer_origin = kept_originals


def _refresh_sliding_flags(model: nn.Module) -> None:
    """Qwen2/3 models cache at construction whether any layer slides; recompute it from the sliced list."""
    for module in model.modules():
        layer_types = getattr(getattr(module, "config", None), "layer_types", None)
        if hasattr(module, "has_sliding_layers") and layer_types is not None:
            module.has_sliding_layers = "sliding_attention" in layer_types


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model` (safetensors) and `tokenizer` (if not None) to `out_dir`, loadable with
    `AutoModelForCausalLM.from_pretrained(out_dir)` or `layerwise.loading.load_model(out_dir)`.

    The folder is written whole or not at all (`layerwise.outputs.write_model_folder`); a non-empty `out_dir`
    is refused unless `overwrite`, so a model never ends up beside another model's or run's files.
    A model read from a GGUF file carries GGUF quantization bookkeeping that `save_pretrained` refuses; when its
    weights are already plain floats (GGUF tensors de-quantized at load), that bookkeeping is dropped from the
    model first, so the saved folder is an ordinary float checkpoint.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        _forget_dequantized_gguf(model)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return write_model_folder(out_dir, save, overwrite)


def _forget_dequantized_gguf(model: nn.Module) -> None:
    method = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise ValueError(f"cannot save a model quantized with {method}: save_pruned writes float checkpoints only, "
                         "and only GGUF models loaded as floats can be converted")
    # Where a GGUF kernel exists (GPU), transformers keeps weights packed as uint8 blocks instead of floats.
    packed = [name for name, weight in model.named_parameters() if not weight.is_floating_point()]
    if packed:
        raise ValueError(f"the GGUF model still holds packed weights ({', '.join(packed[:3])}, ...); load it "
                         "de-quantized (on CPU, or with GgufConfig(dequantize=True)) before saving it as floats")
    model.hf_quantizer.remove_quantization_config(model)


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
            _check_prunable(model)
            _validated_indices(self.layers, len(depth_view(model).layers))
        except ValueError as err:
            self.refuse(str(err))

    def apply(self, model):
        return drop_layers(model, self.layers)
