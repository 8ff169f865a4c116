"""Single-Scale RMSNorm (Park et al., ACL 2025, Outlier-Safe Pre-Training) and the scale-vector add-ons of
Wang et al. (arXiv 2605.26895), checked in float64 against the papers' formulas."""

import pytest
import torch
from conftest import greedy_without_cache, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.initialization import Constant, init_of
from layerwise.nn.norms import RMSNorm, SingleScaleRMSNorm

TIGHT = dict(atol=1e-12, rtol=1e-12)
D = 16


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64) * 3 + 0.5


def test_ssrmsnorm_is_one_scalar_times_the_rms_normalised_input():
    torch.manual_seed(0)
    norm = SingleScaleRMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.fill_(-1.7)
    x = x64(3, 5, D)
    expected = -1.7 * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    assert norm.weight.shape == (1,)


def test_ssrmsnorm_model_has_one_scalar_gain_per_norm_initialised_to_one():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("ssrmsnorm", "tiny"))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    # Every pre-sublayer norm of the 4 layers plus the final norm is single-scale: no per-channel gain left.
    assert len(norms) == 2 * 4 + 1
    for norm in norms:
        assert isinstance(norm, SingleScaleRMSNorm)
        assert norm.weight.shape == (1,) and norm.weight.item() == 1.0
        assert init_of(norm) == Constant(1.0)


def test_ssrmsnorm_model_equals_the_rmsnorm_model_whose_gains_are_its_scalars_broadcast():
    torch.manual_seed(0)
    single, plain = (LayerwiseForCausalLM(ModelConfig.from_preset(name, "tiny")).double().eval()
                     for name in ("ssrmsnorm", "pre-rmsnorm"))
    with torch.no_grad():
        for norm in single.modules():
            if isinstance(norm, SingleScaleRMSNorm):
                norm.weight.uniform_(0.5, 2.0)
    plain.load_state_dict({k: v.expand_as(plain.state_dict()[k]) for k, v in single.state_dict().items()})
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(single(ids).logits, plain(ids).logits, **TIGHT)


def test_fold_norms_moves_the_single_scales_into_the_readers_with_the_same_logits():
    from layerwise.transform.norms import fold_norms

    torch.manual_seed(0)
    model = LayerwiseForCausalLM(ModelConfig.from_preset("ssrmsnorm", "tiny")).double().eval()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, SingleScaleRMSNorm):
                norm.weight.uniform_(0.5, 2.0)
    ids = torch.randint(0, 256, (2, 12))
    before = model(ids).logits
    folded = fold_norms(model)
    torch.testing.assert_close(folded(ids).logits, before, **TIGHT)
    assert all(n.weight.item() == 1.0 for n in folded.modules() if isinstance(n, SingleScaleRMSNorm))


def test_ssrmsnorm_cached_generate_equals_greedy_full_forwards():
    model = tiny_model("ssrmsnorm")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharp logits: greedy choices not decided by rounding noise
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 12))


def _decayed_names(model, weight_decay=0.1):
    from layerwise.train.optim import param_groups

    decayed = {id(p) for p in param_groups(model, weight_decay)[0]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in decayed}


def _norm_gains(model):
    return {name for name, p in model.named_parameters() if p.ndim == 1 and name.endswith("weight")
            and "proj" not in name}


def test_iwd_decays_the_input_norm_gains_and_no_output_norm_gain():
    # Peri-LN with QK-norm has every kind of norm: pre-sublayer, after-sublayer, embedding, final, Q/K.
    model = LayerwiseForCausalLM(ModelConfig.from_preset("peri-ln", "tiny", qk_norm=True, norm_gain_decay="input"))
    gains = _norm_gains(model)
    decayed = _decayed_names(model) & gains
    inputs = {f"model.layers.{i}.{s}.norm_in.weight" for i in range(4) for s in ("attn", "mlp")} | {"model.norm.weight"}
    assert decayed == inputs
    outputs = gains - decayed
    assert {n for n in outputs if "norm_out" in n} and "model.embedding_norm.weight" in outputs
    assert {n for n in outputs if "q_norm" in n or "k_norm" in n}


def test_without_iwd_no_norm_gain_is_decayed_and_the_matrices_still_are():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("peri-ln", "tiny", qk_norm=True))
    decayed = _decayed_names(model)
    assert not decayed & _norm_gains(model)
    assert "model.layers.0.attn.fn.q_proj.weight" in decayed


def test_iwd_keeps_the_norms_own_decayed_parameters():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("seednorm", "tiny", norm_gain_decay="input"))
    decayed = _decayed_names(model)
    assert {"model.layers.0.attn.norm_in.alpha", "model.layers.0.attn.norm_in.beta",
            "model.layers.0.attn.norm_in.weight"} <= decayed


