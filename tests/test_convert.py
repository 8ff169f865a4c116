"""`to-layerwise` / `to-hf`: Llama-family HF models as layerwise models with the same logits, and back."""

import importlib.util

import pytest
import torch
import transformers
from conftest import hf_model

from layerwise import LayerwiseForCausalLM
from layerwise.arch.state_dict import LLAMA_FAMILIES, from_hf, hf_to_layerwise, layerwise_to_hf, to_hf
from layerwise.errors import UserError
from layerwise.transform import apply


def perturbed(model):
    """Every tensor moved off its init (norm gains off 1, biases off 0), so a swapped or dropped tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


IDS = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_converted_family_computes_bit_identical_float32_logits(family):
    # Same ops in the same order on both sides (float32 RMSNorm statistics, float32 RoPE tables, SDPA with GQA).
    hf = perturbed(hf_model(family))
    converted = hf_to_layerwise(hf)
    assert isinstance(converted, LayerwiseForCausalLM) and converted.config.layerwise_hf_family == family
    assert torch.equal(logits(converted, IDS), logits(hf, IDS))


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_converted_family_in_float64_differs_only_by_hf_norms_float32_rounding(family):
    # HF's RMSNorm casts its input to float32 even in a float64 model; layerwise keeps float64.
    hf = perturbed(hf_model(family)).double()
    converted = hf_to_layerwise(hf)
    assert next(converted.parameters()).dtype == torch.float64
    assert relative(logits(converted, IDS), logits(hf, IDS)) < 1e-6


def _rms_norm_in_input_dtype(self, x):
    """HF's RMSNorm with its statistics in the input's dtype when that is float64, as layerwise computes them."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_converted_family_in_float64_is_exact_once_hf_norms_keep_float64(family, monkeypatch):
    # Pins that the float32 rounding in HF's norms is the whole float64 difference.
    hf = perturbed(hf_model(family)).double()
    for norm_class in {type(m) for m in hf.modules() if type(m).__name__.endswith("RMSNorm")}:
        monkeypatch.setattr(norm_class, "forward", _rms_norm_in_input_dtype)
    assert relative(logits(hf_to_layerwise(hf), IDS), logits(hf, IDS)) < 1e-10


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_round_trip_to_hf_restores_the_family_and_a_bit_identical_state_dict(family):
    hf = perturbed(hf_model(family))
    back = layerwise_to_hf(hf_to_layerwise(hf))
    assert type(back) is type(hf)
    before, after = hf.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_adapter_renames_every_key_both_ways():
    hf = hf_model("qwen3")  # QK-norm: the most keys
    renamed = from_hf(hf.state_dict())
    assert renamed.keys() == LayerwiseForCausalLM(hf_to_layerwise(hf).config).state_dict().keys()
    assert to_hf(renamed).keys() == hf.state_dict().keys()


def test_qwen3_head_dim_apart_from_width_and_tied_head_convert():
    hf = perturbed(hf_model("qwen3", head_dim=16, tie_word_embeddings=True))
    converted = hf_to_layerwise(hf)
    assert converted.config.head_dim == 16 and converted.config.d_model == 32
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    assert torch.equal(logits(converted, IDS), logits(hf, IDS))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_converted_cached_generate_equals_the_hf_models_greedy_tokens(family):
    hf = perturbed(hf_model(family))
    converted = hf_to_layerwise(hf)
    prompt = IDS[:1, :8]
    ours = converted.generate(prompt, max_new_tokens=12, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_converted_model_saves_and_reloads_with_identical_logits(tmp_path):
    converted = hf_to_layerwise(perturbed(hf_model("qwen2")))
    converted.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layerwise_hf_family == "qwen2" and loaded.config.qkv_bias
    assert torch.equal(logits(loaded, IDS), logits(converted, IDS))


def test_a_sliding_window_shorter_than_the_positions_caps_max_seq_len_with_a_warning():
    hf = perturbed(hf_model("mistral", sliding_window=16))
    with pytest.warns(UserWarning, match="16-token attention window"):
        converted = hf_to_layerwise(hf)
    assert converted.config.max_seq_len == 16
    assert torch.equal(logits(converted, IDS[:, :16]), logits(hf, IDS[:, :16]))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        logits(converted, IDS[:, :17])


def test_qwen2_sliding_layers_cap_max_seq_len_and_full_layers_alone_do_not():
    hf = perturbed(hf_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2))
    assert "sliding_attention" in hf.config.layer_types
    with pytest.warns(UserWarning, match="16-token attention window"):
        converted = hf_to_layerwise(hf)
    assert converted.config.max_seq_len == 16
    assert torch.equal(logits(converted, IDS[:, :16]), logits(hf, IDS[:, :16]))
    unused = hf_model("qwen2", use_sliding_window=False, sliding_window=16)  # every layer full: no cap
    assert hf_to_layerwise(unused).config.max_seq_len == 64


