"""Norms checked against their papers' formulas in float64 (spec: shared/spec/methods.md §0, §4-6, §14)."""

import math

import pytest
import torch

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.attention import ForwardContext, rope_cos_sin
from layerwise.nn.block import BHyTParallelLayer
from layerwise.nn.norms import (BHyT, DyT, FrozenScaleNorm, LayerNorm, RMSNorm, SeeDNorm, approximate_mean_square,
                                attention_output_gain)

TIGHT = dict(atol=1e-12, rtol=1e-12)


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64) * 3 + 0.5


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-1.5, 1.5)
    return module


def test_rmsnorm_and_layernorm_match_their_formulas():
    x = x64(3, 5, 16)
    rms = _randomise(RMSNorm(16, eps=1e-6).double())
    torch.testing.assert_close(rms(x), rms.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), **TIGHT)
    ln = _randomise(LayerNorm(16, eps=1e-5).double())
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), ln.weight * (x - mu) / torch.sqrt(var + 1e-5) + ln.bias, **TIGHT)


@pytest.mark.parametrize("heads", [1, 4])
def test_seednorm_at_init_equals_rmsnorm(heads):
    x = x64(2, 7, 16)
    torch.testing.assert_close(SeeDNorm(16, heads=heads).double()(x), RMSNorm(16).double()(x), atol=0, rtol=0)


@pytest.mark.parametrize("heads", [1, 4])
def test_seednorm_rescales_the_gain_by_tanh_of_x_dot_beta_per_head(heads):
    x = x64(2, 7, 16)
    norm = _randomise(SeeDNorm(16, heads=heads).double())
    x_hat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    chunk = 16 // heads
    expected = torch.empty_like(x)
    for j in range(heads):  # head j: s_j = tanh(<x_j, beta_j>) scales only its chunk of alpha
        part = slice(j * chunk, (j + 1) * chunk)
        s = torch.tanh((x[..., part] * norm.beta[part]).sum(-1, keepdim=True))
        expected[..., part] = (norm.weight[part] + norm.alpha[part] * s) * x_hat[..., part]
    torch.testing.assert_close(norm(x), expected, **TIGHT)


def test_dyt_is_gamma_tanh_alpha_x_plus_beta():
    x = x64(4, 16)
    norm = _randomise(DyT(16, alpha0=0.5, bias=True).double())
    torch.testing.assert_close(norm(x), norm.weight * torch.tanh(norm.alpha * x) + norm.bias, **TIGHT)


def test_dyt_preset_uses_the_llama_recipe():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("dyt", "tiny"))
    for layer in model.model.layers:
        assert layer.attn.norm_in.alpha.item() == pytest.approx(0.8) and layer.attn.norm_in.bias is None
        assert layer.mlp.norm_in.alpha.item() == pytest.approx(0.2)
    assert model.model.norm.alpha.item() == pytest.approx(0.2)
    assert model.model.embedding_multiplier.item() == pytest.approx(math.sqrt(128))


def test_bhyt_star_is_gamma_tanh_lambda_x_over_kappa_rms():
    x = x64(3, 16)
    norm = _randomise(BHyT(16, lambda0=2.0, kappa=10.0).double())
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), norm.weight * torch.tanh(norm.lam * x / (10.0 * rms)), **TIGHT)


def test_bhyt_with_vanishing_lambda_over_kappa_is_linear_in_x_hat():
    x = x64(3, 16)
    norm = BHyT(16, lambda0=1e-6, kappa=10.0).double()
    x_hat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    # tanh(z) = z (1 - z^2/3 + ...): with z ~ 1e-7 the output is gamma * (lambda/kappa) * x_hat to ~1e-14.
    torch.testing.assert_close(norm(x) / (norm.lam / 10.0), x_hat, atol=1e-12, rtol=1e-12)


def test_bhyt_preset_final_norm_is_plain_rmsnorm():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny"))
    assert type(model.model.norm) is RMSNorm
    assert model.model.layers[0].attn.norm_in.lam.item() == 2.0 and model.model.layers[0].mlp.norm_in.lam.item() == 1.0


