"""Norms checked against their papers' formulas in float64: LayerNorm, RMSNorm, SeeDNorm, DyT, BHyT and the
frozen-scale LN (docs/variants.md lists each paper and where we depart from its released code).

Every reference below is written from the paper's formula, not from the module's code, and every module
under test has random (non-init) parameters unless the property is about the init.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.hooks import capture
from layerwise.nn.attention import ForwardContext, rope_cos_sin
from layerwise.nn.block import BHyTParallelLayer, Layer, refresh_attention_gains
from layerwise.nn.norms import (BHyT, DyT, FrozenScaleNorm, LayerNorm, RMSNorm, SeeDNorm, approximate_mean_square,
                                attention_output_gain)
from layerwise.reference import root_mean_square

TIGHT = dict(atol=1e-12, rtol=1e-12)
EXACT = dict(atol=0, rtol=0)
D = 16


def x64(*shape):
    """Float64 activations that are neither centred nor unit-scale, so mean, scale and eps all matter."""
    return torch.randn(*shape, dtype=torch.float64) * 3 + 0.5


def _randomise(module, low=-1.5, high=1.5):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(low, high)
    return module


def _ctx(T, head_dim=32):
    return ForwardContext(rope=rope_cos_sin(torch.arange(T)[None], head_dim, 10000.0))


# ---- LayerNorm and RMSNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_is_gamma_times_x_over_root_mean_square_plus_eps(eps):
    x = x64(3, 5, D)
    norm = _randomise(RMSNorm(D, eps=eps).double())
    torch.testing.assert_close(norm(x), norm.weight * x / root_mean_square(x, eps), **TIGHT)


def test_rmsnorm_in_bf16_follows_the_llama_precision_convention():
    # LLaMA's convention: mean of squares in fp32, multiply by rsqrt, cast back to the activation dtype, then
    # multiply by gamma.
    x = (torch.randn(4, 7, D) * 3).bfloat16()
    norm = _randomise(RMSNorm(D, eps=1e-6)).bfloat16()
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, **EXACT)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_is_gamma_times_centred_x_over_biased_std_plus_beta(bias):
    x = x64(3, 5, D)
    norm = _randomise(LayerNorm(D, eps=1e-5, bias=bias).double())
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)  # biased, as torch's
    expected = norm.weight * (x - mu) / torch.sqrt(var + 1e-5) + (norm.bias if bias else 0.0)
    torch.testing.assert_close(norm(x), expected, **TIGHT)


def test_layernorm_matches_torch_functional_layer_norm():
    x = x64(3, 5, D)
    norm = _randomise(LayerNorm(D, eps=1e-5).double())
    torch.testing.assert_close(norm(x), F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5), **TIGHT)


def test_rmsnorm_and_layernorm_start_at_unit_gain_and_zero_bias():
    ln, rms = LayerNorm(D), RMSNorm(D)
    assert torch.equal(ln.weight, torch.ones(D)) and torch.equal(ln.bias, torch.zeros(D))
    assert torch.equal(rms.weight, torch.ones(D)) and [n for n, _ in rms.named_parameters()] == ["weight"]


# ---- SeeDNorm -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4, 16])
def test_seednorm_at_init_equals_rmsnorm(heads):
    x = x64(2, 7, D) * 10  # large inputs: any leak of <x, beta> through tanh would show
    seed = SeeDNorm(D, eps=1e-6, heads=heads).double()
    assert torch.equal(seed.beta, torch.zeros(D)) and torch.equal(seed.alpha, torch.ones(D))
    torch.testing.assert_close(seed(x), RMSNorm(D, eps=1e-6).double()(x), **EXACT)


def test_single_head_seednorm_is_gamma_plus_alpha_tanh_of_x_dot_beta_times_x_hat():
    x = x64(2, 7, D)
    norm = _randomise(SeeDNorm(D, heads=1).double(), -0.3, 0.3)
    s = torch.tanh((x * norm.beta).sum(-1, keepdim=True))  # ONE scalar per token, from the un-normalised x
    expected = (norm.weight + norm.alpha * s) * x / root_mean_square(x, 1e-6)
    torch.testing.assert_close(norm(x), expected, **TIGHT)


@pytest.mark.parametrize("heads", [2, 4, 16])
def test_multi_head_seednorm_rescales_each_chunk_of_alpha_by_its_own_tanh_of_x_dot_beta(heads):
    x = x64(2, 7, D)
    norm = _randomise(SeeDNorm(D, heads=heads).double(), -0.3, 0.3)
    x_hat = x / root_mean_square(x, 1e-6)  # the RMS is over the whole width, not per head
    chunk = D // heads
    expected = torch.empty_like(x)
    for j in range(heads):  # head j: s_j = tanh(<x_j, beta_j>) multiplies only the alpha entries of chunk j
        part = slice(j * chunk, (j + 1) * chunk)
        s_j = torch.tanh((x[..., part] * norm.beta[part]).sum(-1, keepdim=True))
        expected[..., part] = (norm.weight[part] + norm.alpha[part] * s_j) * x_hat[..., part]
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    # The heads are really separate: the single-head formula gives a different answer.
    single = (norm.weight + norm.alpha * torch.tanh((x * norm.beta).sum(-1, keepdim=True))) * x_hat
    assert not torch.allclose(norm(x), single)


def test_seednorm_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="heads=3"):
        SeeDNorm(D, heads=3)


def test_seednorm_keeps_the_activation_dtype_like_rmsnorm():
    x = (torch.randn(3, D) * 3).bfloat16()
    assert RMSNorm(D).bfloat16()(x).dtype == torch.bfloat16
    assert _randomise(SeeDNorm(D, heads=4), -0.3, 0.3).bfloat16()(x).dtype == torch.bfloat16


def test_a_bf16_seednorm_model_runs_like_a_bf16_rmsnorm_model():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("seednorm", "tiny", n_layers=1)).to(torch.bfloat16)
    assert model(torch.randint(0, 256, (1, 4))).logits.dtype == torch.bfloat16


# ---- DyT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_dyt_is_gamma_tanh_alpha_x_plus_beta(bias):
    x = x64(4, D)
    norm = _randomise(DyT(D, alpha0=0.5, bias=bias).double())
    assert norm.alpha.numel() == 1  # one scalar alpha per DyT layer
    expected = norm.weight * torch.tanh(norm.alpha * x) + (norm.bias if bias else 0.0)
    torch.testing.assert_close(norm(x), expected, **TIGHT)


def test_dyt_preset_uses_the_llama_recipe_alpha0_08_02_02_no_bias_and_sqrt_d_embedding_multiplier():
    cfg = ModelConfig.from_preset("dyt", "tiny")
    model = LayerwiseForCausalLM(cfg).eval()
    for layer in model.model.layers:
        attn_norm, mlp_norm = layer.attn.norm_in, layer.mlp.norm_in
        assert isinstance(attn_norm, DyT) and isinstance(mlp_norm, DyT)
        assert attn_norm.alpha.item() == pytest.approx(0.8) and mlp_norm.alpha.item() == pytest.approx(0.2)
        assert attn_norm.bias is None and mlp_norm.bias is None
    final = model.model.norm
    assert isinstance(final, DyT) and final.alpha.item() == pytest.approx(0.2) and final.bias is None
    assert model.model.embedding_multiplier.item() == pytest.approx(math.sqrt(cfg.d_model), rel=1e-7)
    # ... and the multiplier is applied: layer 0 reads sqrt(d) * embedding.
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad(), capture(model, "model.layers.0.attn.hook_in") as seen:
        model(ids)
    with torch.no_grad():
        torch.testing.assert_close(seen["model.layers.0.attn.hook_in"],
                                   model.model.embed_tokens(ids) * math.sqrt(cfg.d_model))


# ---- BHyT -----------------------------------------------------------------------------------------------


def test_bhyt_star_is_gamma_tanh_lambda_x_over_kappa_times_rms():
    x = x64(3, D)
    norm = _randomise(BHyT(D, lambda0=2.0, kappa=10.0).double())
    expected = norm.weight * torch.tanh(norm.lam * x / (10.0 * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    torch.testing.assert_close(norm(x), expected, **TIGHT)


def test_bhyt_given_a_mean_square_uses_it_instead_of_computing_one():
    x, ms = x64(3, D), torch.rand(3, 1, dtype=torch.float64) + 0.5
    norm = _randomise(BHyT(D, lambda0=2.0, kappa=10.0).double())
    expected = norm.weight * torch.tanh(norm.lam * x / (10.0 * torch.sqrt(ms + 1e-6)))
    torch.testing.assert_close(norm(x, ms), expected, **TIGHT)


@pytest.mark.parametrize("lam", [1e-4, 1e-6, 1e-8])
def test_bhyt_star_with_vanishing_lambda_over_kappa_is_linear_in_x_hat(lam):
    x = x64(3, D)
    norm = BHyT(D, lambda0=lam, kappa=10.0).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x_hat = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    z = norm.lam.item() / 10.0  # lambda went through float32 at construction: use the stored value
    # tanh(z x_hat) = z x_hat (1 - (z x_hat)^2/3 + ...): the relative error is ~ z^2 |x_hat|^2 / 3.
    tol = max(z**2 * x_hat.abs().max().item() ** 2, 1e-14)
    torch.testing.assert_close(norm(x) / z, norm.weight * x_hat, atol=tol, rtol=tol)
    # ... and the remaining error is the cubic term of tanh: it shrinks like (lambda/kappa)^2.
    cubic = norm.weight * (norm(x) / (norm.weight * z) - x_hat)
    torch.testing.assert_close(cubic, -norm.weight * z**2 * x_hat**3 / 3, atol=1e-14 + tol * z**2, rtol=1e-3)


def test_bhyt_preset_final_norm_is_a_plain_rmsnorm_and_the_layers_start_at_lambda_2_and_1():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny"))
    assert type(model.model.norm) is RMSNorm  # lambda_final = 0
    for layer in model.model.layers:
        assert isinstance(layer, BHyTParallelLayer)
        assert layer.attn.norm_in.lam.item() == 2.0 and layer.mlp.norm_in.lam.item() == 1.0
        assert layer.attn.norm_in.kappa == 10.0
    with_final = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny", bhyt_lambda_final=0.5))
    assert isinstance(with_final.model.norm, BHyT) and with_final.model.norm.lam.item() == 0.5


def _reference_gain(wv, wo, n_heads, T):
    """c = ||W_O W_V_expanded||_F^2 / (T d): query head h reads KV head h // (n_heads / n_kv)."""
    d = wo.shape[0]
    hd = wo.shape[1] // n_heads
    group = n_heads // (wv.shape[0] // hd)
    expanded = torch.cat([wv[(h // group) * hd:(h // group + 1) * hd] for h in range(n_heads)])
    return (wo @ expanded).pow(2).sum() / (T * d)


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 2), (8, 1)])
def test_attention_output_gain_is_frobenius_norm_of_wo_times_expanded_wv_squared_over_t_d(n_heads, n_kv):
    d, hd, T = 32, 4, 50
    wv = torch.randn(n_kv * hd, d, dtype=torch.float64)
    wo = torch.randn(d, n_heads * hd, dtype=torch.float64)
    torch.testing.assert_close(attention_output_gain(wv, wo, n_heads, T), _reference_gain(wv, wo, n_heads, T), **TIGHT)


def test_attention_output_gain_groups_heads_exactly_as_the_attention_does():
    # A one-token sequence attends only to itself, so Attn(x) = M x with M = W_O W_V_expanded for whatever head
    # grouping the attention really uses. Read M off the basis vectors: ||M||_F^2 / d must be c at T = 1.
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny", n_kv_heads=2)).double()
    attn = model.model.layers[0].attn.fn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
        d = attn.o_proj.weight.shape[0]
        M = attn(torch.eye(d, dtype=torch.float64)[:, None, :], _ctx(1)).squeeze(1).T  # column i = Attn(e_i)
    expected = M.pow(2).sum() / d
    torch.testing.assert_close(attention_output_gain(attn.v_proj.weight, attn.o_proj.weight, 4, 1), expected, **TIGHT)


def test_approximate_mean_square_adds_c_lambda_squared_over_kappa_squared_with_lambda_detached():
    ms = torch.rand(2, 3, 1, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.37, dtype=torch.float64)
    out = approximate_mean_square(ms, c, lam, 10.0)
    torch.testing.assert_close(out, ms + 0.37 * 2.5**2 / 100.0, **TIGHT)
    out.sum().backward()
    assert lam.grad is None  # lambda_in is detached in the approximation
    torch.testing.assert_close(ms.grad, torch.ones_like(ms), **EXACT)


def _bhyt_parallel_layer(**overrides):
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny", n_kv_heads=2, **overrides)).double().eval()
    layer = model.model.layers[1]
    with torch.no_grad():  # away from init: random gains and lambdas, large v/o so that a is not negligible
        for norm in (layer.attn.norm_in, layer.mlp.norm_in):
            norm.weight.uniform_(0.5, 1.5)
        layer.attn.norm_in.lam.fill_(2.7)
        layer.mlp.norm_in.lam.fill_(1.3)
        layer.attn.fn.v_proj.weight.normal_(0, 0.3)
        layer.attn.fn.o_proj.weight.normal_(0, 0.3)
    return layer


def _reference_bhyt_block(layer, x, ctx, c):
    """BHyT's parallel block in its five steps, with the attention and MLP as black boxes."""
    attn, mlp = layer.attn, layer.mlp
    kappa = 10.0
    v = x.pow(2).mean(-1, keepdim=True)  # 1. the only exact statistic
    r1 = (v + 1e-6).rsqrt() / kappa
    a = attn.fn(attn.norm_in.weight * torch.tanh(attn.norm_in.lam * r1 * x), ctx)  # 2.
    v_hat = v + c * attn.norm_in.lam**2 / kappa**2  # 3.
    r2 = (v_hat + 1e-6).rsqrt() / kappa
    h = x + a  # 4.
    return h + mlp.fn(mlp.norm_in.weight * torch.tanh(mlp.norm_in.lam * r2 * h), ctx)  # 5.


def test_bhyt_parallel_layer_matches_the_papers_block_computation():
    layer = _bhyt_parallel_layer()
    assert isinstance(layer, BHyTParallelLayer)
    T = 9
    x, ctx = x64(2, T, 128), _ctx(T)
    with torch.no_grad():
        layer.refresh_attention_gain(T)
        out = layer(x, ctx)
        c = _reference_gain(layer.attn.fn.v_proj.weight, layer.attn.fn.o_proj.weight, 4, T)
        torch.testing.assert_close(layer.attn_gain, c, **TIGHT)
        torch.testing.assert_close(out, _reference_bhyt_block(layer, x, ctx, c), **TIGHT)
        # The test discriminates: the exact second statistic (BHyT*) gives a visibly different output.
        a = layer.attn(x, ctx) - x
        exact_ms = (x + a).pow(2).mean(-1, keepdim=True)
        assert not torch.allclose(exact_ms, x.pow(2).mean(-1, keepdim=True) + c * 2.7**2 / 100, rtol=1e-3)


def test_bhyt_parallel_gain_at_the_first_forward_uses_max_seq_len_not_that_forwards_length():
    short, long = _bhyt_parallel_layer(), _bhyt_parallel_layer()
    long.load_state_dict(short.state_dict())
    assert torch.isnan(short.attn_gain)
    with torch.no_grad():
        short(x64(2, 5, 128), _ctx(5))
        long(x64(2, 9, 128), _ctx(9))
    v, o = short.attn.fn.v_proj.weight, short.attn.fn.o_proj.weight
    torch.testing.assert_close(short.attn_gain, _reference_gain(v, o, 4, 256), **TIGHT)  # tiny max_seq_len = 256
    torch.testing.assert_close(long.attn_gain, short.attn_gain, **EXACT)


def test_bhyt_parallel_gain_is_kept_until_refreshed_then_follows_the_current_weights():
    layer = _bhyt_parallel_layer()
    x, ctx = x64(2, 9, 128), _ctx(9)
    with torch.no_grad():
        layer(x, ctx)
        c_first = layer.attn_gain.clone()
        layer.attn.fn.v_proj.weight.mul_(3.0)
        layer(x, ctx)
        torch.testing.assert_close(layer.attn_gain, c_first, **EXACT)  # a forward never recomputes c
        refresh_attention_gains(layer, 64)
    v, o = layer.attn.fn.v_proj.weight, layer.attn.fn.o_proj.weight
    torch.testing.assert_close(layer.attn_gain, _reference_gain(v, o, 4, 64), **TIGHT)
    torch.testing.assert_close(layer.attn_gain, c_first * 9 * 256 / 64, **TIGHT)  # W_V x 3, T 256 -> 64


def test_bhyt_parallel_gain_loaded_from_a_state_dict_is_kept():
    trained, loaded = _bhyt_parallel_layer(), _bhyt_parallel_layer()
    with torch.no_grad():
        trained.refresh_attention_gain(64)
    loaded.load_state_dict(trained.state_dict())  # the `attn_gain` key of every saved checkpoint
    with torch.no_grad():
        loaded(x64(2, 9, 128), _ctx(9))
    torch.testing.assert_close(loaded.attn_gain, trained.attn_gain, **EXACT)


def test_bhyt_approximate_variance_tracks_the_exact_one_at_init():
    """At init, v + c lambda_in^2 / kappa^2 is within about 10% of the exact mean_d((h + a)^2).

    Measured at tiny size (seed 0, batch 4 x 64 tokens, float64): mean over tokens of approx/exact is
    0.982, 0.981, 0.978, 0.968 for layers 0-3 (per token 0.77-1.06; the low end is the first positions,
    where attention does not average). The bound holds mostly because a is small next to h at init:
    c lambda^2/kappa^2 itself underestimates mean_d(a^2) by roughly the harmonic number H_T (about 5x at
    T = 64) since causal attention at init averages t values at position t, not T.
    """
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt", "tiny")).double().eval()
    refresh_attention_gains(model, 64)  # T = the sequence length, as the trainer sets it
    with torch.no_grad(), capture(model, ["model.layers.*.attn.hook_in", "model.layers.*.attn.hook_out"]) as seen:
        model(torch.randint(0, 256, (4, 64)))
    ratios = []
    for layer in model.model.layers:
        h, a = (seen[f"model.layers.{layer.layer_idx}.attn.{point}"] for point in ("hook_in", "hook_out"))
        norm = layer.attn.norm_in
        approx = approximate_mean_square(h.pow(2).mean(-1, keepdim=True), layer.attn_gain, norm.lam, norm.kappa)
        ratios.append((approx / (h + a).pow(2).mean(-1, keepdim=True)).mean().item())
    assert all(0.9 < r < 1.1 for r in ratios), ratios


def test_bhyt_star_layer_uses_the_exact_rms_at_both_norms():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("bhyt-star", "tiny")).double().eval()
    layer = model.model.layers[1]
    assert type(layer) is Layer and isinstance(layer.mlp.norm_in, BHyT)
    with torch.no_grad():
        for norm in (layer.attn.norm_in, layer.mlp.norm_in):
            norm.weight.uniform_(0.5, 1.5)
        x, ctx = x64(2, 9, 128), _ctx(9)

        def bhyt(norm, y):
            return norm.weight * torch.tanh(norm.lam * y / (10.0 * torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)))

        h = x + layer.attn.fn(bhyt(layer.attn.norm_in, x), ctx)
        torch.testing.assert_close(layer(x, ctx), h + layer.mlp.fn(bhyt(layer.mlp.norm_in, h), ctx), **TIGHT)


