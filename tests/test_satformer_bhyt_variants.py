"""SATFormer's across-head gates (softmax, softmax_sigmoid) and BHyT's other variance approximations (beta, eta,
residual_aware) and exact first layers: their formulas and inits in float64, and the round trips every preset
gets (KV cache holds V', cached decoding equals the full forward, HF save/load, torch.compile fullgraph)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import greedy_without_cache, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.errors import UserError
from layerwise.nn.attention import ForwardContext, rope_cos_sin
from layerwise.nn.block import BHyTParallelLayer
from layerwise.nn.norms import (BetaVarianceApproximation, EtaVarianceApproximation,
                                ResidualAwareVarianceApproximation, attention_output_gain)
from layerwise.nn.value_residual import SATFormer, softmax_gate, softmax_sigmoid_gate

TIGHT = dict(atol=1e-12, rtol=1e-12)
SATFORMER_PRESETS = ["satformer-softmax", "satformer-softmax-sigmoid"]
BHYT_PRESETS = ["bhyt-beta", "bhyt-eta", "bhyt-residual-aware"]


# ---- SATFormer gates ----------------------------------------------------------------------------------------------

def test_softmax_gate_is_h_kv_times_the_softmax_over_kv_heads_and_averages_one():
    z = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = 4 * z.exp() / z.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(softmax_gate(z), expected, **TIGHT)
    torch.testing.assert_close(softmax_gate(z).mean(-1), torch.ones(2, 5, dtype=torch.float64), **TIGHT)
    # Equal logits share V_1 equally: every head gets exactly 1.
    torch.testing.assert_close(softmax_gate(torch.zeros(3, 4, dtype=torch.float64)),
                               torch.ones(3, 4, dtype=torch.float64), **TIGHT)


def test_softmax_sigmoid_gate_is_the_softmax_gate_times_each_heads_sigmoid():
    z = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = 4 * z.exp() / z.exp().sum(-1, keepdim=True) / (1 + (-z).exp())
    torch.testing.assert_close(softmax_sigmoid_gate(z), expected, **TIGHT)
    assert (softmax_sigmoid_gate(z) < softmax_gate(z)).all()  # the sigmoid only closes gates


@pytest.mark.parametrize("gate, fn", [("softmax", softmax_gate), ("softmax_sigmoid", softmax_sigmoid_gate)])
def test_satformer_mix_adds_the_gated_first_layer_values_per_token_and_kv_head(gate, fn):
    cfg = ModelConfig.from_preset("satformer", "tiny", value_residual_gate=gate, n_kv_heads=2)
    mix = SATFormer(cfg).double()
    with torch.no_grad():
        for g in mix.gates:
            g.weight.normal_(0, 0.5)
    x = torch.randn(2, 6, 128, dtype=torch.float64)
    v, v_first = (torch.randn(2, 6, 2, 32, dtype=torch.float64) for _ in range(2))
    logits = x @ mix.gates[1].weight.T  # layer 2 reads the second gate
    expected = v + fn(logits)[..., None] * v_first
    torch.testing.assert_close(mix.mix(2, v, v_first, x), expected, **TIGHT)


@pytest.mark.parametrize("name", SATFORMER_PRESETS)
def test_satformer_gate_init_is_normal_with_init_std_and_no_bias(name):
    torch.manual_seed(0)
    model = LayerwiseForCausalLM(ModelConfig.from_preset(name, "124m", n_layers=4))
    weights = torch.cat([g.weight.flatten() for g in model.model.value_residual.gates])
    assert all(g.bias is None for g in model.model.value_residual.gates)
    assert weights.numel() == 3 * 12 * 768
    assert abs(weights.std().item() - 0.02) < 0.0005 and abs(weights.mean().item()) < 0.0005


@pytest.mark.parametrize("gate", ["softmax", "softmax_sigmoid"])
def test_an_across_head_gate_with_one_kv_head_is_refused_naming_the_field(gate):
    with pytest.raises(UserError, match=rf"^ModelConfig\.value_residual_gate='{gate}' normalises across KV heads"):
        ModelConfig.from_preset("satformer", "tiny", value_residual_gate=gate, n_kv_heads=1)


def _values_into_attention(model, ids):
    """The normed input each attention reads, captured with forward pre-hooks."""
    seen = {}
    handles = [layer.attn.fn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out.past_key_values


@pytest.mark.parametrize("name, fn", [("satformer-softmax", softmax_gate),
                                      ("satformer-softmax-sigmoid", softmax_sigmoid_gate)])
def test_the_kv_cache_holds_the_mixed_values(name, fn):
    model = tiny_model(name, dtype=torch.float64, n_kv_heads=2)
    with torch.no_grad():
        for g in model.model.value_residual.gates:
            g.weight.normal_(0, 0.5)
    ids = torch.randint(0, 256, (2, 7))
    inputs, cache = _values_into_attention(model, ids)
    layers = model.model.layers

    def raw_values(i):
        return layers[i].attn.fn.v_proj(inputs[i]).view(2, 7, 2, 32)

    v_first = raw_values(0)
    torch.testing.assert_close(cache.layers[0].values, v_first.transpose(1, 2), **TIGHT)
    for i in range(1, 4):
        gate = fn(model.model.value_residual.gates[i - 1](inputs[i]))
        mixed = raw_values(i) + gate[..., None] * v_first
        torch.testing.assert_close(cache.layers[i].values, mixed.transpose(1, 2), **TIGHT)
        assert not torch.allclose(cache.layers[i].values, raw_values(i).transpose(1, 2))


@pytest.mark.parametrize("name", SATFORMER_PRESETS + BHYT_PRESETS)
def test_token_by_token_decoding_with_the_cache_equals_the_full_forward(name):
    model = tiny_model(name, dtype=torch.float64)
    if name.startswith("satformer"):
        with torch.no_grad():
            for g in model.model.value_residual.gates:
                g.weight.normal_(0, 0.5)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TIGHT)



@pytest.mark.parametrize("name", SATFORMER_PRESETS + BHYT_PRESETS)
def test_cached_generate_equals_greedy_full_forwards(name):
    model = tiny_model(name)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharpen random logits so greedy choices are not rounding noise
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 10))


@pytest.mark.parametrize("name", SATFORMER_PRESETS + BHYT_PRESETS)
def test_compiles_fullgraph_and_matches_eager(name):
    model = tiny_model(name)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        eager = model(ids).logits  # BHyT fixes c on the first forward, outside the compiled graph
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


# ---- BHyT variance approximations ---------------------------------------------------------------------------------

def _randomised(approximation):
    with torch.no_grad():
        for p in approximation.parameters():
            p.uniform_(-0.5, 1.5)
    return approximation.double()


def test_beta_scales_the_attention_term():
    approx = _randomised(BetaVarianceApproximation())
    ms, c = torch.rand(2, 3, 1, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    lam = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    out = approx(ms, c, lam, 10.0)
    torch.testing.assert_close(out, ms + approx.beta * 0.37 * 2.5**2 / 100, **TIGHT)
    out.sum().backward()
    assert lam.grad is None and approx.beta.grad is not None  # lambda_in detached, beta trained


def test_eta_scales_the_input_mean_square_and_ignores_c():
    approx = _randomised(EtaVarianceApproximation())
    ms = torch.rand(2, 3, 1, dtype=torch.float64)
    lam = torch.tensor([2.5], dtype=torch.float64)
    out = approx(ms, torch.tensor(0.37, dtype=torch.float64), lam, 10.0)
    torch.testing.assert_close(out, ms * (1 + approx.eta), **TIGHT)
    torch.testing.assert_close(approx(ms, torch.tensor(5.0, dtype=torch.float64), lam, 10.0), out, **TIGHT)


def test_residual_aware_scales_both_terms():
    approx = _randomised(ResidualAwareVarianceApproximation())
    ms, c = torch.rand(2, 3, 1, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    lam = torch.tensor([2.5], dtype=torch.float64, requires_grad=True)
    out = approx(ms, c, lam, 10.0)
    torch.testing.assert_close(out, ms * (1 + approx.beta) + approx.alpha * 0.37 * 2.5**2 / 100, **TIGHT)
    out.sum().backward()
    assert lam.grad is None


@pytest.mark.parametrize("name", ["bhyt-beta", "bhyt-residual-aware"])
def test_beta_and_residual_aware_start_as_the_default_approximation(name):
    """Their released inits (beta 1; alpha 1, beta 0) make the first forward identical to the `bhyt` preset's."""
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(name, dtype=torch.float64)(ids).logits,
                                   tiny_model("bhyt", dtype=torch.float64)(ids).logits, atol=0, rtol=0)


