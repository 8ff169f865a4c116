"""Llama-family Hugging Face models as layerwise models and back (torchtitan's `state_dict_adapter`).

Llama (SmolLM2 is one), Mistral, Qwen2 and Qwen3 are all a layerwise Pre-RMSNorm SwiGLU model with rotate-half
RoPE and GQA; they differ only in which projections carry biases, QK-norm and sliding windows. A conversion is
two tables: the config fields (`layerwise_config` / `hf_config`) and the state-dict keys (`from_hf` / `to_hf`,
pure renames, so tensors are shared and a round trip is bit-identical). Whatever one side computes and the other
cannot is refused, naming the field, instead of converting into a model with other logits.

Precision: layerwise's RMSNorm is HF's LlamaRMSNorm (mean of squares in float32, normalised, cast back, then
times the gain) and RoPE tables are float32 on both sides, so float32 logits agree to rounding. HF casts the
norm's input to float32 even in a float64 model, where layerwise keeps float64: float64 logits agree to float32
rounding of the norms (about 1e-7), not to 1e-15.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..config import ModelConfig, layer_origin_of
from ..errors import UserError
from ..model import LayerwiseForCausalLM

LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# GPT-2 has its own adapter (`layerwise.arch.gpt2`), written separately; conversions dispatch to it.
GPT2_FAMILY = "gpt2"

# HF key inside layer i -> layerwise key inside layer i. Norms feed a sublayer ("attn"/"mlp" .norm_in); the
# sublayer's math is its `.fn`.
_LAYER_KEYS = {
    "input_layernorm.weight": "attn.norm_in.weight",
    "post_attention_layernorm.weight": "mlp.norm_in.weight",
    **{f"self_attn.{p}.{t}": f"attn.fn.{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
       for t in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn.fn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.fn.k_norm.weight",
    **{f"mlp.{p}.{t}": f"mlp.fn.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
}
_TOP_KEYS = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _rename(state_dict: dict[str, torch.Tensor], table: dict[str, str], side: str) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        match = _LAYER_KEY.fullmatch(key)
        if match and match.group(2) in table:
            renamed[f"model.layers.{match.group(1)}.{table[match.group(2)]}"] = tensor
        elif key in _TOP_KEYS:
            renamed[key] = tensor
        else:
            raise UserError(f"state-dict key {key!r} of the {side} model has no counterpart; "
                            "only Llama-family keys convert")
    return renamed


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Llama-family HF state dict under layerwise names (same tensors)."""
    return _rename(state_dict, _LAYER_KEYS, "Hugging Face")


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layerwise state dict under Llama-family HF names (same tensors)."""
    return _rename(state_dict, {v: k for k, v in _LAYER_KEYS.items()}, "layerwise")


# ---- configs --------------------------------------------------------------------------------------------------

def _hf_biases(config, family: str) -> dict[str, bool]:
    """layerwise's bias fields for the HF config, refusing bias layouts that layerwise cannot express."""
    if family == "qwen2":  # q, k and v always carry biases, o and the MLP never
        return dict(bias=False, qkv_bias=True)
    if family == "mistral":
        return dict(bias=False, qkv_bias=False)
    attention = bool(getattr(config, "attention_bias", False))
    mlp = bool(getattr(config, "mlp_bias", False)) if family == "llama" else False
    if attention != mlp:
        raise UserError(f"cannot convert {family} with attention_bias={attention}, mlp_bias={mlp}: layerwise's "
                        "`bias` puts biases on all attention and MLP projections or on none")
    return dict(bias=attention, qkv_bias=False)


def sequence_budget(config) -> tuple[int, str | None]:
    """(max_seq_len, why it is below max_position_embeddings or None) for an HF Llama-family config.

    A sliding window of W tokens lets query q see keys k with q - k < W, so on sequences of at most W tokens
    it hides nothing and full causal attention is exact: the layerwise model gets at most W positions."""
    budget = config.max_position_embeddings
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    slides = window is not None and (config.model_type == "mistral" or "sliding_attention" in layer_types)
    if slides and window < budget:
        return window, (f"{config.model_type} slides a {window}-token attention window; the layerwise model "
                        f"attends to all earlier tokens, which is the same on up to {window} tokens, so its "
                        f"max_seq_len is {window} instead of max_position_embeddings={budget}")
    return budget, None


