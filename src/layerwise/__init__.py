"""layerwise: the depth axis of transformer language models.

Importing the package registers model_type "layerwise" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` loads layerwise checkpoints without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import ModelConfig
from .model import LayerwiseForCausalLM, LayerwiseModel

AutoConfig.register(ModelConfig.model_type, ModelConfig, exist_ok=True)
AutoModel.register(ModelConfig, LayerwiseModel, exist_ok=True)
AutoModelForCausalLM.register(ModelConfig, LayerwiseForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "LayerwiseForCausalLM", "LayerwiseModel", "__version__"]
