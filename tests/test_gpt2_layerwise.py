"""GPT-2 as a layerwise model: the same logits, the same cached generation, and back to GPT-2 bit for bit."""

import pytest
import torch
import transformers
from conftest import hf_model, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.arch.gpt2 import gpt2_to_layerwise, layerwise_to_gpt2
from layerwise.errors import UserError
from layerwise.nn.initialization import Normal, init_of


def gpt2(dtype=torch.float64, **overrides) -> transformers.GPT2LMHeadModel:
    """The conftest GPT-2 with every parameter perturbed: at init its biases are zero and its norm gains one,
    so a bias or gain mapped to the wrong place would go unnoticed."""
    model = hf_model("gpt2", **overrides).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


TOKENS = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=False),
    dict(n_inner=48, activation_function="gelu", layer_norm_epsilon=1e-3),
    dict(activation_function="gelu_pytorch_tanh", reorder_and_upcast_attn=True),
])
def test_gpt2_and_its_layerwise_model_give_the_same_logits_in_float64(overrides):
    reference = gpt2(**overrides)
    model = gpt2_to_layerwise(reference)
    assert isinstance(model, LayerwiseForCausalLM)
    with torch.no_grad():
        assert relative_error(model(TOKENS).logits, reference(TOKENS).logits) < 1e-10


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gpt2_and_its_layerwise_model_give_the_same_logits_in_float32(attn_implementation):
    # Eager attention with reorder_and_upcast_attn is GPT-2's float32-scores path: the same math.
    reference = gpt2(torch.float32, reorder_and_upcast_attn=True)
    reference.set_attn_implementation(attn_implementation)
    model = gpt2_to_layerwise(reference)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert relative_error(model(TOKENS).logits, reference(TOKENS).logits) < 1e-5


def test_the_layerwise_model_owns_its_weights_and_ties_its_head():
    reference = gpt2()
    model = gpt2_to_layerwise(reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        reference.transformer.wte.weight.zero_()
    assert model.model.embed_tokens.weight.abs().sum() > 0


def test_cached_greedy_generation_equals_gpt2s_including_left_padding():
    reference = gpt2()
    model = gpt2_to_layerwise(reference)
    attention_mask = torch.ones_like(TOKENS)
    attention_mask[1, :5] = 0  # left padding: learned positions must count real tokens only, as GPT-2's do
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    expected = reference.generate(TOKENS, **kwargs)
    assert torch.equal(model.generate(TOKENS, **kwargs), expected)
    # Positions follow the cache offset: decoding one token at a time equals the full forward.
    with torch.no_grad():
        full = model(expected[:1]).logits[0, -1]
        cached = model(expected[:1, :-1], use_cache=True)
        step = model(expected[:1, -1:], past_key_values=cached.past_key_values).logits[0, -1]
    assert relative_error(step, full) < 1e-10


def test_a_layerwise_gpt2_saves_and_reloads_as_a_layerwise_model(tmp_path):
    model = gpt2_to_layerwise(gpt2())
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert isinstance(reloaded, LayerwiseForCausalLM)
    assert reloaded.config.position_embedding == "learned" and reloaded.config.mlp == "gelu_tanh"
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=False, n_inner=48)])
def test_gpt2_to_layerwise_and_back_is_bit_identical(overrides):
    reference = gpt2(**overrides)
    back = layerwise_to_gpt2(gpt2_to_layerwise(reference))
    assert isinstance(back, transformers.GPT2LMHeadModel)
    expected, actual = reference.state_dict(), back.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) and actual[k].dtype == expected[k].dtype for k in expected)
    for field in ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "activation_function",
                  "layer_norm_epsilon", "tie_word_embeddings", "vocab_size"):
        assert getattr(back.config, field) == getattr(reference.config, field), field
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, reference(TOKENS).logits)


@pytest.mark.parametrize("overrides, field", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(activation_function="relu"), "activation_function"),
])
def test_gpt2_configs_layerwise_cannot_express_are_refused_by_name(overrides, field):
    with pytest.raises(UserError, match=rf"^GPT2Config\.{field}="):
        gpt2_to_layerwise(hf_model("gpt2", **overrides))


GPT2_LIKE = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu_tanh", bias=True, position_embedding="learned")


@pytest.mark.parametrize("overrides, field", [
    (dict(norm="rmsnorm"), "norm"),
    (dict(position_embedding="rope"), "position_embedding"),
    (dict(bias=False), "bias"),
    (dict(mlp="swiglu"), "mlp"),
    (dict(n_kv_heads=2), "n_kv_heads"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(layernorm_scaling=True), "layernorm_scaling"),
])
def test_layerwise_models_that_are_not_gpt2_are_refused_by_name(overrides, field):
    model = tiny_model("pre-ln", **{**GPT2_LIKE, **overrides})
    with pytest.raises(UserError, match=rf"^ModelConfig\.{field}=.*cannot be saved as GPT-2"):
        layerwise_to_gpt2(model)


def test_a_gpt2_like_layerwise_model_converts_with_the_same_logits():
    model = tiny_model("pre-ln", dtype=torch.float64, **GPT2_LIKE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert relative_error(layerwise_to_gpt2(model)(TOKENS).logits, model(TOKENS).logits) < 1e-10


def test_learned_positions_are_drawn_like_the_embedding_and_allow_an_odd_head_dim():
    model = tiny_model("pre-ln", position_embedding="learned")
    assert init_of(model.model.position_embedding) == Normal(model.config.init_std)
    # Without RoPE nothing rotates pairs of dimensions, so head_dim may be odd (not so with RoPE).
    ModelConfig(d_model=36, n_heads=4, position_embedding="learned")
    with pytest.raises(UserError, match=r"^ModelConfig\.head_dim=9 is odd"):
        ModelConfig(d_model=36, n_heads=4)
    with pytest.warns(UserWarning, match="rope_theta"):
        ModelConfig(rope_theta=5e5, position_embedding="learned")


def test_learned_positions_are_not_weight_decayed_like_the_token_embedding():
    from layerwise.train.optim import param_groups

    model = tiny_model("pre-ln", position_embedding="learned")
    decayed, kept = param_groups(model, weight_decay=0.1)
    table = model.model.position_embedding.weight
    assert any(p is table for p in kept["params"]) and not any(p is table for p in decayed["params"])