def test_the_inits_are_the_released_codes():
    beta = tiny_model("bhyt-beta").model.layers
    eta = tiny_model("bhyt-eta").model.layers
    aware = tiny_model("bhyt-residual-aware").model.layers
    for b, e, a in zip(beta, eta, aware):
        assert b.variance_approximation.beta.tolist() == [1.0] and e.variance_approximation.eta.tolist() == [0.0]
        assert a.variance_approximation.alpha.tolist() == [1.0] and a.variance_approximation.beta.tolist() == [0.0]


def _layer_with_large_attention(model, index):
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.attn.fn.v_proj.weight.normal_(0, 0.3)
        layer.attn.fn.o_proj.weight.normal_(0, 0.3)
        layer.attn.norm_in.lam.fill_(2.7)
        layer.mlp.norm_in.lam.fill_(1.3)
        for p in layer.variance_approximation.parameters() if layer.variance_approximation is not None else ():
            p.uniform_(0.2, 0.8)
    return layer


def _ctx(T):
    return ForwardContext(rope=rope_cos_sin(torch.arange(T)[None], 32, 10000.0))


def _reference_block(layer, x, ctx, ms_hat_of):
    """BHyT's parallel block with the MLP-input mean square given by `ms_hat_of(v, h_plus_a)`."""
    attn, mlp = layer.attn, layer.mlp
    v = x.pow(2).mean(-1, keepdim=True)
    a = attn.fn(attn.norm_in.weight * torch.tanh(attn.norm_in.lam * x / (10 * (v + 1e-6).sqrt())), ctx)
    h = x + a
    r2 = 1 / (10 * (ms_hat_of(v, h) + 1e-6).sqrt())
    return h + mlp.fn(mlp.norm_in.weight * torch.tanh(mlp.norm_in.lam * r2 * h), ctx)