def test_attention_output_gain_expands_value_heads_for_gqa():
    d, heads, kv, hd, T = 32, 8, 2, 4, 50
    wv, wo = torch.randn(kv * hd, d, dtype=torch.float64), torch.randn(d, heads * hd, dtype=torch.float64)
    expanded = torch.cat([wv[(h // (heads // kv)) * hd:(h // (heads // kv) + 1) * hd] for h in range(heads)])
    expected = torch.linalg.matrix_norm(wo @ expanded) ** 2 / (T * d)
    torch.testing.assert_close(attention_output_gain(wv, wo, heads, T), expected, **TIGHT)


def _bhyt_model(**overrides):
    cfg = ModelConfig.from_preset("bhyt", "tiny", n_kv_heads=2, **overrides)
    return LayerwiseForCausalLM(cfg).double().eval()


def test_bhyt_parallel_layer_matches_the_papers_block_computation():
    model = _bhyt_model()
    layer = model.model.layers[1]
    assert isinstance(layer, BHyTParallelLayer)
    x = x64(2, 9, 128)
    ctx = ForwardContext(rope=rope_cos_sin(torch.arange(9)[None], 32, 10000.0))
    out = layer(x, ctx)
    attn, mlp = layer.attn, layer.mlp
    kappa = attn.norm_in.kappa
    v = x.pow(2).mean(-1, keepdim=True)  # step 1: the one exact statistic
    h1 = attn.norm_in.weight * torch.tanh(attn.norm_in.lam * x / (kappa * torch.sqrt(v + 1e-6)))
    a = attn.fn(h1, ctx)  # step 2
    c = attention_output_gain(attn.fn.v_proj.weight, attn.fn.o_proj.weight, 4, 9)
    v_hat = v + c * attn.norm_in.lam ** 2 / kappa ** 2  # step 3
    h = x + a  # step 4
    h2 = mlp.norm_in.weight * torch.tanh(mlp.norm_in.lam * h / (kappa * torch.sqrt(v_hat + 1e-6)))
    torch.testing.assert_close(out, h + mlp.fn(h2, ctx), **TIGHT)  # step 5
    torch.testing.assert_close(layer.attn_gain, c, **TIGHT)


def test_bhyt_approximate_variance_tracks_the_exact_one_at_init():
    """Spec §15.2: at init v + c lambda^2/kappa^2 is within about 10% of the exact mean_d((h + a)^2)."""
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny")).eval()
    seen = {}
    for layer in model.model.layers:
        layer.attn.hook_in.register_forward_hook(lambda m, a, out, i=layer.layer_idx: seen.__setitem__(("h", i), out))
        layer.attn.hook_out.register_forward_hook(lambda m, a, out, i=layer.layer_idx: seen.__setitem__(("a", i), out))
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 64)))
    ratios = []
    for layer in model.model.layers:
        h, a = seen[("h", layer.layer_idx)], seen[("a", layer.layer_idx)]
        norm = layer.attn.norm_in
        approx = approximate_mean_square(h.pow(2).mean(-1, keepdim=True), layer.attn_gain, norm.lam, norm.kappa)
        ratios.append((approx / (h + a).pow(2).mean(-1, keepdim=True)).mean().item())
    assert all(0.9 < r < 1.1 for r in ratios), ratios


def test_frozen_scale_norm_is_centring_divided_by_a_constant_and_affine():
    x, y = x64(3, 16), x64(3, 16)
    norm = _randomise(FrozenScaleNorm(16, sigma=2.5).double())
    expected = norm.weight * (x - x.mean(-1, keepdim=True)) / 2.5 + norm.bias
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    zero = norm(torch.zeros_like(x))
    torch.testing.assert_close(norm(2 * x - 3 * y) - zero, 2 * (norm(x) - zero) - 3 * (norm(y) - zero), **TIGHT)
    assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]  # sigma is not learned


def test_unknown_norm_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ModelConfig.norm='powernorm' is not a known norm; valid: bhyt, dyt"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", norm="powernorm")