def test_iwd_preset_changes_only_the_optimizer_not_the_function():
    torch.manual_seed(0)
    iwd, base = (LayerwiseForCausalLM(ModelConfig.from_preset(n, "tiny")).eval() for n in ("iwd", "pre-rmsnorm"))
    base.load_state_dict(iwd.state_dict())
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(iwd(ids).logits, base(ids).logits, atol=0, rtol=0)


def test_an_unknown_norm_gain_decay_names_the_field():
    with pytest.raises(ValueError, match=r"ModelConfig.norm_gain_decay='output' is not one of none, input"):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", norm_gain_decay="output")


# ---- HG: each reader of a pre-sublayer norm has its own gain ---------------------------------------------------

def _hg_and_folded(**overrides):
    """An HG model with random reader gains, and the pre-rmsnorm model with each gain folded into its W."""
    from layerwise.nn.norms import ReaderGainLinear

    torch.manual_seed(0)
    hg = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", heterogeneous_gains=True,
                                                      **overrides)).double().eval()
    with torch.no_grad():
        for linear in hg.modules():
            if isinstance(linear, ReaderGainLinear):
                linear.input_gain.uniform_(0.5, 2.0)
    plain = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", **overrides)).double().eval()
    state = {}
    for name, tensor in hg.state_dict().items():
        if name.endswith(".input_gain"):
            continue
        gain = hg.state_dict().get(name.replace(".weight", ".input_gain"))
        state[name] = tensor * gain[None, :] if name.endswith(".weight") and gain is not None else tensor
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(".norm_in.weight" in name for name in missing)  # they stay 1
    return hg, plain


def test_hg_gives_q_k_v_gate_and_up_their_own_gain_and_the_norms_none():
    from layerwise.nn.norms import GainFreeRMSNorm, ReaderGainLinear

    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", heterogeneous_gains=True))
    layer = model.model.layers[0]
    assert isinstance(layer.attn.norm_in, GainFreeRMSNorm) and isinstance(layer.mlp.norm_in, GainFreeRMSNorm)
    readers = [layer.attn.fn.q_proj, layer.attn.fn.k_proj, layer.attn.fn.v_proj, layer.mlp.fn.gate_proj,
               layer.mlp.fn.up_proj]
    assert all(isinstance(r, ReaderGainLinear) and torch.equal(r.input_gain, torch.ones(128)) for r in readers)
    assert len({id(r.input_gain) for r in readers}) == 5
    assert not isinstance(layer.attn.fn.o_proj, ReaderGainLinear) and not isinstance(layer.mlp.fn.down_proj,
                                                                                     ReaderGainLinear)
    assert model.model.norm.weight.shape == (128,)  # the final norm has one reader, the head: unchanged


@pytest.mark.parametrize("overrides", [{}, dict(norm_placement="peri"), dict(mlp="gelu", bias=True)])
def test_hg_equals_the_shared_gain_model_with_each_gain_folded_into_its_reader(overrides):
    hg, plain = _hg_and_folded(**overrides)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(hg(ids).logits, plain(ids).logits, **TIGHT)


def test_hg_gains_are_decayed_only_under_iwd():
    plain = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", heterogeneous_gains=True))
    iwd = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", heterogeneous_gains=True,
                                                       norm_gain_decay="input"))
    assert not {n for n in _decayed_names(plain) if n.endswith("input_gain")}
    gains = {n for n, _ in iwd.named_parameters() if n.endswith("input_gain")}
    assert len(gains) == 4 * 5 and gains <= _decayed_names(iwd)


def test_hg_cached_generate_equals_greedy_full_forwards():
    model = tiny_model("hg")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 12))


@pytest.mark.parametrize("overrides, match", [
    (dict(norm="layernorm"), r"heterogeneous_gains=True splits an RMSNorm's gain .* use norm='rmsnorm'"),
    (dict(norm_placement="post"), r"heterogeneous_gains=True .* norm_placement='post' does not have"),
    (dict(value_residual="satformer"), r"heterogeneous_gains=True would leave the satformer value residual"),
])
def test_hg_refuses_what_it_cannot_split(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", heterogeneous_gains=True, **overrides)


def test_hg_models_are_not_written_as_llama_nor_quantized():
    from layerwise.arch.state_dict import hf_config
    from layerwise.errors import UserError
    from layerwise.transform.quantize import check_quantizable, parse_bit_spec

    model = tiny_model("hg")
    with pytest.raises(UserError, match="heterogeneous_gains=True as llama"):
        hf_config(model.config, "llama")
    with pytest.raises(ValueError, match="heterogeneous_gains=True"):
        check_quantizable(model, parse_bit_spec("4"))
