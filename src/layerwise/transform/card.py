"""The model card (README.md) written beside a transformed model: where it came from, what was done to it, and
how to load it. The same facts are in config.json (`layerwise_source`, `layerwise_transforms`, `layer_origin`);
the card says them for people."""

from __future__ import annotations

import datetime

from torch import nn

from .steps import QUANTIZATION_KEY, SOURCE_KEY, TRANSFORMS_KEY


def _origin_summary(origin: list[int]) -> str:
    """[0, 1, 2, 5, 5, 6] -> "0-2, 5, 5, 6": runs of consecutive indices as inclusive ranges."""
    parts, start = [], 0
    for i in range(1, len(origin) + 1):
        if i == len(origin) or origin[i] != origin[i - 1] + 1:
            first, last = origin[start], origin[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ", ".join(parts)


def model_card(model: nn.Module) -> str:
    config = model.config
    family = getattr(config, "model_type", "?")
    steps = list(getattr(config, TRANSFORMS_KEY, None) or [])
    source = getattr(config, SOURCE_KEY, None) or "(not recorded)"
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"# A {family} model made by layerwise transforms",
        "",
        f"- source: `{source}`",
        f"- steps, in order: {', '.join(f'`{s}`' for s in steps) or '(none)'}",
        f"- layers: {config.num_hidden_layers}; parameters: {n_params:,}",
    ]
    origin = getattr(config, "layer_origin", None)
    if origin:
        lines.append(f"- source layer of each layer (0-based): {_origin_summary(list(origin))}")
    order = getattr(config, "layer_order", None)
    if order:
        lines.append(f"- stored layer run at each position (tied weights): {_origin_summary(list(order))}")
    quantization = getattr(config, QUANTIZATION_KEY, None)
    if quantization is not None:
        lines.append(f"- quantized with {quantization['backend']} {quantization['version']} (group size "
                     f"{quantization['group_size']}); bits of each layer (16 = floating point): "
                     f"{', '.join(map(str, quantization['layer_bits']))}; bits per weight on disk: "
                     f"{quantization['avg_bits_layers']} in the layers' linears, {quantization['avg_bits_model']} "
                     f"over the model; kept in floating point: {', '.join(quantization['kept_in_float'])}")
    lines.append(f"- written: {datetime.date.today().isoformat()}")
    if quantization is not None:
        return "\n".join(lines + _quantized_loading())
    load = "from transformers import AutoModelForCausalLM"
    if family == "layerwise":
        load = "import layerwise  # registers model_type \"layerwise\" with the Auto classes\n" + load
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        load,
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
        "```",
        "",
        "The steps are described by `layerwise transform --help`; `layerwise eval` and `layerwise diagnose` "
        "score and inspect this folder like any other model.",
        "",
    ]
    return "\n".join(lines)


def _quantized_loading() -> list[str]:
    return [
        "",
        "## Loading",
        "",
        "The weights are in `quantized.safetensors`, layerwise's own format (its docs/quantization.md): the decoder "
        "layers' linears as HQQ packed codes with float16 scales and zeros, everything else in floating point. "
        "`AutoModelForCausalLM.from_pretrained` cannot read it (it finds no model.safetensors); layerwise can:",
        "",
        "```python",
        "from layerwise.loading import load_model  # needs `pip install 'layerwise[quantize]'`",
        "model, tokenizer = load_model(\"path/to/this/folder\")",
        "```",
        "",
        "`layerwise eval path/to/this/folder` and `layerwise diagnose path/to/this/folder` score and inspect it.",
        "",
    ]
