"""Per-family adapters: where a causal LM keeps its decoder layers, final norm, head and embedding.

Diagnostics only need these handles; everything else runs through the model's own modules, so a family is
one entry here. For HF families layer i's input and output are what its module receives and returns. For
layerwise models (every residual scheme, AttnRes included) the layers are driven through the residual
scheme's own steps instead; see `layerwise.diagnose.trace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass
class DepthView:
    family: str
    layers: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module
    embed: nn.Module
    # The module of a layer whose input is the residual stream between its attention and MLP sublayers
    # (h + a); None for parallel-residual layers, where there is no such point.
    mid_residual: Callable[[nn.Module], nn.Module | None] = lambda layer: None
    # The self-attention module of a layer (with eager attention its output is (output, weights)).
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn


def _llama_like(model):
    return model.model.layers, model.model.norm, model.lm_head, model.model.embed_tokens


def _gpt2(model):
    return model.transformer.h, model.transformer.ln_f, model.lm_head, model.transformer.wte


def _neox(model):
    head = getattr(model, "embed_out", None) or model.lm_head  # renamed lm_head in transformers 5
    return model.gpt_neox.layers, model.gpt_neox.final_layer_norm, head, model.gpt_neox.embed_in


FAMILIES = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like,
    "gemma": _llama_like, "gemma2": _llama_like, "gemma3_text": _llama_like, "olmo": _llama_like,
    "olmo2": _llama_like, "phi3": _llama_like, "gpt2": _gpt2, "gpt_neox": _neox, "layerwise": _llama_like,
}
# Where the mid-layer residual enters: the pre-MLP norm (or the MLP itself when it has none).
_MID = {
    "gemma2": lambda layer: layer.pre_feedforward_layernorm,
    "gemma3_text": lambda layer: layer.pre_feedforward_layernorm,
    "olmo2": lambda layer: layer.mlp,  # OLMo 2 normalises sublayer outputs only
    "gpt2": lambda layer: layer.ln_2,
    "gpt_neox": lambda layer: None if layer.use_parallel_residual else layer.post_attention_layernorm,
    "layerwise": lambda layer: layer.mlp.hook_in,
}
_ATTENTION = {"gpt2": lambda layer: layer.attn, "gpt_neox": lambda layer: layer.attention,
              "layerwise": lambda layer: layer.attn.fn}
SUPPORTED_FAMILIES = sorted(FAMILIES)


def depth_view(model: nn.Module) -> DepthView:
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"unsupported architecture {family!r} ({type(model).__name__}); supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    mid = _MID.get(family, lambda layer: layer.post_attention_layernorm)
    attention = _ATTENTION.get(family, lambda layer: layer.self_attn)
    return DepthView(family, *FAMILIES[family](model), mid_residual=mid, attention=attention)
