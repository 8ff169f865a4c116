"""fold-norms, pre-rmsnorm and pre-crmsnorm compute the same logits as the model they rewrite (float64), also
after save and reload, and refuse what they cannot convert exactly, saying why."""

import copy

import pytest
import torch
from conftest import HF_FAMILIES, hf_model, tiny_model
from transformers import AutoModelForCausalLM

import layerwise  # noqa: F401  (registers the layerwise model with the Auto classes)
from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.arch import model_map
from layerwise.errors import UserError
from layerwise.nn.hooks import capture
from layerwise.nn.norms import CRMSNorm, RMSNorm
from layerwise.transform import apply
from layerwise.transform.norms import fold_norms, pre_crmsnorm, pre_rmsnorm

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# Gemma's RMSNorms compute in float32 whatever the model's dtype (x.float(), 1 + weight.float()), so a gain
# moved out of the norm into a float64 linear changes the logits at float32 rounding, not at float64's.
FLOAT32_NORM_FAMILIES = {"gemma", "gemma2", "gemma3_text"}


def trained_looking(model):
    """Norm gains and biases and every projection bias drawn at random (fresh gains are ones and biases
    zeros, under which a fold that forgot them would still pass); Gemma's stored gain is the gain minus one."""
    offset = {id(site.norm): site.gain_offset for site in model_map(model).norms()}
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if id(module) in offset and isinstance(weight, torch.Tensor):
                weight.copy_(1 - offset[id(module)] + 0.5 * torch.randn(weight.shape, generator=generator))
            if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
                bias.copy_(0.2 * torch.randn(bias.shape, generator=generator))
    return model


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens % model.config.vocab_size).logits


