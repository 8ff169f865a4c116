"""Norm placements and depth scaling: LNS, Mix-LN, DeepNorm, Post-LN, Peri-LN (docs/variants.md lists each
paper). References are written from the papers' update rules in float64, using each sublayer's own
norm and F modules as black boxes."""

import math

import pytest
import torch
from torch import nn

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.hooks import capture
from layerwise.nn.attention import ForwardContext, rope_cos_sin
from layerwise.nn.initialization import Normal, init_of
from layerwise.nn.norms import RMSNorm
from layerwise.nn.placement import DeepNorm, MixLN, layer_layouts
from layerwise.reference import rms_norm

TIGHT = dict(atol=1e-12, rtol=1e-12)
EXACT = dict(atol=0, rtol=0)


def _ctx(T=8):
    return ForwardContext(rope=rope_cos_sin(torch.arange(T)[None], 32, 10000.0))


def _model(preset, **overrides):
    return LayerwiseForCausalLM(ModelConfig.from_preset(preset, "tiny", **overrides)).double().eval()


def _x(T=8):
    return torch.randn(2, T, 128, dtype=torch.float64) * 2 + 0.3


def _randomise_norms(model):
    """Random gains so that 'a norm' and 'no norm' (or two different norms) cannot coincide."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def _rmsnorm(norm, x):
    return rms_norm(x, norm.weight, norm.eps)


# ---- LayerNorm Scaling ----------------------------------------------------------------------------------


def test_lns_scales_both_pre_sublayer_norms_of_layer_i_by_exactly_one_over_sqrt_i_plus_1():
    model = _model("lns", n_layers=6)
    for i, layer in enumerate(model.model.layers):
        assert layer.attn.depth_scale == 1 / math.sqrt(i + 1)
        assert layer.mlp.depth_scale == 1 / math.sqrt(i + 1)
    assert model.model.layers[0].attn.depth_scale == 1.0 and model.model.layers[5].mlp.depth_scale == 1 / math.sqrt(6)
    assert all(layer.attn.depth_scale == 1.0 for layer in _model("pre-rmsnorm", n_layers=6).model.layers)


def test_lns_layer_i_computes_x_plus_f_of_norm_x_over_sqrt_i_plus_1_for_both_sublayers():
    model = _randomise_norms(_model("lns", n_layers=6))
    x, ctx = _x(), _ctx()
    with torch.no_grad():
        for i in (2, 5):
            layer, s = model.model.layers[i], 1 / math.sqrt(i + 1)
            h = x + layer.attn.fn(s * _rmsnorm(layer.attn.norm_in, x), ctx)
            expected = h + layer.mlp.fn(s * _rmsnorm(layer.mlp.norm_in, h), ctx)
            torch.testing.assert_close(layer(x, ctx), expected, **TIGHT)


def test_lns_layer_0_computes_exactly_what_pre_ln_layer_0_computes_with_the_same_weights():
    lns, pre = _randomise_norms(_model("lns", n_layers=3)), _model("pre-rmsnorm", n_layers=3)
    pre.load_state_dict(lns.state_dict())
    x, ctx = _x(), _ctx()
    with torch.no_grad():
        torch.testing.assert_close(lns.model.layers[0](x, ctx), pre.model.layers[0](x, ctx), **EXACT)
        assert not torch.allclose(lns.model.layers[1](x, ctx), pre.model.layers[1](x, ctx))
        ids = torch.randint(0, 256, (2, 8))
        assert not torch.allclose(lns(ids).logits, pre(ids).logits)


def test_lns_does_not_scale_the_final_norm():
    model = _randomise_norms(_model("lns", n_layers=6))
    with torch.no_grad(), capture(model, "model.hook_final_norm_in") as seen:
        out = model.model(torch.randint(0, 256, (2, 8))).last_hidden_state
    assert type(model.model.norm) is RMSNorm and not hasattr(model.model.norm, "depth_scale")
    torch.testing.assert_close(out, _rmsnorm(model.model.norm, seen["model.hook_final_norm_in"]), **TIGHT)


def test_lns_combined_with_scaled_init_raises_naming_layernorm_scaling():
    with pytest.raises(ValueError, match=r"ModelConfig\.layernorm_scaling=True .*scaled_init"):
        ModelConfig.from_preset("lns", "tiny", scaled_init=True)
    with pytest.raises(ValueError, match="layernorm_scaling"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", layernorm_scaling=True, scaled_init=True)


# ---- Mix-LN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers,ratio,post", [(8, 0.25, 2), (12, 0.25, 3), (24, 0.25, 6), (8, 0.0, 0), (8, 1.0, 8),
                                                  (6, 0.25, 1), (7, 0.25, 1), (14, 0.25, 3), (100, 0.29, 29)])
def test_mixln_puts_post_ln_on_exactly_the_first_ratio_times_l_layers(n_layers, ratio, post):
    """floor(ratio * L) Post-LN layers, as the paper states; Python's round would give 2, 2 and 4 at L = 6, 7, 14."""
    cfg = ModelConfig.from_preset("mix-ln", "tiny", n_layers=n_layers, mixln_ratio=ratio)
    layouts = layer_layouts(cfg)
    assert MixLN.post_ln_layers(cfg) == post
    assert [lay.post_add for lay in layouts] == [True] * post + [False] * (n_layers - post)
    assert all(not lay.norm_in and lay.norm_out and lay.skip_weight == 1.0 for lay in layouts[:post])  # Post-LN
    assert all(lay.norm_in and not lay.norm_out for lay in layouts[post:])  # Pre-LN


