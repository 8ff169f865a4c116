"""The README's main job until the full trainer lands: train several presets under one identical budget on
the bundled Shakespeare text (byte-level, CPU, minutes) and compare their validation loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..config import ModelConfig
from ..data.corpus import byte_tokens, shakespeare_text, train_val_split
from ..model import LayerwiseForCausalLM


@dataclass
class DemoRun:
    preset: str
    params: int
    val_loss_start: float
    val_loss_end: float
    tokens_per_s: float
    seconds: float


def sample_windows(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq, (batch,), generator=generator)
    return torch.stack([tokens[s: s + seq] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(model(ids, labels=ids).loss.item() for ids in batches) / len(batches)
    model.train()
    return loss


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10% of peak


def run_demo(presets: list[str], size: str = "tiny", steps: int = 200, batch: int = 16, seq: int = 128,
             lr: float = 2e-3, seed: int = 0, console: Console | None = None) -> list[DemoRun]:
    console = console or Console()
    configs = {name: ModelConfig.from_preset(name, size) for name in presets}  # fail fast on a bad name
    train, val = train_val_split(byte_tokens(shakespeare_text()))
    console.print(f"corpus: Shakespeare, {len(train):,} train / {len(val):,} validation bytes; "
                  f"budget per preset: {steps} steps x {batch} x {seq} = {steps * batch * seq:,} tokens")
    val_gen = torch.Generator().manual_seed(seed + 1)
    val_batches = [sample_windows(val, batch, seq, val_gen) for _ in range(8)]
    runs = []
    with Progress(TextColumn("{task.description:>20}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeRemainingColumn(), console=console) as progress:
        for name, cfg in configs.items():
            torch.manual_seed(seed)
            model = LayerwiseForCausalLM(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
            start_loss = validation_loss(model, val_batches)
            data_gen = torch.Generator().manual_seed(seed)  # identical batches for every preset
            task = progress.add_task(name, total=steps, status="")
            t0 = time.perf_counter()
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
                ids = sample_windows(train, batch, seq, data_gen)
                loss = model(ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if step % 10 == 0 or step == steps - 1:
                    progress.update(task, completed=step + 1, status=f"loss {loss.item():.3f}")
            seconds = time.perf_counter() - t0
            runs.append(DemoRun(name, sum(p.numel() for p in model.parameters()), start_loss,
                                validation_loss(model, val_batches), steps * batch * seq / seconds, seconds))
    console.print(results_table(runs))
    return runs


def results_table(runs: list[DemoRun]) -> Table:
    best = min(r.val_loss_end for r in runs)
    table = Table(title="Equal-budget comparison: validation loss, nats per byte (lower is better)")
    table.add_column("preset", no_wrap=True)
    for column in ("params", "val start", "val end", "bits/byte", "tokens/s", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in sorted(runs, key=lambda r: r.val_loss_end):
        mark = " *" if r.val_loss_end == best else ""
        table.add_row(r.preset + mark, f"{r.params / 1e6:.2f}M", f"{r.val_loss_start:.3f}",
                      f"{r.val_loss_end:.3f}", f"{r.val_loss_end / math.log(2):.3f}", f"{r.tokens_per_s:,.0f}",
                      f"{r.seconds:.0f}s")
    return table