def layerwise_config(config, **overrides) -> ModelConfig:
    """The ModelConfig computing what the HF Llama-family `config` computes; UserError naming what differs.
    `overrides` replace fields of the result (e.g. `layernorm_scaling=True`), which then computes otherwise."""
    family = config.model_type
    if family not in LLAMA_FAMILIES:
        raise UserError(f"cannot convert model_type={family!r} to layerwise; supported: "
                        f"{', '.join((*LLAMA_FAMILIES, GPT2_FAMILY))}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"cannot convert {family} with rope_parameters.rope_type={rope_type!r}: layerwise has plain "
                        "RoPE only (rope_type 'default'), so its positions would differ")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"cannot convert {family} with partial_rotary_factor={rope['partial_rotary_factor']}: "
                        "layerwise rotates the whole head")
    if config.hidden_act != "silu":
        raise UserError(f"cannot convert {family} with hidden_act={config.hidden_act!r}: layerwise's SwiGLU uses silu")
    if getattr(config, "attention_dropout", 0.0):
        raise UserError(f"cannot convert {family} with attention_dropout={config.attention_dropout}: layerwise has "
                        "no attention dropout, so continued training would differ")
    max_seq_len, _ = sequence_budget(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields = dict(
        vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim, d_ff=config.intermediate_size, max_seq_len=max_seq_len, mlp="swiglu",
        **_hf_biases(config, family), qk_norm=family == "qwen3", rope_theta=float(rope.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(config.tie_word_embeddings), init_std=config.initializer_range,
        norm="rmsnorm", norm_eps=config.rms_norm_eps, norm_placement="pre", residual="standard",
        layerwise_hf_family=family,
    )
    return ModelConfig(**{**fields, **overrides})


_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# What a Llama-family model is; each entry (field, value it must have, why) names what to-hf would lose.
_LLAMA_SHAPE = (
    ("norm", "rmsnorm", "its norms are RMSNorm"),
    ("norm_placement", "pre", "it normalises sublayer inputs only (Pre-LN)"),
    ("residual", "standard", "its residual stream is a plain sum"),
    ("value_residual", "none", "its attention reads its own values only"),
    ("mlp", "swiglu", "its MLP is SwiGLU"),
    ("layernorm_scaling", False, "its norms are not scaled by depth"),
    ("embedding_scale", False, "its embedding is not rescaled"),
    ("embedding_norm", False, "it has no embedding norm"),
    ("position_embedding", "rope", "its positions are rotary"),
    ("lm_head_bias", False, "its head has no bias"),
    ("heterogeneous_gains", False, "its projections share their norm's gain"),
)


def _refuse(family: str, field: str, value, why: str) -> None:
    raise UserError(f"cannot write ModelConfig.{field}={value!r} as {family}: {why}")


def hf_config(config: ModelConfig, family: str, tokens=None):
    """The HF config of `family` computing what the layerwise `config` computes; UserError naming the field
    the family cannot express. Special token ids come from `tokens` (a generation config: layerwise keeps them
    there, not in its model config)."""
    import transformers

    if family not in LLAMA_FAMILIES:
        raise UserError(f"cannot write a layerwise model as {family!r}; families: "
                        f"{', '.join((*LLAMA_FAMILIES, GPT2_FAMILY))}")
    for field, value, why in _LLAMA_SHAPE:
        if getattr(config, field, value) != value:
            _refuse(family, field, getattr(config, field), f"{family} needs {field}={value!r} ({why})")
    if config.layer_order is not None:
        _refuse(family, "layer_order", config.layer_order, f"{family} configs cannot say that layers share weights; "
                "materialise the program (a `layers=` step without `:tie`) first")
    if config.qk_norm != (family == "qwen3"):
        _refuse(family, "qk_norm", config.qk_norm, "qwen3 always normalises queries and keys; use llama"
                if family == "qwen3" else f"{family} never normalises queries and keys; use qwen3")
    fields = {}
    if family == "qwen2":
        if not config.qkv_bias:
            _refuse(family, "qkv_bias", False, "qwen2 always has biases on q, k and v; use llama or mistral")
        if config.bias:
            _refuse(family, "bias", True, "qwen2 has no biases on o or the MLP; use llama")
    elif config.qkv_bias:
        _refuse(family, "qkv_bias", True, f"{family} cannot put biases on q, k and v alone; use qwen2")
    elif family == "mistral" and config.bias:
        _refuse(family, "bias", True, "mistral has no biases")
    elif family == "llama":
        fields.update(attention_bias=config.bias, mlp_bias=config.bias)
    elif family == "qwen3" and config.bias:
        _refuse(family, "bias", True, "qwen3's attention_bias leaves its MLP without biases")
    if family in ("mistral", "qwen2", "qwen3"):
        fields.update(sliding_window=None)  # layerwise attends to every earlier token
    if family in ("qwen2", "qwen3"):
        fields.update(use_sliding_window=False)
    return transformers.AutoConfig.for_model(
        family, vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        intermediate_size=config.d_ff, max_position_embeddings=config.max_seq_len, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps, **{key: getattr(tokens, key, None) for key in _TOKEN_IDS}, **fields,
    )


# ---- whole models ---------------------------------------------------------------------------------------------


def hf_to_layerwise(model: nn.Module, **overrides) -> LayerwiseForCausalLM:
    """A `LayerwiseForCausalLM` with the logits of the HF Llama-family (or GPT-2) `model`, in its dtype; the
    config records the family in `layerwise_hf_family`. Its tensors are copies, so the two models train apart.

    `overrides` set layerwise fields the family lacks, for continued training from pretrained weights: e.g.
    `residual="block_attnres"` (its pseudo-queries start at zero, so each depth mixer starts as the mean of its
    sources) or `layernorm_scaling=True`. Tensors the overrides add start at their init; the result computes a
    different function (a UserWarning says so), and a field that would reshape or remove a pretrained tensor is
    refused.
    """
    family = getattr(model.config, "model_type", None)
    if family == GPT2_FAMILY:
        if overrides:
            raise UserError("field overrides are not available when converting gpt2; convert, then change the model")
        converted = _gpt2_adapter(family).gpt2_to_layerwise(model)
        converted.config.layerwise_hf_family = family
        converted.config.layer_origin = layer_origin_of(model.config)
        return converted
    config = layerwise_config(model.config, **overrides)
    _, narrowed = sequence_budget(model.config)
    if narrowed:
        warnings.warn(narrowed, UserWarning, stacklevel=2)
    # Before the model is built: LayerNorm Scaling scales each layer by its origin index.
    config.layer_origin = layer_origin_of(model.config)
    weights = from_hf(model.state_dict())
    if not overrides:
        return _built(LayerwiseForCausalLM, config, weights, model)
    converted = _built(LayerwiseForCausalLM, config, weights, model, added_by=overrides)
    warnings.warn(f"converted {family} with {_written(overrides)}: the layerwise model computes a different "
                  "function from the pretrained one until it is trained", UserWarning, stacklevel=2)
    return converted


def layerwise_to_hf(model: LayerwiseForCausalLM, family: str | None = None) -> nn.Module:
    """The HF model of `family` (default: the family the model was converted from, else llama) with the logits
    of the layerwise `model`; UserError naming the config field the family cannot express."""
    import transformers

    family = family or model.config.layerwise_hf_family or "llama"
    if family == GPT2_FAMILY:
        converted = _gpt2_adapter(family).layerwise_to_gpt2(model)
        if model.config.layer_origin is not None:
            converted.config.layer_origin = list(model.config.layer_origin)
        return converted
    config = hf_config(model.config, family, model.generation_config)
    if model.config.layer_origin is not None:
        config.layer_origin = list(model.config.layer_origin)
    weights = to_hf(model.state_dict())
    return _built(transformers.AutoModelForCausalLM.from_config, config, weights, model)


def _built(build, config, weights: dict[str, torch.Tensor], source: nn.Module, added_by: dict | None = None):
    """`build(config)` holding copies of `weights`, in the source's dtype and mode, with its generation config.
    With `added_by` (field overrides), tensors the built model has beyond `weights` keep their init."""
    if added_by:
        model = build(config)
    else:
        # Every tensor is overwritten, so drawing an init first would only cost time (2.5 s for SmolLM2-135M).
        with no_init_weights():
            model = build(config)
        model.tie_weights()  # skipped with the init; a tied head must share the embedding again
    model = model.to(next(source.parameters()).dtype)
    expected = model.state_dict()
    reshaped = [key for key in weights if key in expected and expected[key].shape != weights[key].shape]
    dropped = [key for key in weights if key not in expected]
    if added_by and (reshaped or dropped):
        raise UserError(f"{_written(added_by)} would {'reshape' if reshaped else 'drop'} the pretrained "
                        f"{(reshaped or dropped)[0]}; override only fields that add tensors or change no shape")
    model.load_state_dict(weights, strict=not added_by)
    model.generation_config = copy.deepcopy(source.generation_config)
    return model.train(source.training)


def _written(overrides: dict) -> str:
    return ", ".join(f"{field}={value!r}" for field, value in overrides.items())


def _gpt2_adapter(family: str):
    try:
        return importlib.import_module(f"{__package__}.gpt2")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.gpt2":
            raise
        raise UserError(f"converting {family} is not available in this layerwise: its adapter "
                        "(layerwise.arch.gpt2) is missing; supported: " + ", ".join(LLAMA_FAMILIES)) from None
