"""The `layerwise` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from .evaluate.cli import eval_command
from .report.cli import report_command
from .transform.cli import prune_command

app = typer.Typer(
    help="layerwise: build, train, diagnose and transform the depth axis of transformer language models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
_state = {"debug": False}

README_PRESETS = "pre-ln,lns,peri-ln,block-attnres"


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
    from .config import ModelConfig
    from .model import LayerwiseForCausalLM
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


# Options shared by `train` and `compare`; None means "keep the YAML / TrainConfig default".
_CONFIG = typer.Option(None, "--config", help="YAML file of TrainConfig fields.")
_SIZE = typer.Option(None, help="Model size: tiny, 124m, 350m, 1b.")
_DATA = typer.Option(None, help="Corpus folder, llm.c shards, text file/folder or datasets folder "
                                "(default: embedded Shakespeare).")
_MAX_TOKENS = typer.Option(None, "--max-tokens", help="Training budget, e.g. 2M.")
_BATCH = typer.Option(None, "--batch-size", help="Global batch in sequences (fixed across world sizes).")
_SEQ = typer.Option(None, "--seq-len", help="Tokens per sequence.")
_LR = typer.Option(None, help="Peak learning rate.")
_SCHEDULE = typer.Option(None, help="cosine | wsd | constant.")
_COMPILE = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (GPU).")
_SET = typer.Option(None, "--set", help="Extra overrides key=value, e.g. --set warmup=100 --set model.n_layers=6.")


def _train_config(config, overrides: dict, sets):
    from .train.config import TrainConfig, apply_overrides

    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = TrainConfig.from_yaml(config, **given) if config else TrainConfig(**given)
    return apply_overrides(cfg, sets or [])


@app.command()
def train(
    config: Optional[Path] = _CONFIG,
    preset: Optional[str] = typer.Option(None, help="Preset to train (`layerwise presets`)."),
    size: Optional[str] = _SIZE, data: Optional[str] = _DATA, max_tokens: Optional[str] = _MAX_TOKENS,
    out: Optional[str] = typer.Option(None, help="Run folder (metrics.jsonl, tensorboard/, checkpoints/)."),
    batch_size: Optional[int] = _BATCH, seq_len: Optional[int] = _SEQ, lr: Optional[float] = _LR,
    schedule: Optional[str] = _SCHEDULE, compile: Optional[bool] = _COMPILE,
    resume: Optional[str] = typer.Option(None, help="none | auto (latest valid checkpoint) | a checkpoint folder."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a folder that holds a run "
                                                              "(the old run is moved to <out>.old-<time>)."),
    sets: Optional[list[str]] = _SET,
):
    """Pretrain one model with per-layer depth telemetry; resumable; runs under torchrun for DDP.

    Example: layerwise train --preset lns --size tiny --max-tokens 2M --out runs/lns
    Multi-GPU: torchrun --standalone --nproc_per_node=8 -m layerwise.cli train --preset lns --size 124m ...
    """
    from .train.trainer import train as run_training

    cfg = _train_config(config, dict(preset=preset, size=size, data=data, max_tokens=max_tokens, out=out,
                                     batch_size=batch_size, seq_len=seq_len, lr=lr, schedule=schedule,
                                     compile=compile, resume=resume, seed=seed, overwrite=overwrite or None), sets)
    run_training(cfg, console)


@app.command()
def compare(
    presets: str = typer.Option(README_PRESETS, help="Comma-separated presets, trained under one budget."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; mean +/- std over them is reported."),
    out: str = typer.Option("runs/compare", help="Folder for the runs and the comparison report."),
    config: Optional[Path] = _CONFIG, size: Optional[str] = _SIZE, data: Optional[str] = _DATA,
    max_tokens: Optional[str] = _MAX_TOKENS, batch_size: Optional[int] = _BATCH, seq_len: Optional[int] = _SEQ,
    lr: Optional[float] = _LR, schedule: Optional[str] = _SCHEDULE, compile: Optional[bool] = _COMPILE,
    sets: Optional[list[str]] = _SET,
):
    """Train several presets with identical budget, batches and schedule; write a table (Markdown, JSON)
    and plots (loss curves; hidden-state RMS and gradient norm vs depth).

    Example: layerwise compare --presets pre-ln,lns,peri-ln,block-attnres --max-tokens 1M --out runs/cmp
    """
    from .compare import compare as run_compare

    cfg = _train_config(config, dict(size=size, data=data, max_tokens=max_tokens, batch_size=batch_size,
                                     seq_len=seq_len, lr=lr, schedule=schedule, compile=compile), sets)
    run_compare([p.strip() for p in presets.split(",") if p.strip()],
                [int(s) for s in seeds.split(",") if s.strip()], cfg, Path(out), console)


@app.command()
def diagnose(
    model: str = typer.Argument(..., help="HF model folder, .gguf file, or layerwise run/checkpoint folder."),
    data: Optional[str] = typer.Option(None, help="Text file or token shard (.bin); default: embedded Shakespeare."),
    tokens: int = typer.Option(16384, help="Tokens to stream through the model."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward."),
    n_span: int = typer.Option(4, "--n-span", help="Span length n for the Gromov angular distance."),
    removal: bool = typer.Option(True, "--removal/--no-removal",
                                 help="Also measure skipping each layer and span (loss, KL, effect on later layers)."),
    entropy: bool = typer.Option(True, "--attention-entropy/--no-attention-entropy",
                                 help="Attention entropy per layer (HF models then run eager attention)."),
    out: Path = typer.Option(Path("diagnose-out"), help="Output folder for diagnosis.json and report.html."),
):
    """Per-layer depth metrics in one streaming pass: angular distance, block influence, n-span distance,
    hidden RMS, sublayer contributions, attention entropy, logit lens, and the loss/KL change when each layer
    (and each n-layer span) is skipped, with the skip's effect on every later layer. Writes diagnosis.json and
    a self-contained report.html (`layerwise report` redraws it, e.g. after `layerwise eval --out` the same folder).

    Example: layerwise diagnose path/to/SmolLM2-135M-Instruct.Q4_1.gguf --tokens 16384 --out runs/diag
    """
    from .diagnose import diagnose as run_diagnosis
    from .loading import load_model, load_tokens
    from .diagnose.metrics import token_batches
    from .report.diagnosis import write_report

    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
        ids = load_tokens(data, tokenizer, tokens)
    batches = list(token_batches(ids, seq_len, batch_size, tokens))
    progress = track(batches, description=f"diagnosing {sum(b.numel() for b in batches):,} tokens",
                     console=console, transient=True)
    result = run_diagnosis(net, progress, n_span=n_span, removal=removal, attention_entropy=entropy)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps({"model": str(model), **result.to_json()}, indent=1))
    page = write_report(out / "diagnosis.json", out)
    metrics = result.metrics()
    table = Table(title=f"{result.family}: {result.n_layers} layers, {result.tokens:,} tokens "
                        f"(loss {metrics['loss'][0]:.4f})")
    columns = ["layer", "angular_distance", "block_influence", "logit_lens_kl", "logit_lens_top1"]
    columns += ["removal_delta_loss"] if removal else []
    for column in columns:
        table.add_column(column, justify="right")
    for i in range(result.n_layers):
        table.add_row(str(i), *(f"{metrics[c][i]:.4f}" for c in columns[1:]))
    console.print(table)
    console.print(f"outputs: {out / 'diagnosis.json'}, {page}")


app.command("eval")(eval_command)
app.command("report")(report_command)
app.command("prune")(prune_command)


data_app = typer.Typer(help="Build and inspect tokenized corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("build")
def data_build(
    sources: str = typer.Option("shakespeare", help="Comma-separated sources: shakespeare (embedded), austen, "
                                                    "kjv, python-docs, kernel-docs; or 'large' for all five."),
    out: Path = typer.Option(Path("data/shakespeare"), help="Output folder."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary to train (ignored with --tokenizer)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Use this tokenizer.json or HF tokenizer folder instead."),
):
    """Assemble sources into train/val token shards, a tokenizer and a manifest (sizes, sha256, licences).

    Example: layerwise data build --sources large --out data/large --vocab-size 16384
    The opt-in sources come from Debian packages: see scripts/install_corpus.sh.
    """
    from .data.build import build_corpus
    from .data.sources import LARGE_CORPUS

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