def test_mixln_model_with_8_layers_and_ratio_a_quarter_runs_layers_0_1_post_ln_and_2_to_7_pre_ln():
    model = _randomise_norms(_model("mix-ln", n_layers=8, mixln_ratio=0.25))
    x, ctx = _x(), _ctx()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            check = i in (0, 1, 2, 7)  # computed on the boundary layers and the last; structure on all
            for sub in (layer.attn, layer.mlp):
                if i < 2:  # h <- RMS(h + F(h))
                    assert isinstance(sub.norm_in, nn.Identity) and isinstance(sub.norm_out, RMSNorm)
                    if check:
                        torch.testing.assert_close(sub(x, ctx), _rmsnorm(sub.norm_out, x + sub.fn(x, ctx)), **TIGHT)
                else:  # h <- h + F(RMS(h))
                    assert isinstance(sub.norm_in, RMSNorm) and isinstance(sub.norm_out, nn.Identity)
                    if check:
                        torch.testing.assert_close(sub(x, ctx), x + sub.fn(_rmsnorm(sub.norm_in, x), ctx), **TIGHT)
    assert isinstance(model.model.norm, RMSNorm)  # a final norm is always applied


def test_mixln_with_ratio_zero_is_bit_identical_to_pre_ln():
    torch.manual_seed(1)
    mix = _model("mix-ln", mixln_ratio=0.0)
    torch.manual_seed(1)
    pre = _model("pre-rmsnorm")
    assert all(not lay.post_add for lay in layer_layouts(mix.config))
    # Same seed, same weights: the two are built the same way...
    mix_state, pre_state = mix.state_dict(), pre.state_dict()
    assert mix_state.keys() == pre_state.keys()
    assert all(torch.equal(mix_state[k], pre_state[k]) for k in mix_state)
    # ... and compute the same logits, bit for bit.
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mix(ids).logits, pre(ids).logits, **EXACT)


@pytest.mark.parametrize("ratio", [-0.25, 1.25, 2.0])
def test_mixln_ratio_outside_zero_one_raises_naming_mixln_ratio(ratio):
    with pytest.raises(ValueError, match=rf"ModelConfig\.mixln_ratio={ratio!r} must lie in \[0, 1\]"):
        ModelConfig.from_preset("mix-ln", "tiny", mixln_ratio=ratio)


# ---- DeepNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 6, 12, 24, 32, 100])
def test_deepnorm_alpha_is_2n_to_the_quarter_and_beta_is_8n_to_the_minus_quarter(n):
    assert DeepNorm.alpha(n) == pytest.approx((2 * n) ** 0.25, rel=1e-15)
    assert DeepNorm.beta(n) == pytest.approx((8 * n) ** -0.25, rel=1e-15)
    assert DeepNorm.alpha(n) > 1 or n == 1  # the skip is up-weighted, never down-weighted
    assert 0 < DeepNorm.beta(n) < 1  # the branch init is divided, never multiplied (the MixLN repo's bug)


def test_the_mixln_repos_hard_coded_deepnorm_alpha_sqrt_8_is_right_only_for_32_layers():
    assert DeepNorm.alpha(32) == pytest.approx(math.sqrt(8), rel=1e-15)
    for n in (6, 12, 24, 31, 33, 48):
        assert DeepNorm.alpha(n) != pytest.approx(math.sqrt(8), rel=1e-3)


