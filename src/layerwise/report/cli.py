"""`layerwise report`: turn a `layerwise diagnose` folder into a self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..cli_options import out_option

console = Console()


def report_command(
    source: Path = typer.Argument(..., help="Folder written by `layerwise diagnose --out`, or its diagnosis.json."),
    out: Optional[Path] = out_option(None, "report.html and report.json (default: the diagnosis's own folder)"),
):
    """Self-contained HTML report of a diagnosis: a chart per metric, layers and spans ranked least important
    first, and a plain-language summary; also report.json with the same numbers. Includes eval.json if present.

    Example: layerwise diagnose path/to/model --out runs/diag && layerwise report runs/diag
    """
    from .diagnosis import REPORT_JSON, write_report

    with console.status(f"rendering the report for {source} ..."):
        page = write_report(source, out)
    for sentence in json.loads((page.parent / REPORT_JSON).read_text())["summary"]:
        console.print(f"- {sentence}", highlight=False)
    console.print(f"report: {page} (data: {page.parent / REPORT_JSON})", highlight=False)
