"""Modules that follow the training step (PRepBN's LayerNorm -> BatchNorm decay, running-statistics warm-ups).

A module opts in by defining `set_training_step(step, total_steps)`. The trainer calls it on every such module
before each optimizer step (and with the starting step on resume), so what it sets must be a function of the
step alone: a resumed run is then exact, and gradient accumulation does not speed a schedule up (the released
PRepBN counts forward calls instead). Outside the trainer nothing calls it: a module keeps what its buffers say.
"""

from __future__ import annotations

from torch import nn

from .registry import fail


def steps_of(value: float, total_steps: int) -> int:
    """A schedule length given like TrainConfig.warmup: a fraction of the run if < 1, else a step count."""
    return round(value * total_steps) if value < 1 else int(value)


def check_steps_field(cfg, field: str) -> None:
    """Refuse a schedule-length field `steps_of` cannot read, naming it."""
    value = getattr(cfg, field)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value < float("inf") or (value >= 1 and value != int(value)):
        fail(field, value, "must be a fraction of the run in [0, 1) or a whole number of steps, like "
             "TrainConfig.warmup")


def scheduled_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "set_training_step", None))]


def set_training_step(model: nn.Module, step: int, total_steps: int) -> None:
    for module in scheduled_modules(model):
        module.set_training_step(step, total_steps)