@pytest.mark.parametrize("name", BHYT_PRESETS)
def test_each_approximation_drives_the_parallel_block(name):
    model = tiny_model(name, dtype=torch.float64, n_kv_heads=2)
    layer = _layer_with_large_attention(model, 1)
    T = 9
    x, ctx = torch.randn(2, T, 128, dtype=torch.float64), _ctx(T)
    with torch.no_grad():
        layer.refresh_attention_gain(T)
        c = attention_output_gain(layer.attn.fn.v_proj.weight, layer.attn.fn.o_proj.weight, 4, T)
        term = c * 2.7**2 / 100
        p = layer.variance_approximation
        formula = {"bhyt-beta": lambda v, h: v + p.beta * term, "bhyt-eta": lambda v, h: v * (1 + p.eta),
                   "bhyt-residual-aware": lambda v, h: v * (1 + p.beta) + p.alpha * term}[name]
        torch.testing.assert_close(layer(x, ctx), _reference_block(layer, x, ctx, formula), **TIGHT)
        # ... and not the default's: the learnable scalars change the output.
        default = _reference_block(layer, x, ctx, lambda v, h: v + term)
        assert not torch.allclose(layer(x, ctx), default, atol=1e-6)


def test_exact_layers_use_the_exact_mean_square_of_h_plus_a_and_the_rest_approximate():
    model = tiny_model("bhyt-beta", dtype=torch.float64, bhyt_var_approx_exact_layers=2)
    assert [layer.variance_approximation is None for layer in model.model.layers] == [True, True, False, False]
    assert not any(name.startswith(("model.layers.0.", "model.layers.1.")) and "variance" in name
                   for name, _ in model.named_parameters())  # no unused parameters in the exact layers
    layer = _layer_with_large_attention(model, 1)
    x, ctx = torch.randn(2, 9, 128, dtype=torch.float64), _ctx(9)
    with torch.no_grad():
        exact = _reference_block(layer, x, ctx, lambda v, h: h.pow(2).mean(-1, keepdim=True))
        torch.testing.assert_close(layer(x, ctx), exact, **TIGHT)


