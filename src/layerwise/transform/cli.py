"""`layerwise prune`: delete decoder layers from a model and save the result as a normal HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..cli_options import MODEL, out_option

console = Console()


def prune_command(
    model: str = MODEL,
    drop: str = typer.Option(..., "--drop", help="Layers to delete, 0-based, as a comma list with INCLUSIVE "
                                                 "ranges: 14,20-23 deletes layers 14, 20, 21, 22 and 23."),
    out: Path = out_option(..., "the pruned model (safetensors) and its tokenizer"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is not empty (the new model "
                                                             "is written whole first)."),
):
    """Delete decoder layers and save a normal model: it loads with from_pretrained and generates with a cache.

    Layer indices count from 0 (layer 0 is the first decoder layer after the embedding) and a range a-b includes
    both a and b, unlike mergekit's end-exclusive layer_range. The saved config.json lists, under layer_origin,
    the original index of each layer that remains.

    Example: layerwise prune path/to/SmolLM2-135M-Instruct.Q4_1.gguf --drop 14,20-23 --out runs/smollm2-25l
    """
    from ..loading import load_model
    from ..outputs import check_model_destination
    from .prune import drop_layers, original_layer_indices, parse_layer_list, save_transformed

    try:
        layers = parse_layer_list(drop)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--drop") from None
    check_model_destination(out, overwrite, source=model)
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
    n_before = net.config.num_hidden_layers
    reshaped_before = original_layer_indices(net.config) != list(range(n_before))
    drop_layers(net, layers)
    with console.status(f"saving to {out} ..."):
        save_transformed(net, tokenizer, out, overwrite)
    console.print(f"removed layers {', '.join(map(str, layers))} (0-based) of {n_before}; "
                  f"{net.config.num_hidden_layers} remain")
    if reshaped_before:  # the input was already transformed: say what it runs relative to the original
        console.print("layers of the original model it runs now: "
                      f"{', '.join(map(str, original_layer_indices(net.config)))}")
    console.print(f"outputs: {out} (load with AutoModelForCausalLM.from_pretrained)")
