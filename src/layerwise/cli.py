"""The `layerwise` command line."""

from __future__ import annotations

import json
import sys

import torch
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="layerwise: build, train, diagnose and transform the depth axis of transformer language models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
_state = {"debug": False}

DEMO_PRESETS = "pre-ln,pre-rmsnorm,lns,peri-ln,dyt,block-attnres,delta-attnres"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


@app.command()
def presets(
    size: str = typer.Option("tiny", help="Size whose parameter counts are shown: tiny, 124m, 350m, 1b."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines instead of a table."),
):
    """List the named presets: the paper each reproduces and what it changes from pre-rmsnorm.

    Example: layerwise presets --size 124m
    """
    from . import LayerwiseForCausalLM, ModelConfig
    from .presets import PRESETS, preset_fields

    base = preset_fields("pre-rmsnorm", size)
    rows = []
    for name, preset in PRESETS.items():
        fields = preset_fields(name, size)
        changes = {k: v for k, v in fields.items() if k != "preset" and base.get(k) != v}
        with torch.device("meta"):  # counts parameters without allocating them
            model = LayerwiseForCausalLM(ModelConfig(**fields))
        rows.append(dict(name=name, paper=preset.paper, changes=changes,
                         params=sum(p.numel() for p in model.parameters())))
    if as_json:
        print(json.dumps({"size": size, "presets": rows}, indent=2))
        return
    table = Table(title=f"layerwise presets (parameters at size {size})")
    table.add_column("preset", style="bold")
    table.add_column("paper")
    table.add_column("changes vs pre-rmsnorm")
    table.add_column("params", justify="right")
    for row in rows:
        changes = ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "(the base)"
        table.add_row(row["name"], row["paper"], changes, f"{row['params'] / 1e6:.1f}M")
    console.print(table)


@app.command()
def demo(
    presets: str = typer.Option(DEMO_PRESETS, help="Comma-separated presets to compare."),
    size: str = typer.Option("tiny", help="Model size (tiny trains on 2 CPU cores)."),
    steps: int = typer.Option(200, help="Optimizer steps per preset (identical batches for all)."),
    batch: int = typer.Option(16, help="Sequences per step."),
    seq: int = typer.Option(128, help="Tokens (bytes) per sequence."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warmup then cosine to 10%)."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    threads: int = typer.Option(0, help="CPU threads for torch (0: torch's default)."),
):
    """Train several presets for the same budget on the bundled Shakespeare text and compare them.

    Example: layerwise demo --presets pre-ln,lns,block-attnres --steps 100
    """
    from .train.demo import run_demo

    if threads:
        torch.set_num_threads(threads)
    names = [p.strip() for p in presets.split(",") if p.strip()]
    run_demo(names, size=size, steps=steps, batch=batch, seq=seq, lr=lr, seed=seed, console=console)


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError, OSError) as err:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
