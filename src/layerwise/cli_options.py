"""Options that several commands share, defined once: the model to read, the device and dtype to run it in,
the output folder. Importing this module must stay cheap (no torch) so that `layerwise --help` is fast."""

from __future__ import annotations


import typer

from .errors import UserError

MODEL = typer.Argument(..., help="HF model folder, .gguf file, or layerwise run/checkpoint folder.")
DEVICE = typer.Option(None, help="cpu, cuda, cuda:1... (default: cuda if available).")
DTYPE = typer.Option("float32", help="Weights dtype: float32, bfloat16, float16.")
DTYPES = ("float32", "bfloat16", "float16")


def apply_option(what: str):
    """`--apply STEP` (repeatable): transform steps run in order on the loaded model, e.g. drop=12-15."""
    return typer.Option(None, "--apply", metavar="STEP",
                        help=f"A transform step to run on the model {what}, e.g. drop=12-15 or "
                             "layers=0-15,12-15,16-29:tie; repeat for several, run in order "
                             "(`layerwise transform --help` lists the steps).")


def out_option(default, what: str):
    """`--out`: the folder a command writes `what` to; `default` ... makes it required."""
    return typer.Option(default, "--out", help=f"Output folder for {what}.")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def torch_device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_for(model, name: str | None):
    """The device to run `model` on: --device, or cuda when available; a quantized model stays on the CPU
    (HQQ's modules do not move with `.to()`), and asking for another device for it is refused."""
    import torch

    from .arch.quantized import is_quantized

    device = torch_device(name)
    if device.type == "cpu" or not is_quantized(model):
        return device
    if name is None:
        return torch.device("cpu")
    raise UserError(f"--device {name}: a quantized model runs on the CPU in this version (HQQ's modules do not "
                    "move with .to()); pass --device cpu")
