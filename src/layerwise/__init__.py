"""layerwise: the depth axis of transformer language models.

Importing the package registers model_type "layerwise" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads layerwise checkpoints without trust_remote_code.
The registration runs when transformers is imported (at once if it already is): the command line, which
imports neither torch nor transformers for `--help`, pays for them only in the commands that use them.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["ModelConfig", "LayerwiseForCausalLM", "LayerwiseModel", "__version__"]

_EXPORTS = {"ModelConfig": "config", "LayerwiseForCausalLM": "model", "LayerwiseModel": "model"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


def _register():
    importlib.import_module(".model", __name__)  # registers with the Auto classes at its bottom


class _RegisterAfter(importlib.abc.Loader):
    """transformers' own loader, then the registration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # resources, source and the rest come from transformers' loader
        return getattr(self.loader, name)


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWhenTransformersLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
