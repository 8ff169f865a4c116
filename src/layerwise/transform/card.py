"""The model card (README.md) written beside a transformed model: where it came from, what was done to it, and
how to load it. The same facts are in config.json (`layerwise_source`, `layerwise_transforms`, `layer_origin`);
the card says them for people."""

from __future__ import annotations

import datetime

from torch import nn

from .steps import SOURCE_KEY, TRANSFORMS_KEY


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
    lines.append(f"- written: {datetime.date.today().isoformat()}")
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
