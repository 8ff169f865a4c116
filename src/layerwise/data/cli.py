"""`layerwise data ...`: build and inspect tokenized corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..cli_options import out_option

console = Console()
data_app = typer.Typer(help="Build and inspect tokenized corpora.", no_args_is_help=True)


@data_app.command("build")
def build_command(
    sources: str = typer.Option("shakespeare", help="Comma-separated sources: shakespeare (embedded), austen, "
                                                    "kjv, python-docs, kernel-docs; or 'large' for all five."),
    out: Path = out_option(Path("data/shakespeare"), "the shards, tokenizer and manifest"),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary to train (ignored with --tokenizer)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Use this tokenizer.json or HF tokenizer folder instead."),
):
    """Assemble sources into train/val token shards, a tokenizer and a manifest (sizes, sha256, licences).

    Example: layerwise data build --sources large --out data/large --vocab-size 16384
    The opt-in sources come from Debian packages: see scripts/install_corpus.sh.
    """
    from rich.table import Table

    from .build import build_corpus
    from .sources import LARGE_CORPUS

    names = LARGE_CORPUS if sources == "large" else [s.strip() for s in sources.split(",") if s.strip()]
    with console.status(f"building {', '.join(names)} ..."):
        folder = build_corpus(names, out, vocab_size=vocab_size, tokenizer_path=tokenizer)
    manifest = json.loads((folder / "manifest.json").read_text())
    table = Table(title=f"corpus {folder}")
    for column in ("source", "documents", "MB", "sha256", "licence"):
        table.add_column(column)
    for src in manifest["sources"]:
        table.add_row(src["name"], str(src["documents"]), f"{src['bytes'] / 1e6:.1f}", src["sha256"][:12],
                      src.get("licence", ""))
    console.print(table)
    console.print(f"tokens: {manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val; vocab "
                  f"{manifest['vocab_size']}; seconds {manifest['seconds']}; outputs in {folder}")
