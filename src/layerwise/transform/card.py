"""The model card (README.md) written beside a transformed model: where it came from, what was done to it, and
how to load it. The same facts are in config.json (`layerwise_source`, `layerwise_transforms`, `layer_origin`);
the card says them for people, laid out by `layerwise.model_card` like every card layerwise writes."""

from __future__ import annotations

from torch import nn

from ..model_card import code, escaped, hf_loading, render_card
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


def model_card(model: nn.Module, facts: list[tuple[str, str]] = (), evaluation: dict[str, float] | None = None,
               evaluation_note: str = "") -> str:
    """The card of a transformed model; `facts` (Markdown (label, value) pairs, e.g. the data and tokens of the
    run that made it) and `evaluation` (figures its writer measured) are added as `render_card` lays them out."""
    config = model.config
    family = getattr(config, "model_type", "?")
    steps = list(getattr(config, TRANSFORMS_KEY, None) or [])
    source = getattr(config, SOURCE_KEY, None)
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        ("base model", code(source) if source else "(not recorded)"),
        ("steps, in order", ", ".join(code(s) for s in steps) or "(none)"),
        ("layers", f"{config.num_hidden_layers}; parameters: {n_params:,}"),
    ]
    origin = getattr(config, "layer_origin", None)
    if origin:
        lines.append(("source layer of each layer (0-based)", _origin_summary(list(origin))))
    order = getattr(config, "layer_order", None)
    if order:
        lines.append(("stored layer run at each position (tied weights)", _origin_summary(list(order))))
    quantization = getattr(config, QUANTIZATION_KEY, None)
    if quantization is not None:
        # Every value comes from config.json, which a user may have edited: escaped like any outside text.
        q = {key: value if isinstance(value, (int, float)) else escaped(value) for key, value in quantization.items()}
        lines.append(("quantized with", f"{q['backend']} {q['version']} (group size "
                      f"{q['group_size']}); bits of each layer (16 = floating point): "
                      f"{', '.join(str(b if isinstance(b, int) else escaped(b)) for b in quantization['layer_bits'])}; "
                      f"bits per weight on disk: "
                      f"{q['avg_bits_layers']} in the layers' linears, {q['avg_bits_model']} "
                      f"over the model; kept in floating point: "
                      f"{', '.join(code(name) for name in quantization['kept_in_float'])}"))
    loading = _quantized_loading() if quantization is not None else [
        *hf_loading(family), "", "The steps are described by `layerwise transform --help`."]
    return render_card(f"A {escaped(family)} model made by layerwise transforms", [*lines, *facts], evaluation,
                       evaluation_note, loading)


def _quantized_loading() -> list[str]:
    return [
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
    ]
