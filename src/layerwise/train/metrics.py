"""Run records: `metrics.jsonl` (one JSON object per record; other tools read runs from it), and the same
numbers as scalars for TensorBoard and, optionally, Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from ..runs import read_metrics

WANDB_ID = "wandb_id"  # in the run folder: a resumed run logs on into the same W&B run


def wandb_module():
    """The wandb package, imported only when a run asks for it (it is the `wandb` extra)."""
    try:
        import wandb
    except ImportError:
        raise UserError("TrainConfig.wandb needs the wandb package: pip install 'layerwise[wandb]' "
                        "(or set wandb: off)") from None
    return wandb


def scalars(values: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """A record's numbers as (name, value): lists as one series per index (layer), dicts (telemetry)
    recursively; `step` and flags are not series."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or key == "step":
            continue
        if isinstance(value, (int, float)):
            yield name, value
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield f"{name}/{i:02d}", v
        elif isinstance(value, dict):
            yield from scalars(value, f"{name}/")


class MetricsLog:
    """Appends records with at least `step` and `tokens`. On resume, records after the resume step (and a
    partial last line left by a kill) are dropped first, so a resumed run's log reads as if it had never been
    interrupted."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True,
                 wandb: str = "off", config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [record for record in read_metrics(run_dir) if record["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        self.wandb_run = None if wandb == "off" else _wandb_run(run_dir, wandb, resume_step, config or {})

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            for name, value in scalars(record):
                self.writer.add_scalar(name, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(dict(scalars(record)), step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run(run_dir: Path, mode: str, resume_step: int | None, config: dict):
    """A W&B run writing under RUN/wandb/; offline, it needs no network (`wandb sync RUN/wandb/offline-run-*`
    uploads it later). A resumed layerwise run continues the W&B run its folder names."""
    wandb = wandb_module()
    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(mode=mode, dir=str(run_dir), id=run_id, resume="allow", config=config, name=run_dir.name,
                      project=os.environ.get("WANDB_PROJECT", "layerwise"),
                      settings=wandb.Settings(silent=True, disable_git=True, save_code=False))
