"""layerwise: the depth axis of transformer language models.

Importing the package registers model_type "layerwise" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads layerwise checkpoints without trust_remote_code.
The registration runs when transformers' Auto classes are imported (at once if they already are), which is
before anyone can use them; so the command line, which imports neither torch nor transformers for `--help`,
pays for them only in the commands that need them.
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


_AUTO = "transformers.models.auto"


def _register():
    # layerwise.model registers at its bottom; when its own import is what loads the Auto classes, this
    # returns the half-imported module and the registration follows when it finishes.
    importlib.import_module(".model", __name__)


class _RegisterAfter(importlib.abc.Loader):
    """transformers' own loader for its Auto classes, then the registration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # resources, source and the rest come from transformers' loader
        return getattr(self.loader, name)


class _RegisterWithAutoClasses(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


if _AUTO in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWithAutoClasses) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithAutoClasses())
