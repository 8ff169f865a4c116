"""The transform steps and the one function that runs them: `apply(model, ["drop=12-15", "fold-norms"])`.

A step is one registered class (`@register_step("name")`): it parses its argument, checks that the model can
take it (`check`, which raises `UserError` naming the step and the reason) and acts (`apply`, which may
return a new model object, e.g. `to-layerwise`). `apply` parses every step before it runs any, so a typo in
the third step fails before the first one has spent minutes, and it records what ran in the model's config
(`layerwise_transforms`), so a saved model says how it was made.

A step written `name=argument` takes an argument; a step that needs none is written `name`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import ClassVar

from torch import nn

from ..errors import UserError

# Provenance keys written into the model's config (HF configs keep unknown keys in config.json).
TRANSFORMS_KEY = "layerwise_transforms"  # the steps applied so far, in order, as written
SOURCE_KEY = "layerwise_source"  # what the first transform read (a path, as given)
QUANTIZATION_KEY = "layerwise_quantization"  # written by the `quantize` step: backend, group size, widths

# Modules whose import registers steps; imported on first use so `layerwise --help` stays light.
_STEP_MODULES = (".prune", ".program", ".norms", ".convert", ".quantize")


class Step:
    """One transform. Subclasses set `name` (by `register_step`), `argument` ("required", "none" or
    "optional"), `summary`, and implement `apply`; `parse` and `check` refuse what they cannot do."""

    name: ClassVar[str] = ""
    argument: ClassVar[str] = "none"
    argument_help: ClassVar[str] = ""  # e.g. 'layers, 0-based, ranges inclusive: "12-15,20"'
    summary: ClassVar[str] = ""
    # Whether the step can run on a quantized model (its decoder linears are packed HQQLinear modules, which
    # no reshaping or folding step can edit).
    takes_quantized: ClassVar[bool] = False

    def __init__(self, text: str, value: str | None):
        self.text = text
        if self.argument == "required" and not value:
            raise UserError(f"--apply {text!r}: step {self.name!r} needs an argument, {self.name}=VALUE "
                            f"({self.argument_help})")
        if self.argument == "none" and value is not None:
            raise UserError(f"--apply {text!r}: step {self.name!r} takes no argument; write it as {self.name!r}")
        self.value = value
        self.parse(value)

    def parse(self, value: str | None) -> None:
        """Read the argument; raise UserError naming the step text and a valid example."""

    def check(self, model: nn.Module) -> None:
        """Raise UserError("step NAME: cannot ...: reason") when `model` cannot take this step."""

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def refuse(self, why: str) -> None:
        raise UserError(f"--apply {self.text!r}: {why}")

    def __str__(self) -> str:
        return self.text


STEPS: dict[str, type[Step]] = {}


def register_step(name: str):
    def decorator(cls: type[Step]) -> type[Step]:
        if name in STEPS and STEPS[name] is not cls:
            raise ValueError(f"transform step {name!r} is already registered by {STEPS[name].__name__}")
        cls.name = name
        STEPS[name] = cls
        return cls

    return decorator


def registered_steps() -> dict[str, type[Step]]:
    """Every step, after importing the modules that define them."""
    for module in _STEP_MODULES:
        try:
            importlib.import_module(module, __package__)
        except ModuleNotFoundError as err:  # a step module not written yet must not break the others
            if err.name != f"{__package__}{module}":
                raise
    return STEPS


def parse_step(text: str | Step) -> Step:
    if isinstance(text, Step):
        return text
    text = text.strip()
    name, eq, value = text.partition("=")
    steps = registered_steps()
    if name not in steps:
        raise UserError(f"--apply {text!r}: unknown step {name!r}; valid steps: {', '.join(sorted(steps))} "
                        "(`layerwise transform --help` describes each)")
    return steps[name](text, value if eq else None)


def parse_steps(texts: Iterable[str | Step]) -> list[Step]:
    return [parse_step(text) for text in texts]


def apply(model: nn.Module, steps: Iterable[str | Step], source: str | None = None) -> nn.Module:
    """Run `steps` on `model` in order and return the result (the same object unless a step replaces it).

    Each step is checked against the model as the previous steps left it; the config of the result lists the
    steps under `layerwise_transforms` and the model they started from under `layerwise_source` (the first
    source recorded, else `source`), also when `steps` is empty (a GGUF saved as safetensors says so).
    """
    parsed = parse_steps(steps)
    origin = getattr(model.config, SOURCE_KEY, None) or (str(source) if source is not None else None)
    for step in parsed:
        if getattr(model.config, QUANTIZATION_KEY, None) is not None and not step.takes_quantized:
            step.refuse(f"step {step.name!r} cannot run on a quantized model (its layers' linears are packed); "
                        "run it before `quantize`, which must be the last step")
        step.check(model)
        history = list(getattr(model.config, TRANSFORMS_KEY, None) or [])
        model = step.apply(model)  # may be a new model with a new config: the history moves to it
        setattr(model.config, TRANSFORMS_KEY, history + [str(step)])
    if origin is not None:
        setattr(model.config, SOURCE_KEY, origin)
    return model


# Set by a step whose result runs in memory but cannot be saved as its family (e.g. tied layers in an HF
# family, whose config cannot say that two layers share weights); `save_refusal` reads it.
_UNSAVEABLE = "_layerwise_unsaveable"


def mark_unsaveable(model: nn.Module, why: str) -> None:
    setattr(model, _UNSAVEABLE, why)


def save_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot be saved, or None."""
    return getattr(model, _UNSAVEABLE, None)