def test_exact_layers_follow_the_layer_origin_so_a_dropped_layer_keeps_its_rule():
    cfg = ModelConfig.from_preset("bhyt", "tiny", n_layers=3, layer_origin=[0, 2, 3], bhyt_var_approx_exact_layers=2)
    model = LayerwiseForCausalLM(cfg)
    assert [layer.variance_approximation is None for layer in model.model.layers] == [True, False, False]


def test_all_layers_exact_equals_bhyt_star():
    ids = torch.randint(0, 256, (2, 9))
    exact = tiny_model("bhyt", dtype=torch.float64, bhyt_var_approx_exact_layers=4)
    star = tiny_model("bhyt-star", dtype=torch.float64)
    star.load_state_dict({k: v for k, v in exact.state_dict().items() if not k.endswith("attn_gain")})
    with torch.no_grad():
        torch.testing.assert_close(exact(ids).logits, star(ids).logits, **TIGHT)


@pytest.mark.parametrize("overrides, message", [
    (dict(bhyt_var_approx="gamma"), r"^ModelConfig\.bhyt_var_approx='gamma' is not a known BHyT variance "
                                    r"approximation; valid: baseline, beta, eta, residual_aware$"),
    (dict(bhyt_var_approx_exact_layers=5), r"^ModelConfig\.bhyt_var_approx_exact_layers=5 must be an integer in 0\.\.4"),
    (dict(bhyt_var_approx_exact_layers=-1), r"^ModelConfig\.bhyt_var_approx_exact_layers=-1 must be"),
    (dict(bhyt_exact=True, bhyt_var_approx="beta"), r"^ModelConfig\.bhyt_var_approx='beta' .* bhyt_exact=True"),
    (dict(bhyt_exact=True, bhyt_var_approx_exact_layers=1), r"^ModelConfig\.bhyt_var_approx_exact_layers=1 .*"),
])
def test_bad_bhyt_approximation_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_preset("bhyt", "tiny", **overrides)


def test_the_approximation_fields_warn_when_the_norm_is_not_bhyt():
    with pytest.warns(UserWarning, match=r"^ModelConfig\.bhyt_var_approx='eta' is read by norm bhyt"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", bhyt_var_approx="eta")


@pytest.mark.parametrize("name", BHYT_PRESETS + SATFORMER_PRESETS)
def test_save_then_auto_from_pretrained_keeps_the_learned_scalars_and_logits(name, tmp_path):
    model = tiny_model(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.numel() == 1:
                p.uniform_(0.2, 0.8)  # away from init, so a reload that reinitialised them would show
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.bhyt_var_approx == model.config.bhyt_var_approx
    assert loaded.config.value_residual_gate == model.config.value_residual_gate
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_parallel_layers_are_still_the_bhyt_layer_class():
    for name in BHYT_PRESETS:
        assert all(isinstance(layer, BHyTParallelLayer) for layer in tiny_model(name).model.layers)


@pytest.mark.parametrize("name", BHYT_PRESETS + SATFORMER_PRESETS)
def test_fold_norms_keeps_the_logits(name):
    """The norm gains fold into every linear that reads them, SATFormer's gate projections included."""
    from layerwise.transform import apply

    model = tiny_model(name, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module_name, p in model.named_parameters():
            if "norm" in module_name and module_name.endswith(".weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            elif module_name.endswith(".weight") and ".gates." in module_name:
                p.normal_(0, 0.5, generator=generator)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        folded = apply(model, ["fold-norms"])
        after = folded(ids).logits
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-10