def test_llama_with_biases_everywhere_converts_to_bias_and_back():
    hf = perturbed(hf_model("llama", attention_bias=True, mlp_bias=True))
    converted = hf_to_layerwise(hf)
    assert converted.config.bias and not converted.config.qkv_bias
    assert torch.equal(logits(converted, IDS), logits(hf, IDS))
    back = layerwise_to_hf(converted)
    assert back.config.attention_bias and back.config.mlp_bias
    assert torch.equal(logits(back, IDS), logits(hf, IDS))


def test_a_pruned_model_converts_keeping_its_layer_origin():
    hf = apply(perturbed(hf_model("llama")), ["drop=1"])
    converted = apply(hf, ["to-layerwise"])
    assert converted.config.n_layers == 3 and converted.config.layer_origin == [0, 2, 3]
    assert converted.config.layerwise_transforms == ["drop=1", "to-layerwise"]
    assert torch.equal(logits(converted, IDS), logits(hf, IDS))
    assert apply(converted, ["to-hf"]).config.layer_origin == [0, 2, 3]


def test_steps_record_the_family_and_the_history_and_to_hf_defaults_to_it():
    hf = perturbed(hf_model("mistral"))
    converted = apply(hf, ["to-layerwise"], source="some/folder")
    assert converted.config.layerwise_transforms == ["to-layerwise"]
    assert converted.config.layerwise_source == "some/folder"
    back = apply(converted, ["to-hf"])
    assert type(back) is transformers.MistralForCausalLM
    assert back.config.layerwise_transforms == ["to-layerwise", "to-hf"]
    assert torch.equal(logits(back, IDS), logits(hf, IDS))


def test_a_native_layerwise_model_writes_as_llama_that_saves_and_reloads(tmp_path):
    from conftest import tiny_model

    model = perturbed(tiny_model("pre-rmsnorm"))
    llama = apply(model, ["to-hf"])
    assert type(llama) is transformers.LlamaForCausalLM
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(logits(llama, ids), logits(model, ids))
    llama.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is transformers.LlamaForCausalLM and loaded.config.layerwise_transforms == ["to-hf"]
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# ---- refusals name the reason -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, reason", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}), "rope_type='llama3'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True, mlp_bias=False"),
])
def test_to_layerwise_refuses_llama_math_layerwise_lacks(overrides, reason):
    with pytest.raises(UserError, match=f"--apply 'to-layerwise'.*{reason}"):
        apply(hf_model("llama", **overrides), ["to-layerwise"])


def test_to_layerwise_refuses_an_unsupported_family_naming_the_supported_ones():
    with pytest.raises(UserError, match="model_type='gpt_neox'.*supported: llama, mistral, qwen2, qwen3, gpt2"):
        apply(hf_model("gpt_neox"), ["to-layerwise"])


def test_gpt2_dispatches_to_its_adapter_or_says_it_is_missing():
    hf = hf_model("gpt2")
    if importlib.util.find_spec("layerwise.arch.gpt2") is None:
        with pytest.raises(UserError, match="layerwise.arch.gpt2. is missing"):
            apply(hf, ["to-layerwise"])
    else:
        converted = apply(hf, ["to-layerwise"])
        assert relative(logits(converted, IDS), logits(hf, IDS)) < 1e-5


@pytest.mark.parametrize("fields, step, reason", [
    (dict(layernorm_scaling=True), "to-hf", "layernorm_scaling=True as llama"),
    (dict(norm="layernorm"), "to-hf", "norm='layernorm' as llama"),
    (dict(residual="block_attnres"), "to-hf", "residual='block_attnres'"),
    (dict(qk_norm=True), "to-hf=llama", "qk_norm=True as llama"),
    (dict(), "to-hf=qwen2", "qkv_bias=False as qwen2"),
    (dict(bias=True, qk_norm=True), "to-hf=qwen3", "bias=True as qwen3"),
    (dict(qkv_bias=True), "to-hf=mistral", "qkv_bias=True as mistral"),
    (dict(n_layers=3, layer_order=[0, 1, 1]), "to-hf", "layer_order=.0, 1, 1. as llama"),
])
def test_to_hf_refuses_what_the_family_cannot_express_naming_the_field(fields, step, reason):
    from layerwise import ModelConfig

    with pytest.raises(UserError, match=f"--apply '{step}'.*{reason}"):
        apply(_Configured(ModelConfig.from_preset("pre-rmsnorm", "tiny", **fields)), [step])


