"""`layerwise prune`: delete decoder layers from a model and save the result as a normal HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def transform_command(
    model: str = MODEL,
    steps: Optional[list[str]] = typer.Option(None, "--apply", metavar="STEP",
                                              help="A step to run; repeat for several, run in order. None: the "
                                                   "model is saved as it loads (e.g. a GGUF as safetensors)."),
    out: Path = out_option(..., "the transformed model (safetensors), its tokenizer and a model card"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds another model (the new "
                                                             "model is written whole first)."),
):
    """Run transform steps on a model, in order, and save the result as a normal model folder.

    The folder loads with AutoModelForCausalLM.from_pretrained (after `import layerwise` when it is a layerwise
    model); its config.json lists the steps (layerwise_transforms), the source (layerwise_source) and the
    source layer of each layer (layer_origin), and README.md says the same for people. `layerwise eval` and
    `layerwise diagnose` take the same --apply steps and run them in memory.

    Steps (0-based layer indices; ranges a-b include both ends; kept in step with the registered steps by
    tests/test_transform_cli.py):

    \b
      drop=12-15,20            delete layers; the rest are renumbered and keep their math
      layers=0-15,12-15,16-29  a layer program: the new stack lists source layers in order, repeats
                               allowed (materialised copies); add :tie to run one set of weights several times
      fold-norms               fold each norm's gain (and LayerNorm bias) into the linears that read it
      pre-rmsnorm              Pre-LN -> Pre-RMSNorm, exactly (Jiang et al., NeurIPS 2023)
      pre-crmsnorm             Pre-LN -> Pre-CRMSNorm: the same, with the stream compressed to d-1
      to-layerwise             a Llama-family (or GPT-2) HF model as a LayerwiseForCausalLM, same logits
      to-hf                    a layerwise model back to its HF family (to-hf=FAMILY picks one)

    Example: layerwise transform path/to/SmolLM2-135M-Instruct.Q4_1.gguf --apply layers=0-15,12-15,16-29 --out runs/smollm2-34l
    """
    from ..loading import load_model
    from ..outputs import check_model_destination
    from .save import save_transformed
    from .steps import apply, parse_steps

    parsed = parse_steps(steps or [])  # a typo fails before the model is read
    check_model_destination(out, overwrite, source=model)
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
    n_before = net.config.num_hidden_layers
    with console.status(f"applying {', '.join(map(str, parsed))} ..."):
        net = apply(net, parsed, source=model)
    with console.status(f"saving to {out} ..."):
        save_transformed(net, tokenizer, out, overwrite)
    done = f"applied {', '.join(map(str, parsed))}" if parsed else "no steps: saved as loaded"
    console.print(f"{done}: {n_before} -> {net.config.num_hidden_layers} layers")
    console.print(f"outputs: {out} (load with AutoModelForCausalLM.from_pretrained; README.md says how it was made)")

