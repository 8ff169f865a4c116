"""Construction-time checks for ModelConfig. Each failure names the field, its value and what is valid."""

from __future__ import annotations

from .nn.registry import fail, validate_variants
from .nn.schedule import check_steps_field
from .nn.value_residual import SATFORMER_GATES


def validate_config(cfg) -> None:
    # Registries are imported here, not at module import, so that config.py stays importable on its own.
    from .nn.mlp import MLPS
    from .nn.norms import BHYT_VARIANCE_APPROXIMATIONS, NORMS
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
    if cfg.norm_gain_decay not in ("none", "input"):
        fail("norm_gain_decay", cfg.norm_gain_decay, "is not one of none, input (IWD)")
    if cfg.heterogeneous_gains:
        _validate_heterogeneous_gains(cfg)
    if cfg.seednorm_heads < 1 or cfg.d_model % cfg.seednorm_heads:
        fail("seednorm_heads", cfg.seednorm_heads, f"must divide d_model={cfg.d_model}")
    BHYT_VARIANCE_APPROXIMATIONS.get(cfg.bhyt_var_approx)
    k = cfg.bhyt_var_approx_exact_layers
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= cfg.n_layers:
        fail("bhyt_var_approx_exact_layers", k, f"must be an integer in 0..{cfg.n_layers} (n_layers)")
    for field in ("prepbn_decay_steps", "prepbn_warmup_steps", "un_warmup_steps", "powernorm_warmup_steps"):
        check_steps_field(cfg, field)
    if cfg.value_residual_gate not in SATFORMER_GATES:
        fail("value_residual_gate", cfg.value_residual_gate, f"is not one of {', '.join(SATFORMER_GATES)}")
    if cfg.value_residual_last_k is not None and not 1 <= cfg.value_residual_last_k <= cfg.n_layers - 1:
        fail("value_residual_last_k", cfg.value_residual_last_k, f"must be in 1..{cfg.n_layers - 1} (or None)")

    from .nn.residual import DELTA_BLOCK_SOURCES, DELTA_GATES

    if cfg.delta_gate not in DELTA_GATES:
        fail("delta_gate", cfg.delta_gate, f"is not one of {', '.join(DELTA_GATES)}")
    if not isinstance(cfg.delta_null_source, bool):
        fail("delta_null_source", cfg.delta_null_source, "must be True or False")
    bonus = cfg.delta_entropy_bonus
    if isinstance(bonus, bool) or not (isinstance(bonus, (int, float)) and 0 <= bonus < float("inf")):
        fail("delta_entropy_bonus", bonus, "must be a finite number >= 0 (0: no entropy bonus)")
    if cfg.delta_block_sources not in DELTA_BLOCK_SOURCES:
        fail("delta_block_sources", cfg.delta_block_sources, f"is not one of {', '.join(DELTA_BLOCK_SOURCES)}")

    _validate_layer_program(cfg)

    # Rules that belong to a variant (AttnRes needs an additive placement, BHyT's parallel form needs Pre-LN,
    # ...) live on its class; fields that only unselected variants read warn that they have no effect.
    validate_variants(cfg)


def _validate_heterogeneous_gains(cfg) -> None:
    from .nn.registry import variant_of

    if cfg.norm != "rmsnorm":
        fail("heterogeneous_gains", True, f"splits an RMSNorm's gain among its readers, and norm={cfg.norm!r} is "
             "not RMSNorm; use norm='rmsnorm'")
    if not variant_of(cfg, "norm_placement").pre_sublayer_norms:
        fail("heterogeneous_gains", True, f"splits the gains of pre-sublayer norms, which norm_placement="
             f"{cfg.norm_placement!r} does not have; use norm_placement='pre' or 'peri'")
    if cfg.value_residual != "none":
        fail("heterogeneous_gains", True, f"would leave the {cfg.value_residual} value residual reading the "
             "attention-input norm without a gain; use value_residual='none'")


def _index_list(cfg, field: str) -> list[int] | None:
    values = getattr(cfg, field)
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                         for v in values):
        fail(field, values, "must be a list of non-negative integers, one per execution position (or None)")
    if len(values) != cfg.n_layers:
        fail(field, values, f"has {len(values)} entries but n_layers={cfg.n_layers} counts the execution positions; "
             "give one entry per position")
    return list(values)


def _validate_layer_program(cfg) -> None:
    """layer_order lists the stored layer of each position: stored layers 0..max, each run at least once, and
    a stored layer is one set of weights, so every position that runs it must lay it out and scale it alike."""
    from .nn.placement import PLACEMENTS

    order, origin = _index_list(cfg, "layer_order"), _index_list(cfg, "layer_origin")
    if order is None:
        return
    unused = sorted(set(range(max(order) + 1)) - set(order))
    if unused:
        fail("layer_order", order, f"never runs stored layer(s) {unused}; stored layers are 0..max(layer_order) and "
             "each must run at least once (renumber them)")
    placement = PLACEMENTS.get(cfg.norm_placement)()
    first: dict[int, int] = {}
    for position, stored in enumerate(order):
        p = first.setdefault(stored, position)
        if p == position:
            continue
        if origin is not None and origin[p] != origin[position]:
            fail("layer_origin", origin, f"gives positions {p} and {position} different origins, but layer_order "
                 f"runs stored layer {stored} at both; one stored layer has one origin")
        if placement.layout(cfg, p) != placement.layout(cfg, position):
            fail("layer_order", order, f"runs stored layer {stored} at positions {p} and {position}, which "
                 f"norm_placement={cfg.norm_placement!r} lays out differently; tie only layers of one layout")
