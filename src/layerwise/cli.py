"""The `layerwise` command line: assembles the commands each package owns and turns user errors into one line.

Nothing imported here (or by the package `cli` modules) may import torch or transformers at module level:
`layerwise --help` must stay well under a second. Commands import what they need when they run.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from .data.cli import data_app
from .diagnose.cli import diagnose_command
from .evaluate.cli import eval_command
from .report.cli import report_command
from .train.cli import compare_command, presets_command, remove_norms_command, train_command
from .transform.cli import prune_command, quantize_command, transform_command

app = typer.Typer(
    help="layerwise: build, train, diagnose and transform the depth axis of transformer language models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
_state = {"debug": os.environ.get("LAYERWISE_DEBUG") == "1"}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors "
                                                            "(or set LAYERWISE_DEBUG=1).")):
    _state["debug"] = _state["debug"] or debug


app.command("presets")(presets_command)
app.command("train")(train_command)
app.command("compare")(compare_command)
app.add_typer(data_app, name="data")
app.command("diagnose")(diagnose_command)
app.command("eval")(eval_command)
app.command("report")(report_command)
app.command("prune")(prune_command)
app.command("transform")(transform_command)
app.command("quantize")(quantize_command)
app.command("remove-norms")(remove_norms_command)


def main() -> None:
    # UserError is a ValueError; the other types stay caught until every raise site says UserError.
    try:
        app()
    except (ValueError, FileNotFoundError, OSError) as err:
        if _state["debug"]:
            raise
        # escape: a message's own brackets ("pip install 'layerwise[harness]'") are text, not rich markup
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
