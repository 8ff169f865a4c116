"""Run records: `metrics.jsonl` (one JSON object per record; other tools read runs from it) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs import read_metrics


class MetricsLog:
    """Appends records with at least `step` and `tokens`. On resume, records after the resume step (and a
    partial last line left by a kill) are dropped first, so a resumed run's log reads as if it had never been
    interrupted."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
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

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.writer is not None:
            self._scalars(record, "", record["step"])

    def _scalars(self, values: dict, prefix: str, step: int) -> None:
        """Numbers as scalars; lists as one series per index (layer); dicts (telemetry) recursively."""
        for key, value in values.items():
            name = f"{prefix}{key}"
            if isinstance(value, bool) or key == "step":
                continue
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{name}/{i:02d}", v, step)
            elif isinstance(value, dict):
                self._scalars(value, f"{name}/", step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