def reloaded(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()


def assert_folded(model):
    for site in model_map(model).norms():
        weight = getattr(site.norm, "weight", None)
        if site.feeds == "linears" and weight is not None and getattr(type(site.norm), "affine_output", True):
            assert torch.equal(weight, torch.full_like(weight, 1 - site.gain_offset)), site.role


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_fold_norms_keeps_hf_logits_and_survives_save_and_reload(family, tmp_path):
    model = trained_looking(hf_model(family).double())
    before = logits(model)
    fold_norms(model)
    tolerance = 1e-5 if family in FLOAT32_NORM_FAMILIES else 1e-10
    assert relative(logits(model), before) < tolerance
    assert_folded(model)
    assert not model_map(model).tied_head  # the final norm's gain went into the head, not the embedding
    assert relative(logits(reloaded(model, tmp_path)), before) < tolerance


def test_fold_norms_keeps_gpt2_final_beta_in_the_norm_because_its_head_has_no_bias():
    model = trained_looking(hf_model("gpt2").double())
    final = model_map(model).final_norm.norm
    gamma, beta = final.weight.clone(), final.bias.clone()
    fold_norms(model)
    assert model.lm_head.bias is None and torch.allclose(final.bias, beta / gamma)
    assert all(torch.equal(site.norm.bias, torch.zeros_like(site.norm.bias))
               for layer in model_map(model).layers for site in layer.norms)  # their Conv1D readers took beta


def test_fold_norms_refuses_a_zero_gain_whose_bias_has_nowhere_to_go():
    model = trained_looking(hf_model("gpt2").double())
    with torch.no_grad():
        model_map(model).final_norm.norm.weight[3] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="final norm has a zero gain"):
        apply(model, ["fold-norms"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any fold


FOLDABLE_PRESETS = [
    ("pre-ln", {}), ("pre-ln", {"bias": True}), ("pre-rmsnorm", {}), ("pre-rmsnorm", {"qk_norm": True}),
    ("lns", {"norm": "layernorm"}), ("peri-ln", {"norm": "layernorm"}), ("post-ln", {}), ("mix-ln", {}),
    ("deepnorm", {}), ("dyt", {}), ("dyt", {"norm_bias": True}), ("bhyt", {}), ("bhyt-star", {}), ("seednorm", {}),
    ("block-attnres", {}), ("delta-attnres", {}), ("resformer", {}), ("satformer", {"norm": "layernorm"}),
    ("un", {}), ("powernorm", {}),
]


@pytest.mark.parametrize("preset,overrides", FOLDABLE_PRESETS)
def test_fold_norms_keeps_layerwise_logits_and_survives_save_and_reload(preset, overrides, tmp_path):
    model = trained_looking(tiny_model(preset, dtype=torch.float64, random_queries=True, **overrides))
    before = logits(model)
    model = apply(model, ["fold-norms"])
    assert relative(logits(model), before) < 1e-10
    assert_folded(model)
    assert model.config.layerwise_transforms == ["fold-norms"]
    assert relative(logits(reloaded(model, tmp_path)), before) < 1e-10


def test_fold_norms_gives_layerwise_readers_biases_through_the_config():
    model = trained_looking(tiny_model("pre-ln", dtype=torch.float64))
    fold_norms(model)
    assert model.config.bias and model.config.lm_head_bias and not model.config.tie_word_embeddings
    assert model.lm_head.bias is not None and model.lm_head.weight is not model.model.embed_tokens.weight


def test_lm_head_bias_builds_a_head_bias_that_starts_at_zero():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-ln", "tiny", lm_head_bias=True))
    assert torch.equal(model.lm_head.bias, torch.zeros(model.config.vocab_size))


def test_crmsnorm_is_rmsnorm_of_the_zero_mean_vector_without_its_last_coordinate():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    full, compressed = RMSNorm(16, eps=1e-5).double(), CRMSNorm(15, eps=1e-5).double()
    assert torch.allclose(compressed(x[..., :-1]), full(x)[..., :-1], rtol=0, atol=1e-14)


CONVERTIBLE = [{}, {"bias": True}, {"norm_bias": False}, {"layernorm_scaling": True},
               {"value_residual": "resformer"}, {"value_residual": "satformer", "norm_bias": False},
               {"qk_norm": True, "tie_word_embeddings": False}, {"embedding_scale": True, "mlp": "swiglu"}]


@pytest.mark.parametrize("convert", [pre_rmsnorm, pre_crmsnorm], ids=["pre-rmsnorm", "pre-crmsnorm"])
@pytest.mark.parametrize("overrides", CONVERTIBLE, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "pre-ln")
def test_conversion_keeps_logits_saved_reloaded_and_cached(convert, overrides, tmp_path):
    original = trained_looking(tiny_model("pre-ln", dtype=torch.float64, **overrides))
    before = logits(original)
    converted = convert(copy.deepcopy(original)).eval()
    assert relative(logits(converted), before) < 1e-10
    assert relative(logits(reloaded(converted, tmp_path)), before) < 1e-10
    prompt = TOKENS[:1, :4]
    with torch.no_grad():
        want = original.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
        got = converted.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(got, want)
    cfg = converted.config
    assert cfg.norm == ("rmsnorm" if convert is pre_rmsnorm else "crmsnorm") and not cfg.tie_word_embeddings
    assert cfg.lm_head_bias == original.config.norm_bias


def test_pre_rmsnorm_leaves_a_zero_mean_stream():
    converted = pre_rmsnorm(trained_looking(tiny_model("pre-ln", dtype=torch.float64, bias=True)))
    with capture(converted, ["model.layers.*.attn.hook_in", "model.layers.*.mlp.hook_in",
                             "model.hook_final_norm_in"]) as cache:
        logits(converted)
    assert len(cache) == 2 * converted.config.n_layers + 1
    for name in cache:
        stream = cache[name]
        assert stream.mean(-1).abs().max() < 1e-12 * stream.abs().max(), name


def test_pre_crmsnorm_is_one_coordinate_narrower_with_inner_widths_kept():
    original = tiny_model("pre-ln", dtype=torch.float64)
    d, head_dim, d_ff = original.config.d_model, original.config.head_dim, original.config.d_ff
    converted = apply(original, ["pre-crmsnorm"])
    cfg = converted.config
    assert (cfg.d_model, cfg.head_dim, cfg.d_ff) == (d - 1, head_dim, d_ff)
    assert converted.model.embed_tokens.weight.shape[1] == d - 1
    assert cfg.layerwise_transforms == ["pre-crmsnorm"]


@pytest.mark.parametrize("model,reason", [
    (lambda: tiny_model("pre-rmsnorm"), "needs a LayerNorm model"),
    (lambda: tiny_model("post-ln", norm="layernorm"), "needs Pre-LN"),
    (lambda: tiny_model("peri-ln", norm="layernorm", embedding_norm=False), "needs Pre-LN"),
    (lambda: tiny_model("pre-ln", embedding_norm=True), "embedding norm"),
    (lambda: tiny_model("block-attnres", norm="layernorm"), "residual='block_attnres' does not make the stream"),
    (lambda: tiny_model("delta-attnres", norm="layernorm"), "residual='delta_attnres'"),
    (lambda: tiny_model("satformer", norm="layernorm"), "SATFormer gate"),
    (lambda: hf_model("llama"), "converts layerwise Pre-LN models and HF GPT-2; this is a 'llama' model"),
    (lambda: hf_model("gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
], ids=["rmsnorm", "post", "peri", "embedding-norm", "block-attnres", "delta-attnres", "satformer-beta", "llama",
        "gpt2-scaled-by-layer"])
@pytest.mark.parametrize("step", ["pre-rmsnorm", "pre-crmsnorm"])
def test_conversion_refuses_with_the_reason(model, reason, step):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UserError, match=reason):
        apply(m, [step])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # refused before touching it


@pytest.mark.parametrize("step", ["pre-rmsnorm", "pre-crmsnorm"])
def test_hf_gpt2_converts_exactly_through_its_layerwise_form(step, tmp_path):
    """GPT-2 has no RMSNorm, so its converted form is a layerwise model; its learned position table writes into
    the stream and is recentred (and compressed) like the token embedding."""
    original = hf_model("gpt2").to(torch.float64).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    before = logits(original)
    converted = apply(copy.deepcopy(original), [step]).eval()
    assert isinstance(converted, LayerwiseForCausalLM) and converted.config.position_embedding == "learned"
    assert converted.config.norm == step.removeprefix("pre-")
    assert relative(logits(converted), before) < 1e-10
    assert relative(logits(reloaded(converted, tmp_path)), before) < 1e-10
    table = converted.model.position_embedding.weight
    if step == "pre-rmsnorm":
        assert table.mean(-1).abs().max() < 1e-12 * table.abs().max()
    else:
        assert table.shape[1] == original.config.n_embd - 1
