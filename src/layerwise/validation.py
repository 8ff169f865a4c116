"""Construction-time checks for ModelConfig. Each failure names the field, its value and what is valid."""

from __future__ import annotations

from .nn.registry import fail, validate_variants
from .nn.value_residual import SATFORMER_GATES


def validate_config(cfg) -> None:
    # Registries are imported here, not at module import, so that config.py stays importable on its own.
    from .nn.mlp import MLPS
    from .nn.norms import NORMS
    from .nn.placement import PLACEMENTS
    from .nn.positions import POSITION_EMBEDDINGS
    from .nn.residual import RESIDUALS
    from .nn.value_residual import VALUE_RESIDUALS

    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(field, value, "must be a positive integer")
    for field in ("norm_eps", "init_std", "bhyt_kappa", "frozen_norm_sigma", "rope_theta"):
        if not getattr(cfg, field) > 0:
            fail(field, getattr(cfg, field), "must be > 0")

    if cfg.head_dim is None:
        fail("d_model", cfg.d_model, f"is not divisible by n_heads={cfg.n_heads}; set head_dim to use other widths")
    if not isinstance(cfg.head_dim, int) or isinstance(cfg.head_dim, bool) or cfg.head_dim < 2:
        fail("head_dim", cfg.head_dim, "must be an integer of at least 2")
    if not isinstance(cfg.lm_head_bias, bool):
        fail("lm_head_bias", cfg.lm_head_bias, "must be True or False")
    if cfg.n_heads % cfg.n_kv_heads:
        fail("n_kv_heads", cfg.n_kv_heads, f"must divide n_heads={cfg.n_heads} (grouped-query attention)")

    # Unknown names raise with the list of valid ones.
    MLPS.get(cfg.mlp)
    NORMS.get(cfg.norm)
    PLACEMENTS.get(cfg.norm_placement)
    RESIDUALS.get(cfg.residual)
    VALUE_RESIDUALS.get(cfg.value_residual)
    POSITION_EMBEDDINGS.get(cfg.position_embedding)

    # A value outside its field's domain is a mistake even where no selected variant reads the field.
    if not 0.0 <= cfg.mixln_ratio <= 1.0:
        fail("mixln_ratio", cfg.mixln_ratio, "must lie in [0, 1]")
    if cfg.seednorm_heads < 1 or cfg.d_model % cfg.seednorm_heads:
        fail("seednorm_heads", cfg.seednorm_heads, f"must divide d_model={cfg.d_model}")
    if cfg.value_residual_gate not in SATFORMER_GATES:
        fail("value_residual_gate", cfg.value_residual_gate, f"is not one of {', '.join(SATFORMER_GATES)}")
    if cfg.value_residual_last_k is not None and not 1 <= cfg.value_residual_last_k <= cfg.n_layers - 1:
        fail("value_residual_last_k", cfg.value_residual_last_k, f"must be in 1..{cfg.n_layers - 1} (or None)")

    # Rules that belong to a variant (AttnRes needs an additive placement, BHyT's parallel form needs Pre-LN,
    # ...) live on its class; fields that only unselected variants read warn that they have no effect.
    validate_variants(cfg)
