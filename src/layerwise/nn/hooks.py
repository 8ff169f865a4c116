"""Named observation points (TransformerLens-style) and the one way to read them: `capture`.

Every tensor worth observing passes through a `HookPoint`, an identity module with a stable name such as
`model.layers.3.attn.hook_in`, so telemetry, diagnostics and tests never depend on how a variant computes it.
Without hooks a point costs one identity call, and a model without an active `capture` carries no hooks at all
(the training step stays compilable with fullgraph=True).

    with capture(model, ["model.layers.*.attn.hook_in", "model.hook_final_norm_in"]) as cache:
        model(ids)
    h_L = cache["model.hook_final_norm_in"]

Names are those of `LayerwiseForCausalLM`'s module tree, whichever of it, its inner `LayerwiseModel` or a
torch.compile / DDP wrapper is passed. Forwards inside the block must run eagerly: a compiled graph does not
call hooks added after it was traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import UserError


class HookPoint(nn.Identity):
    """Returns its input unchanged; `capture` attaches to it to observe the tensor that passes."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself under a torch.compile (`_orig_mod`) or DDP (`module`) wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of `model` by stable name, in module-tree order (layer 0 before layer 1).

    A Hugging Face base model (a `LayerwiseModel` passed without its head) gets its wrapper's prefix, so
    `model.layers.0.attn.hook_in` names the same point whether the causal LM or its inner model is passed."""
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    is_base_model = prefix and not isinstance(getattr(model, prefix, None), nn.Module)
    prefix = f"{prefix}." if is_base_model else ""
    return {prefix + name: module for name, module in model.named_modules() if isinstance(module, HookPoint)}


class ActivationCache(Mapping):
    """What the captured hook points saw, by name, in hook-point order. `cache[name]` is the one tensor a point
    saw; a point that fired several times (several forwards, or a module called more than once) is read with
    `calls(name)`, so that taking "the" value of such a point is never silent."""

    def __init__(self, names: list[str]):
        self.names = names
        self._calls: dict[str, list] = {name: [] for name in names}

    def record(self, name: str, value) -> None:
        self._calls[name].append(value)

    def calls(self, name: str) -> list:
        """Every value the point saw inside the block, in call order."""
        if name not in self._calls:
            raise KeyError(f"{name!r} was not captured; captured points: {', '.join(self.names)}")
        return self._calls[name]

    def __getitem__(self, name: str):
        calls = self.calls(name)
        if len(calls) != 1:
            raise KeyError(f"hook point {name!r} fired {len(calls)} times inside the capture block; "
                           "read each call with cache.calls(name)")
        return calls[0]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self.names if self._calls[name])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def select(points: dict[str, HookPoint], names: str | Iterable[str]) -> list[str]:
    """The point names matching `names` (exact names or fnmatch globs such as `model.layers.*.attn.hook_in`),
    in hook-point order. A pattern that matches nothing is a mistake, not an empty selection."""
    patterns = [names] if isinstance(names, str) else list(names)
    chosen = set()
    for pattern in patterns:
        matched = {name for name in points if fnmatchcase(name, pattern)}
        if not matched:
            example = next(iter(points), None)
            raise UserError(f"capture: no hook point matches {pattern!r}; list them with hook_points(model)"
                            + (f", e.g. {example!r}" if example else " (this model has none)"))
        chosen |= matched
    return [name for name in points if name in chosen]


@contextmanager
def capture(model: nn.Module, names: str | Iterable[str],
            reduce: Callable[[torch.Tensor], Any] | None = None) -> Iterator[ActivationCache]:
    """Record what the named hook points see during the forwards run inside the block (TransformerLens's
    `run_with_cache`). Tensors are detached; `reduce`, if given, is applied to each one as it passes, so only
    the reduction is kept (e.g. a per-token norm instead of the [B, T, d] activation). The hooks are removed
    when the block exits, also when it raises."""
    points = hook_points(model)
    chosen = select(points, names)
    cache = ActivationCache(chosen)
    handles = []
    try:
        for name in chosen:
            def hook(module, args, output, name=name):
                value = output.detach()
                cache.record(name, value if reduce is None else reduce(value))
            handles.append(points[name].register_forward_hook(hook))
        yield cache
    finally:
        for handle in handles:
            handle.remove()
