"""`layerwise diagnose MODEL`: per-layer depth metrics of a model on disk, written as JSON and HTML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..cli_options import DEVICE, DTYPE, MODEL, apply_option, device_for, out_option, torch_dtype

console = Console()


def diagnose_command(
    model: str = MODEL,
    data: Optional[str] = typer.Option(None, help="Text file or token shard (.bin); default: embedded Shakespeare."),
    tokens: int = typer.Option(16384, help="Tokens to stream through the model."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward."),
    n_span: int = typer.Option(4, "--n-span", help="Span length n for the Gromov angular distance."),
    removal: bool = typer.Option(True, "--removal/--no-removal",
                                 help="Also measure skipping each layer and span (loss, KL, effect on later layers)."),
    entropy: bool = typer.Option(True, "--attention-entropy/--no-attention-entropy",
                                 help="Attention entropy per layer (HF models then run eager attention)."),
    steps: Optional[list[str]] = apply_option("before diagnosing it, in memory"),
    device: Optional[str] = DEVICE,
    dtype: str = DTYPE,
    out: Path = out_option(Path("diagnose-out"), "diagnosis.json and report.html"),
):
    """Per-layer depth metrics in one streaming pass: angular distance, block influence, n-span distance,
    hidden RMS, sublayer contributions, attention entropy, logit lens, and the loss/KL change when each layer
    (and each n-layer span) is skipped, with the skip's effect on every later layer. Writes diagnosis.json and
    a self-contained report.html (`layerwise report` redraws it, e.g. after `layerwise eval --out` the same folder).

    Example: layerwise diagnose path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 16384 --out runs/diag
    """
    from rich.progress import Progress

    from ..loading import check_token_windows, load_model, load_tokens
    from ..outputs import check_output_folder
    from ..report.diagnosis import write_report
    from .metrics import diagnose, token_batches

    check_token_windows(tokens, seq_len, batch_size)
    check_output_folder(out)
    weights = torch_dtype(dtype)
    parsed = []
    if steps:
        from ..transform import apply, parse_steps

        parsed = parse_steps(steps)  # a typo fails before the model is read
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model, dtype=weights)
        if parsed:
            net = apply(net, parsed, source=model)
        target = device_for(net, device)
        net.to(target)
        ids = load_tokens(data, tokenizer, tokens)
    batches = [batch.to(target) for batch in token_batches(ids, seq_len, batch_size, tokens)]
    n_tokens = sum(b.numel() for b in batches)
    # The bar counts tokens and moves within a batch (after its forward and each removal re-run), not per batch.
    with Progress(*Progress.get_default_columns(), console=console, transient=True) as bar:
        task = bar.add_task(f"diagnosing {n_tokens:,} tokens", total=n_tokens)
        result = diagnose(net, batches, n_span=n_span, removal=removal, attention_entropy=entropy,
                          progress=lambda tokens: bar.advance(task, tokens))
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps({"model": str(model), "apply": [str(s) for s in parsed],
                                                    "dtype": dtype, "device": str(target), **result.to_json()},
                                                   indent=1))
    page = write_report(out / "diagnosis.json", out)
    console.print(summary_table(result, removal))
    console.print(f"outputs: {out / 'diagnosis.json'}, {page}")


# The console table's columns: a short header that fits 80 columns, and the metric's name in diagnosis.json,
# which the legend under the table spells out (report.html has every metric in full).
SUMMARY_COLUMNS = {"angular": "angular_distance", "BI": "block_influence", "lens KL": "logit_lens_kl",
                   "lens top-1": "logit_lens_top1", "skip Δloss": "removal_delta_loss"}


def summary_table(result, removal: bool):
    """Per-layer headline metrics of a `DepthDiagnosis` as a rich table that fits an 80-column terminal, and
    under it the legend of its headers (as wide as the terminal, not the table)."""
    from rich.columns import Columns
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    metrics = result.metrics()
    shown = {h: m for h, m in SUMMARY_COLUMNS.items() if removal or m != "removal_delta_loss"}
    table = Table(title=f"{result.family}: {result.n_layers} layers, {result.tokens:,} tokens "
                        f"(loss {metrics['loss'][0]:.4f})")
    for header in ("layer", *shown):
        table.add_column(header, justify="right", no_wrap=True)
    for i in range(result.n_layers):
        table.add_row(str(i), *(f"{metrics[name][i]:.4f}" for name in shown.values()))
    # Columns never breaks an entry across lines, as wrapped text would ("lens" / "top-1 = ...").
    return Group(table, Columns([Text(f"{header} = {name}") for header, name in shown.items()], padding=(0, 3)))