class _Configured(torch.nn.Module):
    """A model stand-in with just a config: to-hf refuses in `check`, before it reads a weight (and a model
    stands in for any config the family cannot express)."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def test_steps_refuse_the_wrong_kind_of_model():
    with pytest.raises(UserError, match="already a layerwise model"):
        apply(hf_to_layerwise(hf_model("llama")), ["to-layerwise"])
    with pytest.raises(UserError, match="'llama' model, not a layerwise one"):
        apply(hf_model("llama"), ["to-hf"])
    with pytest.raises(UserError, match="unknown family 'gemma'"):
        apply(hf_model("llama"), ["to-hf=gemma"])


# ---- continued training from pretrained weights ------------------------------------------------------------

def test_to_layerwise_with_overrides_keeps_pretrained_tensors_and_starts_new_ones_at_init():
    hf = perturbed(hf_model("llama"))
    with pytest.warns(UserWarning, match="residual='block_attnres'.*different function"):
        converted = apply(hf, ["to-layerwise=residual=block_attnres,attnres_blocks=4,layernorm_scaling=true"])
    assert converted.config.residual == "block_attnres" and converted.config.layernorm_scaling
    state, pretrained = converted.state_dict(), from_hf(hf.state_dict())
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    added = [k for k in state if k not in pretrained]
    queries = [k for k in added if k.endswith(".query")]
    assert queries and all(not state[k].any() for k in queries)  # zero: each depth mixer is a uniform mean
    assert all(k.endswith(".key_norm.weight") and torch.equal(state[k], torch.ones_like(state[k]))
               for k in added if k not in queries)


def test_to_layerwise_overrides_that_reshape_pretrained_tensors_are_refused():
    with pytest.raises(UserError, match="d_model=64, n_heads=4 would reshape the pretrained"):
        apply(hf_model("llama"), ["to-layerwise=d_model=64,n_heads=4"])
    with pytest.raises(UserError, match="unknown field"):
        apply(hf_model("llama"), ["to-layerwise=no_such_field=1"])
    with pytest.raises(UserError, match="is not FIELD=VALUE"):
        apply(hf_model("llama"), ["to-layerwise=residual"])


# ---- a real pretrained model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from layerwise.loading import load_model, smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_model(path)


def test_smollm2_converts_with_the_same_logits_and_greedy_tokens_and_round_trips(smollm2):
    hf, tokenizer = smollm2
    converted = apply(hf, ["to-layerwise"])
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert relative(logits(converted, ids), logits(hf, ids)) <= 1e-5
    ours = converted.generate(ids, max_new_tokens=20, do_sample=False)
    theirs = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, theirs)
    back = apply(converted, ["to-hf"])
    assert type(back) is transformers.LlamaForCausalLM
    before, after = hf.state_dict(), back.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gpt2_round_trip_keeps_its_family_and_origins_and_refuses_a_head_bias_gpt2_lacks():
    gpt2 = hf_model("gpt2").double()
    converted = apply(gpt2, ["drop=1", "to-layerwise"])
    assert converted.config.layerwise_hf_family == "gpt2" and converted.config.layer_origin == [0, 2, 3]
    back = apply(converted, ["to-hf"])  # to the family it came from, not llama
    assert type(back).__name__ == "GPT2LMHeadModel" and back.config.layer_origin == [0, 2, 3]
    folded = apply(hf_model("gpt2").double(), ["to-layerwise", "fold-norms"])  # the final beta moves to a head bias
    with pytest.raises(UserError, match="lm_head_bias=True cannot be saved as GPT-2"):
        apply(folded, ["to-hf"])


def test_an_old_pruned_config_converts_with_each_layers_own_lns_scale(tmp_path):
    hf = apply(perturbed(hf_model("llama")), ["drop=0"])
    hf.config.layer_origin = None
    hf.config.layerwise_dropped_layers = [0]  # as written before layer_origin existed
    converted = apply(hf, ["to-layerwise=layernorm_scaling=true"])
    assert converted.config.layer_origin == [1, 2, 3]
    converted.save_pretrained(tmp_path / "m")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(logits(reloaded, IDS), logits(converted, IDS))


def test_to_layerwise_refuses_an_hf_model_with_tied_positions_instead_of_untying_them():
    tied = apply(hf_model("llama"), ["layers=0-3,1-2:tie"])
    with pytest.raises(UserError, match="convert before reshaping.*to-layerwise before layers"):
        apply(tied, ["to-layerwise"])
    assert apply(hf_model("llama"), ["to-layerwise", "layers=0-3,1-2:tie"]).config.layer_order == [0, 1, 2, 3, 1, 2]
