"""Norm placements and depth scaling (spec §1-3): LNS, Mix-LN, DeepNorm, Post-LN, Peri-LN."""

import math

import pytest
import torch

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.attention import ForwardContext, rope_cos_sin
from layerwise.nn.placement import DeepNorm, MixLN, layer_layouts


def _ctx(T=8):
    return ForwardContext(rope=rope_cos_sin(torch.arange(T)[None], 32, 10000.0))


def _model(preset, **overrides):
    return LayerwiseForCausalLM(ModelConfig.from_preset(preset, "tiny", **overrides)).double().eval()


def test_lns_scales_both_pre_sublayer_norms_of_layer_i_by_exactly_one_over_sqrt_i_plus_1():
    model = _model("lns", n_layers=6)
    for i, layer in enumerate(model.model.layers):
        assert layer.attn.depth_scale == layer.mlp.depth_scale == 1 / math.sqrt(i + 1)
    assert not hasattr(model.model.norm, "depth_scale")  # the final norm is not scaled


def test_lns_layer_scaling_is_applied_after_gamma_and_layer_0_equals_pre_ln():
    lns, pre = _model("lns", n_layers=3), _model("pre-rmsnorm", n_layers=3)
    pre.load_state_dict(lns.state_dict())
    x, ctx = torch.randn(2, 8, 128, dtype=torch.float64), _ctx()
    torch.testing.assert_close(lns.model.layers[0](x, ctx), pre.model.layers[0](x, ctx), atol=0, rtol=0)
    layer = lns.model.layers[2]
    expected = x + layer.attn.fn(layer.attn.norm_in(x) / math.sqrt(3), ctx)
    torch.testing.assert_close(layer.attn(x, ctx), expected, atol=1e-12, rtol=1e-12)
    ids = torch.randint(0, 256, (2, 8))
    assert not torch.allclose(lns(ids).logits, pre(ids).logits)


@pytest.mark.parametrize("n_layers,ratio,post", [(8, 0.25, 2), (12, 0.25, 3), (24, 0.25, 6), (8, 0.0, 0), (8, 1.0, 8)])
def test_mixln_puts_post_ln_on_exactly_the_first_round_ratio_times_l_layers(n_layers, ratio, post):
    cfg = ModelConfig.from_preset("mix-ln", "tiny", n_layers=n_layers, mixln_ratio=ratio)
    layouts = layer_layouts(cfg)
    assert MixLN.post_ln_layers(cfg) == post
    assert [lay.post_add for lay in layouts] == [True] * post + [False] * (n_layers - post)
    assert all(lay.norm_in and not lay.norm_out for lay in layouts[post:])


def test_mixln_with_ratio_zero_is_bit_identical_to_pre_ln():
    torch.manual_seed(1)
    mix = _model("mix-ln", mixln_ratio=0.0)
    torch.manual_seed(1)
    pre = _model("pre-rmsnorm")
    assert mix.state_dict().keys() == pre.state_dict().keys()
    pre.load_state_dict(mix.state_dict())
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(mix(ids).logits, pre(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 6, 12, 24, 32, 100])
def test_deepnorm_constants_follow_deepnet(n):
    assert DeepNorm.alpha(n) == pytest.approx((2 * n) ** 0.25)
    assert DeepNorm.beta(n) == pytest.approx((8 * n) ** -0.25)


def test_the_mixln_repos_hard_coded_deepnorm_alpha_is_right_only_for_32_layers():
    assert DeepNorm.alpha(32) == pytest.approx(2.8284, abs=1e-4)
    assert DeepNorm.alpha(12) != pytest.approx(2.8284, abs=1e-2)


def test_deepnorm_divides_v_o_and_mlp_init_by_8n_to_the_quarter_and_keeps_q_k():
    cfg = ModelConfig.from_preset("deepnorm", "tiny", d_model=256, n_heads=4, n_layers=6)
    model = LayerwiseForCausalLM(cfg)
    beta = (8 * 6) ** -0.25
    attn, mlp = model.model.layers[3].attn.fn, model.model.layers[3].mlp.fn
    for proj in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert proj.init_std == pytest.approx(0.02 * beta)
        assert proj.weight.std().item() == pytest.approx(0.02 * beta, rel=0.1)
    for proj in (attn.q_proj, attn.k_proj):
        assert not hasattr(proj, "init_std")
        assert proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_deepnorm_sublayer_is_norm_of_alpha_x_plus_f_x():
    model = _model("deepnorm", n_layers=6)
    sub, x, ctx = model.model.layers[1].attn, torch.randn(2, 8, 128, dtype=torch.float64), _ctx()
    expected = sub.norm_out(DeepNorm.alpha(6) * x + sub.fn(x, ctx))
    torch.testing.assert_close(sub(x, ctx), expected, atol=1e-12, rtol=1e-12)


def test_post_ln_sublayer_is_norm_of_x_plus_f_x():
    model = _model("post-ln")
    sub, x, ctx = model.model.layers[0].mlp, torch.randn(2, 8, 128, dtype=torch.float64), _ctx()
    assert isinstance(sub.norm_in, torch.nn.Identity)
    torch.testing.assert_close(sub(x, ctx), sub.norm_out(x + sub.fn(x, ctx)), atol=1e-12, rtol=1e-12)


def test_peri_ln_sublayer_normalises_input_and_output_and_the_embedding():
    model = _model("peri-ln")
    sub, x, ctx = model.model.layers[2].attn, torch.randn(2, 8, 128, dtype=torch.float64), _ctx()
    torch.testing.assert_close(sub(x, ctx), x + sub.norm_out(sub.fn(sub.norm_in(x), ctx)), atol=1e-12, rtol=1e-12)
    assert model.model.embedding_norm is not None


def test_scaled_init_divides_output_projections_by_sqrt_2l():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", scaled_init=True, n_layers=8))
    attn, mlp = model.model.layers[0].attn.fn, model.model.layers[0].mlp.fn
    assert attn.o_proj.init_std == mlp.down_proj.init_std == pytest.approx(0.02 / 4)
    assert attn.v_proj.init_std == 0.02


def test_unknown_placement_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: deepnorm, mixln, peri, post, pre"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", norm_placement="sandwich")
