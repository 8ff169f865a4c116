"""Construction-time checks for ModelConfig. Each failure names the field, its value and what is valid."""

from __future__ import annotations

SATFORMER_GATES = ("relu", "sigmoid", "tanh", "identity")


def _fail(field: str, value, why: str) -> None:
    raise ValueError(f"ModelConfig.{field}={value!r} {why}")


def validate_config(cfg) -> None:
    # Registries are imported here, not at module import, so that config.py stays importable on its own.
    from .nn.mlp import MLPS
    from .nn.norms import NORMS
    from .nn.placement import PLACEMENTS
    from .nn.residual import RESIDUALS
    from .nn.value_residual import VALUE_RESIDUALS

    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        value = getattr(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(field, value, "must be a positive integer")
    for field in ("norm_eps", "init_std", "bhyt_kappa", "frozen_norm_sigma", "rope_theta"):
        if not getattr(cfg, field) > 0:
            _fail(field, getattr(cfg, field), "must be > 0")

    if cfg.d_model % cfg.n_heads:
        _fail("d_model", cfg.d_model, f"is not divisible by n_heads={cfg.n_heads}")
    if (cfg.d_model // cfg.n_heads) % 2:
        _fail("n_heads", cfg.n_heads, f"gives an odd head_dim {cfg.d_model // cfg.n_heads}; RoPE needs an even one")
    if cfg.n_heads % cfg.n_kv_heads:
        _fail("n_kv_heads", cfg.n_kv_heads, f"must divide n_heads={cfg.n_heads} (grouped-query attention)")

    # Unknown names raise with the list of valid ones.
    MLPS.get(cfg.mlp)
    NORMS.get(cfg.norm)
    PLACEMENTS.get(cfg.norm_placement)
    RESIDUALS.get(cfg.residual)
    VALUE_RESIDUALS.get(cfg.value_residual)

    if not 0.0 <= cfg.mixln_ratio <= 1.0:
        _fail("mixln_ratio", cfg.mixln_ratio, "must lie in [0, 1]")
    if cfg.seednorm_heads < 1 or cfg.d_model % cfg.seednorm_heads:
        _fail("seednorm_heads", cfg.seednorm_heads, f"must divide d_model={cfg.d_model}")
    if cfg.value_residual_gate not in SATFORMER_GATES:
        _fail("value_residual_gate", cfg.value_residual_gate, f"is not one of {', '.join(SATFORMER_GATES)}")
    if cfg.value_residual_last_k is not None and not 1 <= cfg.value_residual_last_k <= cfg.n_layers - 1:
        _fail("value_residual_last_k", cfg.value_residual_last_k, f"must be in 1..{cfg.n_layers - 1} (or None)")

    additive = cfg.norm_placement in ("pre", "peri")
    if cfg.layernorm_scaling:
        if cfg.norm_placement not in ("pre", "peri", "mixln"):
            _fail("layernorm_scaling", True, f"scales pre-sublayer norms, which norm_placement="
                  f"{cfg.norm_placement!r} does not have; use pre, peri or mixln")
        if cfg.scaled_init:
            _fail("layernorm_scaling", True, "must not be combined with scaled_init=True: the LNS paper reports "
                  "that depth-scaled init diminishes its effect; set scaled_init=False")

    RESIDUALS.get(cfg.residual).validate(cfg)
    if cfg.residual != "standard" and not additive:
        _fail("residual", cfg.residual, f"routes sublayer inputs and needs an additive placement (pre or peri), "
              f"not norm_placement={cfg.norm_placement!r}")
    if cfg.norm == "bhyt" and not cfg.bhyt_exact and (cfg.norm_placement != "pre" or cfg.residual != "standard"):
        _fail("bhyt_exact", False, "(the parallel BHyT form) approximates the MLP-input variance from a Pre-LN "
              "residual add; with norm_placement={!r}, residual={!r} set bhyt_exact=True (BHyT*)".format(
                  cfg.norm_placement, cfg.residual))
