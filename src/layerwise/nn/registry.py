"""Named registries: every norm, placement, residual scheme and value-residual scheme is one registered class."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class table whose lookup error lists the valid names."""

    def __init__(self, kind: str, config_field: str):
        self.kind = kind
        self.config_field = config_field
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].__name__}")
            self._entries[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"ModelConfig.{self.config_field}={name!r} is not a known {self.kind}; "
                f"valid: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
