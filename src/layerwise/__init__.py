"""layerwise: the depth axis of transformer language models.

Importing the package registers model_type "layerwise" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads layerwise checkpoints without trust_remote_code.
"""

from .config import ModelConfig
from .model import LayerwiseForCausalLM, LayerwiseModel

__version__ = "0.1.0"
__all__ = ["ModelConfig", "LayerwiseForCausalLM", "LayerwiseModel", "__version__"]
