"""`layerwise presets`, `layerwise train` and `layerwise compare` (which trains several presets alike).

Module-level imports stay cheap (no torch): every command's --help must be fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()

README_PRESETS = "pre-ln,lns,peri-ln,block-attnres"


def presets_command(
    size: str = typer.Option("tiny", help="Size whose parameter counts are shown: tiny, 124m, 350m, 1b."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines instead of a table."),
):
    """List the named presets: the paper each reproduces and what it changes from pre-rmsnorm.

    Example: layerwise presets --size 124m
    """
    from rich.table import Table

    from ..config import ModelConfig
    from ..presets import PRESETS, preset_fields

    base = preset_fields("pre-rmsnorm", size)
    rows = []
    for name, preset in PRESETS.items():
        fields = preset_fields(name, size)
        changes = {k: v for k, v in fields.items() if k != "preset" and base.get(k) != v}
        rows.append(dict(name=name, paper=preset.paper, changes=changes, params=parameter_count(ModelConfig(**fields))))
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


def parameter_count(model_cfg) -> int:
    import torch

    from ..model import LayerwiseForCausalLM

    with torch.device("meta"):  # counts parameters without allocating them
        return sum(p.numel() for p in LayerwiseForCausalLM(model_cfg).parameters())


# Options shared by `train` and `compare`; None means "keep the YAML / TrainConfig default".
_CONFIG = typer.Option(None, "--config", help="YAML file of TrainConfig fields; the model goes in its `model:` "
                                              "mapping (preset, size, ModelConfig fields).")
_SIZE = typer.Option(None, help="Model size (model.size): tiny, 124m, 350m, 1b.")
_DATA = typer.Option(None, help="Corpus folder, llm.c shards, text file/folder or datasets folder "
                                "(default: embedded Shakespeare).")
_MAX_TOKENS = typer.Option(None, "--max-tokens", help="Training budget, e.g. 2M.")
_BATCH = typer.Option(None, "--batch-size", help="Global batch in sequences (fixed across world sizes).")
_SEQ = typer.Option(None, "--seq-len", help="Tokens per sequence.")
_LR = typer.Option(None, help="Peak learning rate.")
_SCHEDULE = typer.Option(None, help="cosine | wsd | constant.")
_COMPILE = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (GPU).")
_SET = typer.Option(None, "--set", help="Extra overrides key=value, e.g. --set warmup=100 --set model.n_layers=6.")


def _train_config(config: Path | None, fields: dict, model: dict, sets: list[str] | None):
    """The YAML, then the options given (model options into the `model:` mapping), then --set."""
    from dataclasses import replace

    from .config import TrainConfig, apply_overrides

    given = {k: v for k, v in fields.items() if v is not None}
    cfg = TrainConfig.from_yaml(config, **given) if config else TrainConfig(**given)
    model = {k: v for k, v in model.items() if v is not None}
    if model:
        cfg = replace(cfg, model={**cfg.model, **model})
    return apply_overrides(cfg, sets or [])


def train_command(
    config: Optional[Path] = _CONFIG,
    preset: Optional[str] = typer.Option(None, help="Preset to train (model.preset; `layerwise presets`)."),
    size: Optional[str] = _SIZE,
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Continue training this model (HF folder, "
                                            ".gguf file, layerwise run or checkpoint) instead of a new one; text "
                                            "data is tokenized with its tokenizer. Not with --preset/--size/model:."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="With --init-from: train rank-R LoRA "
                                            "adapters (the lora extra) instead of all weights; checkpoints hold "
                                            "them merged."),
    data: Optional[str] = _DATA, max_tokens: Optional[str] = _MAX_TOKENS,
    out: Optional[str] = typer.Option(None, help="Run folder (metrics.jsonl, tensorboard/, checkpoints/)."),
    batch_size: Optional[int] = _BATCH, seq_len: Optional[int] = _SEQ, lr: Optional[float] = _LR,
    schedule: Optional[str] = _SCHEDULE, compile: Optional[bool] = _COMPILE,
    resume: Optional[str] = typer.Option(None, help="none | auto (latest valid checkpoint) | a checkpoint folder."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="off | offline | online: also log to Weights & "
                                        "Biases (the wandb extra); offline writes OUT/wandb/ without network."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a folder that holds a run "
                                                              "(the old run is moved to <out>.old-<time>)."),
    sets: Optional[list[str]] = _SET,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved TrainConfig, ModelConfig and "
                                                          "parameter count as YAML, and stop."),
):
    """Pretrain one model with per-layer depth telemetry; resumable; runs under torchrun for DDP.

    Example: layerwise train --preset lns --size tiny --max-tokens 2M --out runs/lns
    Healing: layerwise train --init-from pruned/ --max-tokens 1M --lr 1e-4 --out runs/heal
    Multi-GPU: torchrun --standalone --nproc_per_node=8 -m layerwise.cli train --preset lns --size 124m ...
    """
    cfg = _train_config(config, dict(init_from=init_from, lora_rank=lora_rank, data=data, max_tokens=max_tokens,
                                     out=out, batch_size=batch_size, seq_len=seq_len, lr=lr, schedule=schedule,
                                     compile=compile, resume=resume, seed=seed, wandb=wandb,
                                     overwrite=overwrite or None),
                        dict(preset=preset, size=size), sets)
    if dry_run:
        print(resolved_yaml(cfg), end="")
        return
    from .trainer import train as run_training

    run_training(cfg, console)


def resolved_yaml(cfg) -> str:
    """What `train` would build from cfg, without training: the data is opened (the default corpus is built
    once if missing) because the model's vocabulary comes from it."""
    import yaml

    from ..config import field_names
    from .trainer import build_model_config, open_data

    if cfg.init_from is not None:  # the model is loaded as it is; the data is read by the run
        from .init_from import open_init_model

        model = open_init_model(cfg.init_from).model
        return yaml.safe_dump({"train": cfg.to_dict(), "model_config": model.config.to_diff_dict(),
                               "parameters": sum(p.numel() for p in model.parameters())}, sort_keys=False)
    model_cfg = build_model_config(cfg, open_data(cfg, Console(stderr=True)).vocab_size)  # stdout is the YAML
    model = {name: getattr(model_cfg, name) for name in field_names()}
    return yaml.safe_dump({"train": cfg.to_dict(), "model_config": model,
                           "parameters": parameter_count(model_cfg)}, sort_keys=False)


