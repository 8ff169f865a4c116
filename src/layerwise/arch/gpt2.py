"""GPT-2 (`GPT2LMHeadModel`) as a `LayerwiseForCausalLM` and back: the config translation and the state-dict
adapter, in the manner of torchtitan's `state_dict_adapter.py`.

A GPT-2 is the layerwise model with Pre-LN LayerNorm (with bias), biases in every projection, GPT-2's
tanh-approximated GELU (`mlp="gelu_tanh"`), learned absolute positions (`position_embedding="learned"`), a
standard residual and attention scaled by 1/sqrt(head_dim). Both models compute the same logits; what a
GPT2Config can say beyond that is either refused by name or has no effect at inference:
- dropout (`attn_pdrop`, `resid_pdrop`, `embd_pdrop`): layerwise models have none, so continued training runs
  without it;
- `reorder_and_upcast_attn`: only GPT-2's eager attention reads it, to compute the scores in float32 under
  mixed precision; the math is the same.
GPT-2's Conv1D stores its weight as (in, out); nn.Linear stores (out, in), so every projection is transposed,
and the fused `c_attn` splits into q, k and v along its outputs. The tokenizer is GPT-2's, unchanged.
"""

from __future__ import annotations

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..config import ModelConfig
from ..errors import UserError
from ..model import LayerwiseForCausalLM

# GPT2Config.activation_function -> ModelConfig.mlp. gelu_new and gelu_pytorch_tanh are the same tanh
# approximation (one in Python, one fused), equal up to rounding.
_MLP_OF_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# ModelConfig.mlp -> the name GPT-2 checkpoints use for it.
_ACTIVATION_OF_MLP = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# The ModelConfig fields a GPT-2 fixes, with the value each must have for a layerwise model to be a GPT-2.
_GPT2_FIELDS = {
    "norm": "layernorm", "norm_bias": True, "norm_placement": "pre", "residual": "standard",
    "value_residual": "none", "bias": True, "position_embedding": "learned", "qk_norm": False,
    "embedding_scale": False, "embedding_norm": False, "layernorm_scaling": False, "lm_head_bias": False,
}
# Fields both configs have under the same names.
_SHARED_FIELDS = ("vocab_size", "tie_word_embeddings")
# A layerwise model keeps its special token ids in its generation config only (ModelConfig has no such fields).
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _refuse_gpt2(field: str, value, why: str) -> None:
    raise UserError(f"GPT2Config.{field}={value!r} {why}")


def gpt2_config_to_layerwise(config: GPT2Config) -> ModelConfig:
    """The `ModelConfig` of the layerwise model that computes what `config`'s GPT-2 computes."""
    if getattr(config, "model_type", None) != "gpt2":
        raise UserError(f"expected a GPT-2 config (model_type 'gpt2'), got {getattr(config, 'model_type', None)!r}")
    if not config.scale_attn_weights:
        _refuse_gpt2("scale_attn_weights", False, "has no layerwise equivalent: layerwise attention always scales "
                     "scores by 1/sqrt(head_dim)")
    if config.scale_attn_by_inverse_layer_idx:
        _refuse_gpt2("scale_attn_by_inverse_layer_idx", True, "has no layerwise equivalent: layerwise attention "
                     "does not scale scores by 1/(layer index + 1)")
    if config.add_cross_attention:
        _refuse_gpt2("add_cross_attention", True, "has no layerwise equivalent: layerwise models are decoder-only")
    if config.activation_function not in _MLP_OF_ACTIVATION:
        _refuse_gpt2("activation_function", config.activation_function,
                     f"has no layerwise MLP; supported: {', '.join(_MLP_OF_ACTIVATION)}")
    return ModelConfig(
        **{field: getattr(config, field) for field in _SHARED_FIELDS},
        d_model=config.n_embd, n_layers=config.n_layer, n_heads=config.n_head, max_seq_len=config.n_positions,
        d_ff=config.n_inner or 4 * config.n_embd, mlp=_MLP_OF_ACTIVATION[config.activation_function],
        norm_eps=config.layer_norm_epsilon, init_std=config.initializer_range,
        scaled_init=True,  # GPT-2 draws its residual-output projections with std / sqrt(2 L), as scaled init does
        **_GPT2_FIELDS,
    )