def test_deepnorm_divides_v_o_and_mlp_init_std_by_8n_to_the_quarter_and_leaves_q_k_alone():
    cfg = ModelConfig.from_preset("deepnorm", "tiny", d_model=256, n_heads=4, n_layers=6)
    model = LayerwiseForCausalLM(cfg)
    beta = (8 * 6) ** -0.25
    for layer in model.model.layers:
        attn, mlp = layer.attn.fn, layer.mlp.fn
        for proj in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            assert init_of(proj).std == pytest.approx(cfg.init_std * beta, rel=1e-12)
        for proj in (attn.q_proj, attn.k_proj):
            assert init_of(proj) == Normal(cfg.init_std)
    # Statistically: 256 x 256 (or larger) weights give the empirical std to ~0.3%; 10% is a safe bound.
    attn, mlp = model.model.layers[3].attn.fn, model.model.layers[3].mlp.fn
    for proj in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert proj.weight.std().item() == pytest.approx(cfg.init_std * beta, rel=0.1)
    for proj in (attn.q_proj, attn.k_proj):
        assert proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)


@pytest.mark.parametrize("n_layers", [2, 6])
def test_deepnorm_sublayer_computes_norm_of_alpha_x_plus_f_x(n_layers):
    model = _randomise_norms(_model("deepnorm", n_layers=n_layers))
    x, ctx = _x(), _ctx()
    alpha = (2 * n_layers) ** 0.25
    with torch.no_grad():
        for sub in (model.model.layers[1].attn, model.model.layers[1].mlp):
            assert isinstance(sub.norm_in, nn.Identity)  # F reads the raw stream
            torch.testing.assert_close(sub(x, ctx), _rmsnorm(sub.norm_out, alpha * x + sub.fn(x, ctx)), **TIGHT)


# ---- Post-LN and Peri-LN --------------------------------------------------------------------------------


def test_post_ln_sublayer_computes_norm_of_x_plus_f_x():
    model = _randomise_norms(_model("post-ln"))
    x, ctx = _x(), _ctx()
    with torch.no_grad():
        for layer in model.model.layers:
            for sub in (layer.attn, layer.mlp):
                assert isinstance(sub.norm_in, nn.Identity) and isinstance(sub.norm_out, RMSNorm)
        for sub in (model.model.layers[0].attn, model.model.layers[0].mlp):
            torch.testing.assert_close(sub(x, ctx), _rmsnorm(sub.norm_out, x + sub.fn(x, ctx)), **TIGHT)
    assert isinstance(model.model.norm, RMSNorm)  # as in the MixLN/LNS repos, a final norm is still applied


def test_peri_ln_sublayer_computes_x_plus_norm_out_of_f_of_norm_in_x():
    model = _randomise_norms(_model("peri-ln"))
    x, ctx = _x(), _ctx()
    with torch.no_grad():
        for layer in model.model.layers:
            for sub in (layer.attn, layer.mlp):
                assert isinstance(sub.norm_in, RMSNorm) and isinstance(sub.norm_out, RMSNorm)
                assert sub.norm_in is not sub.norm_out
        for sub in (model.model.layers[2].attn, model.model.layers[2].mlp):
            out = sub(x, ctx)
            torch.testing.assert_close(out, x + sub.norm_out(sub.fn(sub.norm_in(x), ctx)), **TIGHT)
            formula = x + _rmsnorm(sub.norm_out, sub.fn(_rmsnorm(sub.norm_in, x), ctx))
            torch.testing.assert_close(out, formula, **TIGHT)


def test_peri_ln_preset_normalises_the_embedding_output():
    model = _randomise_norms(_model("peri-ln"))
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), capture(model, "model.layers.0.attn.hook_in") as seen:
        model(ids)
    with torch.no_grad():
        emb_norm = model.model.embedding_norm
        assert isinstance(emb_norm, RMSNorm)
        torch.testing.assert_close(seen["model.layers.0.attn.hook_in"],
                                   _rmsnorm(emb_norm, model.model.embed_tokens(ids)), **TIGHT)


def test_scaled_init_divides_output_projections_by_sqrt_2l():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", scaled_init=True, n_layers=8))
    attn, mlp = model.model.layers[0].attn.fn, model.model.layers[0].mlp.fn
    assert init_of(attn.o_proj).std == init_of(mlp.down_proj).std == pytest.approx(0.02 / 4)
    assert init_of(attn.v_proj) == Normal(0.02)


def test_unknown_placement_raises_value_error_listing_the_valid_placements():
    with pytest.raises(ValueError, match=r"ModelConfig\.norm_placement='sandwich' is not a known norm placement; "
                                         r"valid: deepnorm, mixln, peri, post, pre"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", norm_placement="sandwich")
