"""Reading run folders: checkpoints (listed, verified), `metrics.jsonl`, the run's configs and tokenizer.

A run folder written by `layerwise train` holds `metrics.jsonl`, `train.yaml`, `model_config.json`,
`tokenizer.json` (when the corpus has one), `tensorboard/`, `checkpoints/step_XXXXXXX/` and `run.lock` (who
owns the folder while a run is writing it). Writing them is the trainer's job (`layerwise.train`); every
other command reads them through this module.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import warnings
from pathlib import Path

from .errors import UserError

MANIFEST = "MANIFEST.json"
PREFIX = "step_"
LOCK = "run.lock"
TOKENIZER = "tokenizer.json"
# Files whose presence makes a folder a run that a fresh `train` would overwrite.
RUN_FILES = ("metrics.jsonl", "train.yaml", "model_config.json", "checkpoints")


class CorruptCheckpoint(ValueError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under root/checkpoints, oldest first (temporary folders are ignored)."""
    ckpt_dir = Path(root) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, uncorrupted checkpoint; CorruptCheckpoint saying what is wrong otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CorruptCheckpoint(f"{path}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptCheckpoint(f"{manifest_path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptCheckpoint(f"{manifest_path}: no file list (not a manifest a checkpoint write made)")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise CorruptCheckpoint(f"{file}: missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"{file}: {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)")
        if sha256_of(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"{file}: sha256 mismatch (corrupted)")
    return manifest


def latest_valid_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as err:
            warnings.warn(f"skipping corrupt checkpoint: {err}; trying the previous one", stacklevel=2)
    return None


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl. A kill mid-write can leave the last line partial: it is dropped with a
    warning (the run resumes from a checkpoint that precedes it); a bad line before the last is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a layerwise run folder?)")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not a JSON record; repair or remove that line") from None
            warnings.warn(f"{path}:{number}: dropping a partial last record (the run was interrupted mid-write)",
                          stacklevel=2)
    return records


def run_summary(run_dir: Path) -> dict:
    """Final/best validation loss, throughput and the last depth telemetry of one run folder."""
    records = read_metrics(run_dir)
    vals = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not vals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no val_loss record; did the run finish?")
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    telemetry = [r["telemetry"] for r in records if "telemetry" in r]
    model_cfg = json.loads((Path(run_dir) / "model_config.json").read_text())
    return {
        "run": str(run_dir), "final_val_loss": vals[-1][1], "best_val_loss": min(v for _, v in vals),
        "tokens": vals[-1][0], "tokens_per_s": statistics.median(speeds) if speeds else None,
        "val_curve": vals, "train_curve": [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r],
        "telemetry": telemetry[-1] if telemetry else None, "preset": model_cfg.get("preset"),
    }


def run_tokenizer(run: Path) -> Path | None:
    """The tokenizer.json a run trained with: its own copy (written by the trainer), else the one in the
    corpus folder its train.yaml names."""
    import yaml

    if (run / TOKENIZER).exists():
        return run / TOKENIZER
    config = yaml.safe_load((run / "train.yaml").read_text()) if (run / "train.yaml").exists() else {}
    data = config.get("data")
    candidate = Path(data) / TOKENIZER if data else None
    return candidate if candidate is not None and candidate.exists() else None