# ---- FakeLN / frozen-scale LN ----------------------------------------------------------------------------


def test_frozen_scale_norm_is_gamma_times_centred_x_over_fixed_sigma_plus_beta():
    x = x64(3, D)
    norm = _randomise(FrozenScaleNorm(D, sigma=2.5).double())
    torch.testing.assert_close(norm(x), norm.weight * (x - x.mean(-1, keepdim=True)) / 2.5 + norm.bias, **TIGHT)
    assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]  # sigma is not learned...
    assert "sigma" in norm.state_dict()  # ... but saved with the model


def test_frozen_scale_norm_is_affine_so_f_minus_f_of_zero_is_linear():
    x, y = x64(3, D), x64(3, D)
    norm = _randomise(FrozenScaleNorm(D, sigma=0.7).double())
    zero = norm(torch.zeros_like(x))
    torch.testing.assert_close(zero, norm.bias.expand_as(x), **TIGHT)
    for a, b in [(2.0, -3.0), (0.5, 0.25), (-1.0, 7.0)]:
        torch.testing.assert_close(norm(a * x + b * y) - zero, a * (norm(x) - zero) + b * (norm(y) - zero), **TIGHT)
    # LayerNorm, by contrast, is not affine (it divides by a per-token statistic).
    ln = _randomise(LayerNorm(D).double())
    ln_zero = ln(torch.zeros_like(x))
    assert not torch.allclose(ln(2 * x - 3 * y) - ln_zero, 2 * (ln(x) - ln_zero) - 3 * (ln(y) - ln_zero))


# ---- registry ---------------------------------------------------------------------------------------------------


def test_unknown_norm_raises_value_error_listing_the_valid_norms():
    with pytest.raises(ValueError, match=r"ModelConfig\.norm='groupnorm' is not a known norm; "
                                         r"valid: bhyt, crmsnorm, dyt, fakeln, frozen, identity, layernorm, "
                                         r"powernorm, prepbn, "
                                         r"rmsnorm, seednorm, ssrmsnorm, un$"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", norm="groupnorm")
