"""Named registries and the rules variants carry.

Every norm, placement, residual scheme, value-residual scheme and MLP is one `Variant` subclass registered
under the name its `ModelConfig` field takes. A variant checks the configs it accepts (`validate`), names the
config fields it reads (`config_fields`) and states what transforms may do to a model that uses it
(`depth_dependent`, `drop_safe`, `repeat_safe`). Code that needs such a rule asks the selected classes
(`selected_variants(cfg)`) instead of comparing names.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Callable, Generic, TypeVar

from ..errors import UserError

T = TypeVar("T")


def fail(field: str, value, why: str) -> None:
    raise UserError(f"ModelConfig.{field}={value!r} {why}")


class Variant:
    """Base of every registered variant. The flags describe the variant's math, so transforms can ask them."""

    registered_name: str = ""  # set by `Registry.register`
    kind: str = ""  # "norm", "residual scheme", ...: set by `Registry.register`
    selector_field: str = ""  # the ModelConfig field that selects it: set by `Registry.register`

    # ModelConfig fields that only this variant (and others that list them) reads; setting one to a
    # non-default value when no selected variant reads it warns that it has no effect.
    config_fields: tuple[str, ...] = ()
    # The math of a layer depends on its index or on the model's depth, so a model rebuilt from its config with
    # layers removed or repeated (e.g. a pruned checkpoint reloaded) would differ. `depth_dependence` says how.
    depth_dependent: bool = False
    depth_dependence: str = ""
    # A layer can be deleted in place and every surviving layer keeps its own math (the config is then rewritten;
    # saving and reloading the result also needs no selected variant to be `depth_dependent`). `drop_hazard`
    # says what breaks when it cannot.
    drop_safe: bool = True
    drop_hazard: str = ""
    # A layer can be executed twice in a row, or duplicated, with its own parameters. `repeat_hazard` says what
    # breaks when it cannot.
    repeat_safe: bool = True
    repeat_hazard: str = ""

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise `UserError` naming the field when `cfg` selects this variant with settings it cannot run."""


class Registry(Generic[T]):
    """A name -> class table whose lookup error lists the valid names."""

    def __init__(self, kind: str, config_field: str):
        self.kind = kind
        self.config_field = config_field
        self._entries: dict[str, type[T]] = {}
        REGISTRIES[config_field] = self

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].__name__}")
            self._entries[name] = cls
            cls.registered_name, cls.kind, cls.selector_field = name, self.kind, self.config_field
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"ModelConfig.{self.config_field}={name!r} is not a known {self.kind}; "
                f"valid: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def classes(self) -> list[type[T]]:
        """The registered classes in registration order (the order their module defines them)."""
        return list(self._entries.values())

    def selected(self, cfg) -> type[T]:
        return self.get(getattr(cfg, self.config_field))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# config field -> its registry, filled as the variant modules are imported.
REGISTRIES: dict[str, Registry] = {}
# The order in which variants validate a config: placement rules before the schemes and norms that rely on them.
VALIDATION_ORDER = ("norm_placement", "residual", "value_residual", "mlp", "norm", "position_embedding")


def _registries() -> dict[str, Registry]:
    # The variant modules register on import; import them here so a lookup never sees a partial table.
    from . import mlp, norms, placement, positions, residual, value_residual  # noqa: F401

    return REGISTRIES


def variant_of(cfg, config_field: str) -> type[Variant]:
    """The class `cfg` selects through `config_field`, e.g. `variant_of(cfg, "norm_placement")`."""
    return _registries()[config_field].selected(cfg)


def selected_variants(cfg) -> list[type[Variant]]:
    """Every variant class `cfg` selects, in validation order; LayerNorm Scaling when it is on."""
    from .norms import LayerNormScaling

    registries = _registries()
    chosen = [registries[field].selected(cfg) for field in VALIDATION_ORDER]
    if cfg.layernorm_scaling:
        chosen.insert(1, LayerNormScaling)  # its rule needs the placement, and precedes the residual's
    return chosen


def validate_variants(cfg) -> None:
    """Run every selected variant's own checks, then warn about variant fields nothing selected reads."""
    chosen = selected_variants(cfg)
    for variant in chosen:
        variant.validate(cfg)
    read = {field for variant in chosen for field in variant.config_fields}
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg))}
    readers: dict[str, list[type[Variant]]] = {}
    for registry in _registries().values():
        for variant in registry.classes():
            for field in variant.config_fields:
                readers.setdefault(field, []).append(variant)
    for field, variants in readers.items():
        value = getattr(cfg, field)
        if field in read or value == defaults[field]:
            continue
        kind, selector = variants[0].kind, variants[0].selector_field
        warnings.warn(
            f"ModelConfig.{field}={value!r} is read by {kind} {', '.join(v.registered_name for v in variants)}, "
            f"not by {selector}={getattr(cfg, selector)!r}; it has no effect", UserWarning,
            stacklevel=_stacklevel_outside_the_library(),
        )


def _stacklevel_outside_the_library() -> int:
    """The `warnings.warn` stacklevel of the first caller outside layerwise and transformers, so a warning
    points at the user's line (and two different lines both warn)."""
    frame, level = sys._getframe(2), 2  # level 1 is the function that calls warnings.warn
    def internal(frame) -> bool:
        package = frame.f_globals.get("__name__", "").split(".")[0]
        return package in ("layerwise", "transformers") or frame.f_code.co_filename.startswith("<")  # dataclass code

    while frame.f_back is not None and internal(frame):
        frame, level = frame.f_back, level + 1
    return level
