"""`ModelConfig`: one Hugging Face config that names every depth variant.

Every architectural choice is a named option (`norm`, `norm_placement`, `residual`, `value_residual`, `mlp`)
looked up in a registry, so a new variant is one registered class. Invalid configs fail at construction
with a `ValueError` that names the field, the value and what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig
from transformers.generation import GenerationConfig

from .errors import UserError

# The version of the fields below as written to config.json; bump it when their meaning changes.
CONFIG_VERSION = 1

# Keys that transformers itself writes to or passes through config.json; everything else must be a field.
_TRANSFORMERS_KEYS = {
    "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
    "experts_implementation", "per_layer_config", "use_cache", "num_labels", "_from_auto", "_from_pipeline",
    "model_type",
}


class ModelConfig(PreTrainedConfig):
    """Configuration of a `LayerwiseForCausalLM`. Build one with `ModelConfig.from_preset(name, size)`,
    `ModelConfig.from_yaml(path)` or `ModelConfig(**fields)`."""

    model_type = "layerwise"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "initializer_range": "init_std",
    }

    layerwise_version: int = CONFIG_VERSION
    preset: str | None = None  # informational: the preset this config was built from

    # Shape
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: equal to n_heads (no GQA)
    head_dim: int | None = None  # None: d_model // n_heads (Qwen3 and CRMSNorm models set it apart from d_model)
    d_ff: int | None = None  # None: 4 d for gelu, the LLaMA 8/3 d rounded up to 64 for swiglu
    max_seq_len: int = 1024
    mlp: str = "swiglu"  # swiglu | gelu | gelu_tanh
    bias: bool = False  # biases in attention and MLP projections
    qkv_bias: bool = False  # biases in the query, key and value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys
    position_embedding: str = "rope"  # rope | learned (GPT-2's absolute table added to the token embedding)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False  # a bias on the head (Pre-LN -> Pre-RMSNorm folds the final LayerNorm's beta there)
    embedding_scale: bool = False  # a learnable scalar times the embedding, init sqrt(d) (DyT's LLaMA recipe)

    # Init
    init_std: float = 0.02
    scaled_init: bool = False  # GPT-2 / Megatron: output projections use init_std / sqrt(2 L)

    # Normalization
    # layernorm | rmsnorm | ssrmsnorm | crmsnorm | dyt | bhyt | seednorm | prepbn | un | powernorm | frozen | fakeln |
    # identity (no norm: what fold-prepbn leaves)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_bias: bool = True  # beta in layernorm / dyt / frozen
    # IWD (Wang et al.): "input" decays the gains of the norms a linear reads (pre-sublayer and final), never
    # those after a sublayer, on the embedding or on Q/K; "none": no norm gain is decayed (unless decay_all).
    norm_gain_decay: str = "none"  # none | input
    # HG (Wang et al.): each linear that reads a pre-sublayer RMSNorm (q, k, v; gate, up) has its own gain
    # instead of sharing the norm's.
    heterogeneous_gains: bool = False
    norm_placement: str = "pre"  # pre | post | peri | mixln | deepnorm
    embedding_norm: bool = False  # Peri-LN's optional norm on the embedding output
    mixln_ratio: float = 0.25  # Mix-LN: the first floor(ratio * L) layers are Post-LN
    layernorm_scaling: bool = False  # LNS: scale pre-sublayer norm outputs of layer i by 1/sqrt(i+1)
    dyt_alpha_attn: float = 0.5
    dyt_alpha_mlp: float = 0.5
    dyt_alpha_final: float = 0.5
    bhyt_kappa: float = 10.0
    bhyt_lambda_attn: float = 2.0
    bhyt_lambda_mlp: float = 1.0
    bhyt_lambda_final: float = 0.0  # 0: the final norm is a plain RMSNorm, as in the paper's configs
    bhyt_exact: bool = False  # BHyT*: exact RMS at both norms instead of the parallel approximation
    bhyt_var_approx: str = "baseline"  # parallel form's MLP-input variance: baseline | beta | eta | residual_aware
    bhyt_var_approx_exact_layers: int = 0  # the first k layers (by origin) use the exact MLP-input variance
    seednorm_heads: int = 1
    seednorm_alpha: float = 1.0
    frozen_norm_sigma: float = 1.0
    fakeln_momentum: float = 0.9  # fakeln: EMA momentum of the tracked per-token std
    fakeln_eot_token_id: int | None = None  # fakeln: end-of-text tokens on the value path use the first position's std
    # prepbn: the LN -> RepBN decay length T_total and the pure-LN period before it, each a fraction of the run if
    # < 1 else a step count; 0.16 is the DeiT recipe's 60,000 of its ~375k steps.
    prepbn_decay_steps: float = 0.16
    prepbn_warmup_steps: float = 0.0
    # un / powernorm: steps normalised by the batch statistic before the window / running one takes over; a
    # fraction of the run if < 1, else a step count (the released defaults)
    un_warmup_steps: float = 4000
    powernorm_warmup_steps: float = 10000

    # Residual scheme
    residual: str = "standard"  # standard | full_attnres | block_attnres | delta_attnres | delta_block_attnres
    attnres_blocks: int = 8  # block_attnres: blocks of sublayers; delta_block_attnres: blocks of layers
    delta_gate: str = "none"  # delta_*: g in u = h + g * mix: none | sigmoid_scalar | sigmoid_vector | learnable_alpha
    delta_null_source: bool = False  # delta_*: a learnable source, zero at init, before each sublayer's sources
    delta_entropy_bonus: float = 0.0  # delta_*: lambda_H; the training loss subtracts lambda_H * mean depth entropy
    delta_block_sources: str = "deltas"  # delta_block_attnres: deltas | released (the code's alternating sums)

    # Value residual
    value_residual: str = "none"  # none | resformer | satformer
    value_residual_gate: str = "relu"  # satformer gate: relu | sigmoid | softmax | softmax_sigmoid | tanh | identity
    value_residual_last_k: int | None = None  # only the last k layers read layer 0's values

    # Legacy provenance (configs written before layer programs): the 0-based indices, in the original model, of
    # the layers deleted from this one. Still read: at construction it becomes `layer_origin` when that is unset.
    layerwise_dropped_layers: list[int] | None = None
    # Layer programs (`layerwise.transform`, steps `layers=` and `drop=`). `n_layers` counts execution positions:
    # it sizes the KV cache (one slot per position), the AttnRes mixers and the value-residual parameters.
    # `layer_order[p]` is the stored layer that position p runs (None: position p runs stored layer p). The
    # stored layers are 0..max(layer_order), each run at least once; a layer run at several positions is one
    # set of weights (tied), held once in the state dict. `layer_origin[p]` is the index, in the original
    # model, of the layer position p runs (None: never reshaped). LayerNorm Scaling scales a layer by its
    # origin index (its stored index when never reshaped), so a program never changes what a layer computes.
    layer_order: list[int] | None = None
    layer_origin: list[int] | None = None
    # Provenance, written by `layerwise.transform.apply`: the steps applied, in order, and the model they read.
    layerwise_transforms: list[str] | None = None
    layerwise_source: str | None = None
    # The Hugging Face family (model_type) a `to-layerwise` conversion read, which `to-hf` writes back by default.
    layerwise_hf_family: str | None = None
    # Set by the `quantize` step: backend, group size and each stored layer's width (docs/quantization.md).
    layerwise_quantization: dict | None = None

    def __post_init__(self, **kwargs):
        if kwargs.pop("model_type", self.model_type) != self.model_type:
            raise ValueError(f"config has model_type={kwargs.get('model_type')!r}, not {self.model_type!r}")
        unknown = sorted(k for k in kwargs if k not in _TRANSFORMERS_KEYS and k not in _generation_keys())
        if unknown:
            raise ValueError(
                f"ModelConfig got unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(field_names())}"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.n_heads, int) and self.n_heads:
            self.head_dim = self.d_model // self.n_heads if self.d_model % self.n_heads == 0 else None
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.mlp)
        if self.layer_origin is None and self.layerwise_dropped_layers and isinstance(self.n_layers, int):
            dropped = set(self.layerwise_dropped_layers)
            self.layer_origin = [i for i in range(self.n_layers + len(dropped)) if i not in dropped]
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field. Called at construction."""
        from .validation import validate_config

        validate_config(self)
        if self.layerwise_dropped_layers or (self.layer_origin is not None
                                             and list(self.layer_origin) != list(range(len(self.layer_origin)))):
            check_rebuildable_after_reshaping(self)

    # ---- layer programs -------------------------------------------------------------------------------------

    @property
    def execution_order(self) -> list[int]:
        """For each execution position, the stored layer it runs (`layer_order`, or 0..n_layers-1)."""
        return list(self.layer_order) if self.layer_order is not None else list(range(self.n_layers))

    @property
    def n_stored_layers(self) -> int:
        """How many distinct layers hold weights: fewer than `n_layers` when a layer runs at several positions."""
        return max(self.layer_order) + 1 if self.layer_order is not None else self.n_layers

    def first_position(self, stored: int) -> int:
        """The first execution position that runs stored layer `stored`."""
        return self.execution_order.index(stored)

    def depth_index(self, stored: int) -> int:
        """The index LayerNorm Scaling reads for stored layer `stored`: its index in the original model (the
        origin of a position that runs it), else its stored index. A program that drops, repeats or reorders
        layers therefore leaves each layer's scale, and a saved program reloads exactly."""
        if self.layer_origin is None:
            return stored
        return self.layer_origin[self.first_position(stored)]

    # ---- construction helpers -------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, size: str = "tiny", **overrides: Any) -> "ModelConfig":
        """The named recipe (`layerwise presets` lists them) at a named size, with field overrides."""
        from .presets import preset_fields

        return cls(**{**preset_fields(name, size), **overrides})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """A YAML mapping of fields; `preset:` and `size:` keys start from a preset, other keys override it."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ModelConfig fields, got {type(data).__name__}")
        preset, size = data.pop("preset", None), data.pop("size", "tiny")
        if preset is None:
            return cls(**data)
        return cls.from_preset(preset, size, **data)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        version = config_dict.get("layerwise_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"config.json has layerwise_version={version}, but this layerwise reads version {CONFIG_VERSION}; "
                "upgrade layerwise or convert the checkpoint"
            )
        return super().from_dict(config_dict, **kwargs)


def check_rebuildable_after_reshaping(cfg: ModelConfig) -> None:
    """A reshaped model (pruned or reprogrammed: `layer_origin` set) is rebuilt from its config at its new
    positions, so a variant whose math depends on a layer's position or on the model's depth would come back
    different. Runs at save and at load, so such a checkpoint is never written or read silently wrong."""
    from .nn.registry import selected_variants

    recorded = (f"layer_origin={cfg.layer_origin}" if cfg.layer_origin is not None
                else f"layerwise_dropped_layers={cfg.layerwise_dropped_layers}")
    for variant in selected_variants(cfg):
        if variant.depth_dependent:
            field = variant.selector_field
            raise UserError(
                f"ModelConfig.{recorded} cannot be combined with {field}={getattr(cfg, field)!r}: it "
                f"{variant.depth_dependence}, and a reshaped model is rebuilt with its layers at their new "
                "positions; use the reshaped model in memory, or reshape a model without depth-dependent layers"
            )


def layer_origin_of(config) -> list[int] | None:
    """For each layer position of a model's config (layerwise or HF), the index in the original model of the
    layer it runs; None when the model was never reshaped. Reads `layer_origin`, else a config written before
    it (`layerwise_dropped_layers`), else, for a layerwise model built with tied layers, its `layer_order`."""
    origin = getattr(config, "layer_origin", None)
    if origin is not None:
        return list(origin)
    dropped = set(getattr(config, "layerwise_dropped_layers", None) or ())
    if dropped:
        total = config.num_hidden_layers + len(dropped)
        return [i for i in range(total) if i not in dropped]
    order = getattr(config, "layer_order", None)
    return list(order) if order is not None else None


def default_d_ff(d_model: int, mlp: str) -> int:
    if mlp == "swiglu":
        return 64 * -(-int(8 * d_model / 3) // 64)  # LLaMA: 8/3 d keeps parameters equal to a 4d GELU MLP
    return 4 * d_model


def field_names() -> list[str]:
    from dataclasses import fields

    base = {f.name for f in fields(PreTrainedConfig)}
    return [f.name for f in fields(ModelConfig) if f.name not in base]


def _generation_keys() -> set[str]:
    return set(GenerationConfig._get_default_generation_params())