def compare_command(
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
    from ..compare import compare as run_compare

    cfg = _train_config(config, dict(data=data, max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len,
                                     lr=lr, schedule=schedule, compile=compile), dict(size=size), sets)
    run_compare([p.strip() for p in presets.split(",") if p.strip()],
                [int(s) for s in seeds.split(",") if s.strip()], cfg, Path(out), console)


def remove_norms_command(
    model: str = typer.Argument(..., help="A layerwise Pre-LN LayerNorm model, run or checkpoint, or an HF GPT-2 "
                                          "folder."),
    data: Optional[str] = typer.Option(None, help="Text (file or folder, tokenized with the model's tokenizer) or "
                                                  "a corpus folder built with it."),
    max_tokens: Optional[str] = _MAX_TOKENS,
    out: str = typer.Option(..., help="Run folder (checkpoints/, metrics.jsonl); the model without live norms "
                                      "goes to OUT/model, and for a GPT-2 a stock GPT-2 to OUT/model-gpt2."),
    schedule: str = typer.Option("baroni", help="baroni (Baroni et al., 300 steps: lr 6e-4 -> 3e-4, wd 0.01) or "
                                                "heimersheim (Heimersheim 2024, 2000 steps: 6e-4 -> 6e-5, wd 0.1); "
                                                "its events scaled to this run's steps and layers."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the schedule's)."),
    batch_size: Optional[int] = _BATCH, seq_len: Optional[int] = _SEQ,
    resume: Optional[str] = typer.Option(None, help="none | auto (latest valid checkpoint) | a checkpoint folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a folder that holds a run "
                                                              "(the old run is moved to <out>.old-<time>)."),
    sets: Optional[list[str]] = _SET,
):
    """Fine-tune a Pre-LN model while its LayerNorms lose their data-dependent scale one by one (ln_2 of each
    layer, then ln_1 for queries/keys, then ln_1 for values, then the final norm), then export it with fixed-scale
    norms (norm=frozen), loadable and generating like any layerwise model.

    Example: layerwise remove-norms gpt2/ --data owt.txt --max-tokens 20M --out runs/gpt2-noln
    """
    from dataclasses import replace

    from ..errors import UserError
    from .config import apply_overrides
    from .norm_removal import NormRemoval, schedule as reference_schedule

    reference = reference_schedule(schedule)
    cfg = _train_config(None, dict(init_from=model, data=data, max_tokens=max_tokens, out=out,
                                   batch_size=batch_size, seq_len=seq_len, resume=resume, overwrite=overwrite or None),
                        {}, None)
    cfg = apply_overrides(replace(cfg, **reference.training, **({"lr": lr} if lr is not None else {})), sets or [])
    if cfg.lora_rank:
        raise UserError("remove-norms fine-tunes every weight (LoRA was reported to fail on GPT-2 small); "
                        "drop --set lora_rank")
    removal = NormRemoval(schedule, eot_token_id=_eot_token_id(Path(model)))
    from .trainer import train as run_training

    run_training(cfg, console, callbacks=[removal])
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process writes the exports
        return
    export_removed(Path(out), removal, cfg, console, source=model,
                   how=f"remove-norms={schedule} ({cfg.total_steps} steps)")


def _eot_token_id(model: Path) -> int | None:
    """The end-of-text id of the model's tokenizer (a run's, a checkpoint's run's, or the folder's), if it has one."""
    from ..data.tokenizer import eot_id, load_tokenizer
    from ..runs import run_tokenizer

    run = model.parent.parent if model.parent.name == "checkpoints" else model
    found = run_tokenizer(run) if (run / "checkpoints").is_dir() else None
    if found is None and not model.is_dir():
        return None  # a model file (e.g. a .gguf): the trainer refuses it with the reason
    try:
        return eot_id(load_tokenizer(found or model))
    except FileNotFoundError:
        return None


def export_removed(run: Path, removal, cfg, console: Console, source: str, how: str) -> None:
    """The run's last checkpoint with every norm switched, as a norm="frozen" model in RUN/model (and a stock
    GPT-2 in RUN/model-gpt2 when it came from one); config.json records `source` and `how` it was made, and the
    model card the run's data, tokens and final held-out loss."""
    from ..loading import load_model
    from ..runs import read_metrics
    from ..transform.save import save_transformed
    from .card import held_out_evaluation, held_out_note, training_facts
    from .norm_removal import as_gpt2_layernorm, data_dependent_norms, freeze, set_removal_state

    total_steps = cfg.total_steps
    fake, tokenizer = load_model(run)
    last = [r for r in read_metrics(run) if "val_loss" in r][-1]
    card = dict(card_facts=training_facts(cfg, total_steps)[1:],  # the base model is the card's source line
                evaluation=held_out_evaluation(last["val_loss"]),
                evaluation_note=held_out_note(last["step"], None, cfg.seq_len))
    set_removal_state(fake, removal.events, total_steps)
    frozen = freeze(fake)
    frozen.config.layerwise_source = frozen.config.layerwise_source or source
    frozen.config.layerwise_transforms = [*(frozen.config.layerwise_transforms or []), how]
    left = data_dependent_norms(frozen)
    assert not left, f"norms with a data-dependent scale left: {left}"
    save_transformed(frozen, tokenizer, run / "model", overwrite=True, **card)
    first = {}
    for step, what in removal.events:  # ln2.0, ln2.1, ... -> ln2 from its first step
        first.setdefault(what.split(".")[0], step)
    console.print("removal schedule (step each kind of norm started losing its scale): "
                  + ", ".join(f"{kind} {step}" for kind, step in first.items()))
    console.print(f"model without live norms: {run / 'model'}")
    if frozen.config.layerwise_hf_family == "gpt2":
        from ..arch.state_dict import layerwise_to_hf

        save_transformed(layerwise_to_hf(as_gpt2_layernorm(frozen), "gpt2"), tokenizer, run / "model-gpt2",
                         overwrite=True, **card)
        console.print(f"as a stock GPT-2 (LayerNorm eps 1e12, gamma * 1e6 / sigma): {run / 'model-gpt2'}")
