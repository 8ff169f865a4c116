"""Per-family adapters: where a causal LM keeps its embedding, layers, norms, linears and head.

Each family is one declaration (in the spirit of TransformerLens's `component_mapping` and torchtitan's
`state_dict_adapter`): module paths for the embedding, the layer list, the final norm and the head, and per
layer every norm with its role and what reads its output, plus the layer's linears grouped by sublayer.
`model_map(model)` resolves a declaration against a model into a `ModelMap`, which is what norm folding,
Pre-LN -> RMSNorm conversion and per-layer quantization need; `depth_view(model)` is the smaller view the
diagnostics use. No code outside `layerwise.arch` should know a family's module names.

For HF families layer i's input and output are what its module receives and returns. For layerwise models
(every residual scheme, AttnRes included) the layers are driven through the residual scheme's own steps
instead; see `layerwise.diagnose.trace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserError
from .layerwise import layerwise_depth_view, layerwise_model_map
from .maps import LINEAR_GROUPS, DepthView, LayerMap, ModelMap, NormSite


@dataclass(frozen=True)
class Norm:
    """A norm in a family declaration: its role, its path inside a layer, and what it feeds (a linear group
    whose modules read it, or one of FEEDS other than "linears")."""

    role: str
    path: str
    feeds: str


@dataclass(frozen=True)
class Family:
    """A declarative adapter for one HF family: module paths from the model (top level) or from a layer."""

    embed: str
    layers: str
    final_norm: str
    heads: tuple[str, ...]  # the first path the model has is the head (GPT-NeoX renamed embed_out to lm_head)
    norms: tuple[Norm, ...]
    linears: dict[str, tuple[str, ...]]
    attention: str = "self_attn"
    mid_residual: str | None = "post_attention_layernorm"
    gain_offset: float = 0.0
    # Layers whose attention and MLP both read the layer input (GPT-NeoX's use_parallel_residual) have no
    # mid-layer residual.
    parallel: Callable[[nn.Module], bool] = lambda layer: False

    def mid_residual_of(self, layer: nn.Module) -> nn.Module | None:
        if self.mid_residual is None or self.parallel(layer):
            return None
        return layer.get_submodule(self.mid_residual)

    def model_map(self, name: str, model: nn.Module) -> ModelMap:
        embed, head = model.get_submodule(self.embed), _first_submodule(model, self.heads)
        layers = tuple(self._layer_map(i, layer) for i, layer in enumerate(model.get_submodule(self.layers)))
        final = NormSite("final", model.get_submodule(self.final_norm), "linears", (head,),
                         gain_offset=self.gain_offset)
        return ModelMap(name, embed, layers, final, head)

    def _layer_map(self, i: int, layer: nn.Module) -> LayerMap:
        linears = {group: tuple(layer.get_submodule(p) for p in self.linears.get(group, ())) for group in LINEAR_GROUPS}
        norms = tuple(
            NormSite(n.role, layer.get_submodule(n.path), "linears" if n.feeds in linears else n.feeds,
                     linears.get(n.feeds, ()), gain_offset=self.gain_offset)
            for n in self.norms
        )
        return LayerMap(i, layer, norms, linears, layer.get_submodule(self.attention), self.mid_residual_of(layer))


def _first_submodule(model: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"{type(model).__name__} has none of {', '.join(paths)}")


_LLAMA_LINEARS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": ("mlp.down_proj",),
}
_PRE_NORMS = (Norm("attn_in", "input_layernorm", "attn_in"), Norm("mlp_in", "post_attention_layernorm", "mlp_in"))
_QK_NORMS = (Norm("q_norm", "self_attn.q_norm", "scores"), Norm("k_norm", "self_attn.k_norm", "scores"))
# Gemma 2/3 sandwich each sublayer: a pre norm on its input and a post norm on its output before the add.
_SANDWICH_NORMS = (
    Norm("attn_in", "input_layernorm", "attn_in"), Norm("attn_out", "post_attention_layernorm", "residual"),
    Norm("mlp_in", "pre_feedforward_layernorm", "mlp_in"), Norm("mlp_out", "post_feedforward_layernorm", "residual"),
)
_LLAMA_TOP = dict(embed="model.embed_tokens", layers="model.layers", final_norm="model.norm", heads=("lm_head",))


def _llama_like(norms=_PRE_NORMS, **overrides) -> Family:
    return Family(**{**_LLAMA_TOP, "norms": norms, "linears": _LLAMA_LINEARS, **overrides})


FAMILIES: dict[str, Family] = {
    "llama": _llama_like(), "mistral": _llama_like(), "qwen2": _llama_like(), "olmo": _llama_like(),
    "qwen3": _llama_like(_PRE_NORMS + _QK_NORMS),
    "gemma": _llama_like(gain_offset=1.0),
    "gemma2": _llama_like(_SANDWICH_NORMS, mid_residual="pre_feedforward_layernorm", gain_offset=1.0),
    "gemma3_text": _llama_like(_SANDWICH_NORMS + _QK_NORMS, mid_residual="pre_feedforward_layernorm",
                               gain_offset=1.0),
    # OLMo 2 normalises sublayer outputs only (and q/k over the full width); the MLP's input is the mid residual.
    "olmo2": _llama_like((Norm("attn_out", "post_attention_layernorm", "residual"),
                          Norm("mlp_out", "post_feedforward_layernorm", "residual")) + _QK_NORMS,
                         mid_residual="mlp"),
    "phi3": _llama_like(linears={"attn_in": ("self_attn.qkv_proj",), "attn_out": ("self_attn.o_proj",),
                                 "mlp_in": ("mlp.gate_up_proj",), "mlp_out": ("mlp.down_proj",)}),
    "gpt2": Family(
        embed="transformer.wte", layers="transformer.h", final_norm="transformer.ln_f", heads=("lm_head",),
        norms=(Norm("attn_in", "ln_1", "attn_in"), Norm("mlp_in", "ln_2", "mlp_in")),
        linears={"attn_in": ("attn.c_attn",), "attn_out": ("attn.c_proj",), "mlp_in": ("mlp.c_fc",),
                 "mlp_out": ("mlp.c_proj",)},
        attention="attn", mid_residual="ln_2",
    ),
    "gpt_neox": Family(
        embed="gpt_neox.embed_in", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
        heads=("embed_out", "lm_head"), norms=_PRE_NORMS,
        linears={"attn_in": ("attention.query_key_value",), "attn_out": ("attention.dense",),
                 "mlp_in": ("mlp.dense_h_to_4h",), "mlp_out": ("mlp.dense_4h_to_h",)},
        attention="attention", parallel=lambda layer: layer.use_parallel_residual,
    ),
}
SUPPORTED_FAMILIES = sorted([*FAMILIES, "layerwise"])


def _family(model: nn.Module) -> str:
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"unsupported architecture {family!r} ({type(model).__name__}); supported: "
                        f"{', '.join(SUPPORTED_FAMILIES)}")
    return family


def model_map(model: nn.Module) -> ModelMap:
    """Every norm, what reads it, every linear by sublayer, the final norm and the head of `model`."""
    family = _family(model)
    if family == "layerwise":
        return layerwise_model_map(model)
    return FAMILIES[family].model_map(family, model)


def depth_view(model: nn.Module) -> DepthView:
    """The handles the diagnostics use. Its callables take a layer module, so they keep working on layers
    that replace the originals (a pruned or skipped layer)."""
    family = _family(model)
    if family == "layerwise":
        return layerwise_depth_view(model)
    spec = FAMILIES[family]
    return DepthView(family, model.get_submodule(spec.layers), model.get_submodule(spec.final_norm),
                     _first_submodule(model, spec.heads), model.get_submodule(spec.embed),
                     mid_residual=spec.mid_residual_of, attention=lambda layer: layer.get_submodule(spec.attention),
                     logit_softcap=getattr(model.config, "final_logit_softcapping", None))
