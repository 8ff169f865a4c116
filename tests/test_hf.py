"""Hugging Face compatibility: save -> AutoModelForCausalLM.from_pretrained -> identical logits; KV-cached
generate equals greedy decoding by full forwards."""

import json

import pytest
import torch
import transformers
from conftest import greedy_without_cache, tiny_model
from safetensors import safe_open

import layerwise  # noqa: F401  (registers model_type "layerwise")
from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.presets import PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_save_then_auto_from_pretrained_gives_bit_identical_logits(name, tmp_path):
    model = tiny_model(name)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        model(ids)  # BHyT fixes its constant c on the first forward; it must be saved with the weights
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LayerwiseForCausalLM
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)


def test_saved_weights_are_plain_safetensors_with_a_tied_head(tmp_path):
    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-ln", "tiny"))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", ["pre-ln", "peri-ln", "bhyt", "attnres", "block-attnres", "delta-attnres",
                                  "delta-block-attnres", "delta-block-attnres-released", "resformer", "satformer",
                                  "dyt", "un", "powernorm"])
def test_cached_generate_equals_greedy_full_forwards(name):
    model = tiny_model(name)
    # Random init gives flat logits; sharpen them so greedy choices are not decided by rounding noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 19)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 12))


def test_chunked_prefill_with_cache_matches_one_full_forward():
    model = tiny_model("satformer")
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :9], use_cache=True)
        second = model(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_model("pre-rmsnorm")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    short, long = torch.randint(1, 256, (1, 4)), torch.randint(1, 256, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1), torch.ones(1, 7)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_short = model.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_long = model.generate(long, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 3:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


def test_config_json_names_the_variant_fields(tmp_path):
    ModelConfig.from_preset("block-attnres", "tiny").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "layerwise"
    assert data["residual"] == "block_attnres" and data["layerwise_version"] == 1


def test_loading_from_a_model_hub_fails_offline():
    with pytest.raises(OSError):
        transformers.AutoConfig.from_pretrained("layerwise-does-not-exist/never")