def layerwise_config_to_gpt2(config: ModelConfig, token_ids: dict[str, int | None] | None = None) -> GPT2Config:
    """The `GPT2Config` of the GPT-2 that computes what `config`'s layerwise model computes, with the special
    `token_ids` (bos/eos/pad, from the model's generation config); a `UserError` names the first field a GPT-2
    cannot express."""
    def refuse(field: str, required: str) -> None:
        raise UserError(f"ModelConfig.{field}={getattr(config, field)!r} cannot be saved as GPT-2, which needs "
                        f"{required}; keep it as a layerwise model (save_pretrained) instead")

    for field, required in _GPT2_FIELDS.items():
        if getattr(config, field) != required:
            refuse(field, f"{field}={required!r}")
    if config.mlp not in _ACTIVATION_OF_MLP:
        refuse("mlp", f"mlp in {', '.join(map(repr, _ACTIVATION_OF_MLP))}")
    if config.n_kv_heads != config.n_heads:
        refuse("n_kv_heads", f"n_kv_heads == n_heads={config.n_heads} (no grouped-query attention)")
    if config.head_dim * config.n_heads != config.d_model:
        refuse("head_dim", f"head_dim == d_model // n_heads = {config.d_model // config.n_heads}")
    if config.layer_order is not None:
        refuse("layer_order", "one set of weights per layer (materialise the layer program: no ':tie')")
    return GPT2Config(
        **{field: getattr(config, field) for field in _SHARED_FIELDS},
        n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads, n_positions=config.max_seq_len,
        n_inner=None if config.d_ff == 4 * config.d_model else config.d_ff,
        activation_function=_ACTIVATION_OF_MLP[config.mlp], layer_norm_epsilon=config.norm_eps,
        initializer_range=config.init_std, **(token_ids or {}),
        # The layerwise model had no dropout; the GPT-2 trains on as it did.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _layer_keys(i: int) -> list[tuple[str, str]]:
    """(GPT-2 key, layerwise key) of layer i's norms, which need no reshaping."""
    g, lw = f"transformer.h.{i}.", f"model.layers.{i}."
    return [(f"{g}{norm}.{p}", f"{lw}{sublayer}.norm_in.{p}")
            for norm, sublayer in (("ln_1", "attn"), ("ln_2", "mlp")) for p in ("weight", "bias")]


# GPT-2 Conv1D (in, out) -> layerwise nn.Linear (out, in), by their paths inside layer i.
_PROJECTIONS = (("attn.c_proj", "attn.fn.o_proj"), ("mlp.c_fc", "mlp.fn.fc"), ("mlp.c_proj", "mlp.fn.proj"))
_TOP_KEYS = (("transformer.wte.weight", "model.embed_tokens.weight"),
             ("transformer.wpe.weight", "model.position_embedding.weight"),
             ("transformer.ln_f.weight", "model.norm.weight"), ("transformer.ln_f.bias", "model.norm.bias"))


def gpt2_state_dict_to_layerwise(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """GPT-2's state dict under layerwise names and layouts (a tied head may be absent from `state`). The
    tensors may be views of `state`'s: `load_state_dict` copies them."""
    out = {lw: state[g] for g, lw in _TOP_KEYS}
    for i in range(n_layers):
        g, lw = f"transformer.h.{i}.", f"model.layers.{i}.attn.fn."
        out.update({lwk: state[gk] for gk, lwk in _layer_keys(i)})
        qkv_weight = state[f"{g}attn.c_attn.weight"].t()  # (3d, d): q, k, v stacked along the outputs
        qkv_bias = state[f"{g}attn.c_attn.bias"]
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), qkv_weight.chunk(3), qkv_bias.chunk(3)):
            out[f"{lw}{name}.weight"], out[f"{lw}{name}.bias"] = weight, bias
        for gpath, lwpath in _PROJECTIONS:
            out[f"model.layers.{i}.{lwpath}.weight"] = state[f"{g}{gpath}.weight"].t().contiguous()
            out[f"model.layers.{i}.{lwpath}.bias"] = state[f"{g}{gpath}.bias"]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def layerwise_state_dict_to_gpt2(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """A layerwise GPT-2's state dict under GPT-2 names and Conv1D layouts; the inverse of
    `gpt2_state_dict_to_layerwise`."""
    out = {g: state[lw] for g, lw in _TOP_KEYS}
    for i in range(n_layers):
        g, lw = f"transformer.h.{i}.", f"model.layers.{i}.attn.fn."
        out.update({gk: state[lwk] for gk, lwk in _layer_keys(i)})
        names = ("q_proj", "k_proj", "v_proj")
        out[f"{g}attn.c_attn.weight"] = torch.cat([state[f"{lw}{n}.weight"] for n in names]).t().contiguous()
        out[f"{g}attn.c_attn.bias"] = torch.cat([state[f"{lw}{n}.bias"] for n in names])
        for gpath, lwpath in _PROJECTIONS:
            out[f"{g}{gpath}.weight"] = state[f"model.layers.{i}.{lwpath}.weight"].t().contiguous()
            out[f"{g}{gpath}.bias"] = state[f"model.layers.{i}.{lwpath}.bias"]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _like(target: torch.nn.Module, source: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`target` with `state` loaded, on `source`'s device and dtype, in its train/eval mode, generating as it did."""
    parameter = next(source.parameters())
    target.to(device=parameter.device, dtype=parameter.dtype)
    target.load_state_dict(state, strict=True)
    if target.config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = copy.deepcopy(source.generation_config)
    return target.train(source.training)


@torch.no_grad()
def gpt2_to_layerwise(model: GPT2LMHeadModel) -> LayerwiseForCausalLM:
    """A `LayerwiseForCausalLM` computing `model`'s logits (float64: 1e-10 relative), with its own copy of the
    weights. Refuses (UserError naming the field) a GPT-2 whose config layerwise cannot express."""
    if not isinstance(model, GPT2LMHeadModel):
        raise UserError(f"gpt2_to_layerwise needs a GPT2LMHeadModel, got {type(model).__name__}")
    config = gpt2_config_to_layerwise(model.config)
    state = gpt2_state_dict_to_layerwise(model.state_dict(), config.n_layers)
    return _like(LayerwiseForCausalLM(config), model, state)


@torch.no_grad()
def layerwise_to_gpt2(model: LayerwiseForCausalLM) -> GPT2LMHeadModel:
    """The `GPT2LMHeadModel` computing `model`'s logits; its state dict is bit-identical to the GPT-2 a model
    came from. Refuses (UserError naming the field) a layerwise model that is not a GPT-2."""
    if not isinstance(model, LayerwiseForCausalLM):
        raise UserError(f"layerwise_to_gpt2 needs a LayerwiseForCausalLM, got {type(model).__name__}")
    config = layerwise_config_to_gpt2(model.config,
                                      {k: getattr(model.generation_config, k, None) for k in _TOKEN_IDS})
    state = layerwise_state_dict_to_gpt2(model.state_dict(), config.n_layer)
    return _like(GPT2LMHeadModel(config), model, state)
