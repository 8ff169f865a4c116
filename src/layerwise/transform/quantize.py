"""The `quantize` step: per-layer mixed-precision weights with HQQ (2, 3, 4 or 8 bits; 16 leaves a layer).

`quantize=4/2:10-14,20/8:0,29/group=32`: every stored decoder layer at 4 bits, layers 10-14 and 20 at 2, 0 and
29 at 8, HQQ groups of 32 weights (default 64). Only the linears inside decoder layers are quantized;
embeddings, the LM head and norms stay in floating point. HQQ needs no calibration data and runs on CPU; the
folder format and the loader are in `layerwise.arch.quantized` (docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import depth_view
from ..arch.quantized import (BACKEND, BACKEND_VERSION, FLOAT_WIDTH, QUANTIZATION_KEY, WIDTHS, disk_bits,
                              hqq_linear_class, is_quantized, kept_in_float, layer_linears, linear_shape,
                              quantize_layers, stored_layers)
from .prune import parse_layer_list
from .steps import Step, register_step

DEFAULT_GROUP = 64
_EXAMPLE = 'e.g. "4", "4/2:10-14,20/8:0,29" or "3/4:0-5/group=32" (widths 2, 3, 4, 8; 16 keeps a layer in float)'


@dataclass(frozen=True)
class BitSpec:
    """The width of every stored layer not named in `overrides` (layer -> width), and HQQ's group size."""

    default: int
    overrides: tuple[tuple[int, int], ...] = ()
    group_size: int = DEFAULT_GROUP

    def layer_bits(self, n_layers: int) -> list[int]:
        bits = [self.default] * n_layers
        for layer, width in self.overrides:
            bits[layer] = width
        return bits


def _width(text: str, spec: str) -> int:
    valid = (*WIDTHS, FLOAT_WIDTH)
    if not text.strip().isdecimal() or int(text) not in valid:
        raise ValueError(f"width {text!r} in {spec!r} is not one of {', '.join(map(str, valid))}; {_EXAMPLE}")
    return int(text)


def parse_bit_spec(text: str) -> BitSpec:
    """`BITS[/BITS:LAYERS]...[/group=N]` -> BitSpec; ValueError names the part that is wrong."""
    parts = text.strip().split("/")
    default = _width(parts[0], text)
    overrides: dict[int, int] = {}
    group_size = DEFAULT_GROUP
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            if key.strip() != "group" or not value.strip().isdecimal() or int(value) < 1:
                raise ValueError(f"{part!r} in {text!r}: the only option is group=N (N a positive integer); "
                                 f"{_EXAMPLE}")
            group_size = int(value)
            continue
        width, colon, layers = part.partition(":")
        if not colon or not layers.strip():
            raise ValueError(f"{part!r} in {text!r} is not BITS:LAYERS; {_EXAMPLE}")
        width = _width(width, text)
        for layer in parse_layer_list(layers):
            if layer in overrides:
                raise ValueError(f"layer {layer} is given a width twice in {text!r}")
            overrides[layer] = width
    return BitSpec(default, tuple(sorted(overrides.items())), group_size)


def check_quantizable(model: nn.Module, spec: BitSpec) -> None:
    """ValueError naming the reason when `model` cannot take `spec`."""
    if is_quantized(model):
        raise ValueError("the model is quantized already; quantize its float version once")
    if getattr(model.config, "heterogeneous_gains", False):
        raise ValueError("the model's projections hold their own input gains (heterogeneous_gains=True), which the "
                         "quantized linears would drop; quantize a model with shared norm gains")
    layers = stored_layers(model)
    seen: set[int] = set()
    shared = False
    for layer in depth_view(model).layers:  # one per execution position: a tied layer shares its Parameters
        own = {id(p) for p in layer.parameters()}
        shared = shared or bool(own & seen)
        seen |= own
    if shared:
        raise ValueError("the model runs tied layers (one set of weights at several positions); quantize a "
                         "program with materialised copies (drop ':tie'), or quantize before the layer program")
    n_layers = len(layers)
    for layer, _ in spec.overrides:
        if layer >= n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {n_layers} stored layers; valid "
                             f"layers are 0..{n_layers - 1} (0-based)")
    for index, (layer, width) in enumerate(zip(layers, spec.layer_bits(n_layers))):
        if width == FLOAT_WIDTH:
            continue
        for name, module in layer_linears(layer):
            out_features, in_features = linear_shape(module)
            if (out_features * in_features) % spec.group_size:
                raise ValueError(f"group={spec.group_size} does not divide layer {index}'s {name} "
                                 f"({out_features}x{in_features} weights; HQQ groups the flattened weight); "
                                 "pick a group size that divides it, e.g. 32 or 64")
            if not module.weight.is_floating_point():
                raise ValueError(f"layer {index}'s {name} holds {module.weight.dtype} weights; load the model "
                                 "in floating point")


def quantize_model(model: nn.Module, spec: BitSpec) -> nn.Module:
    """Quantize `model` in place as `spec` says and record `layerwise_quantization` in its config."""
    check_quantizable(model, spec)
    bits = spec.layer_bits(len(stored_layers(model)))
    quantize_layers(model, bits, spec.group_size)
    avg_layers, avg_model = disk_bits(model)
    setattr(model.config, QUANTIZATION_KEY, {
        "backend": BACKEND, "version": BACKEND_VERSION, "group_size": spec.group_size, "layer_bits": bits,
        "kept_in_float": kept_in_float(model), "avg_bits_layers": round(avg_layers, 4),
        "avg_bits_model": round(avg_model, 4),
    })
    return model


@register_step("quantize")
class Quantize(Step):
    """Per-layer HQQ quantization (the step behind `layerwise quantize`)."""

    argument = "required"
    argument_help = ('BITS[/BITS:LAYERS]...[/group=N]: widths 2, 3, 4, 8, or 16 (float); layers 0-based, ranges '
                     'inclusive: "4/2:10-14,20/8:0,29"')
    summary = ("per-layer mixed-precision weights (HQQ, 2/3/4/8 bits, 16 = float) for the decoder layers' "
               "linears; embeddings, head and norms stay float; saved as quantized.safetensors")

    def parse(self, value):
        try:
            self.spec = parse_bit_spec(value)
        except ValueError as err:
            self.refuse(str(err))

    def check(self, model):
        hqq_linear_class()  # a missing extra fails before anything else
        try:
            check_quantizable(model, self.spec)
        except ValueError as err:
            self.refuse(str(err))

    def apply(self, model):
        from ..loading import forget_dequantized_gguf

        # A model read from a GGUF holds floats but keeps transformers' GGUF quantizer, which would refuse the save.
        forget_dequantized_gguf(model, f"--apply {self.text!r}")
        return quantize_model(model, self.spec)
