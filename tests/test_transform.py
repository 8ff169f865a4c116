"""Physical layer removal on small random models of real HF families and on layerwise models: the pruned model
is the original with those layers skipped, decodes with a KV cache exactly as full forwards do, round-trips
through save/load, and its config says what it lost."""

import copy
import json

import conftest
import pytest
import torch
import transformers
import typer
from conftest import HF_FAMILIES, HF_SMALL, ALTERNATING, SLIDING_WINDOWS, full_logits, greedy_without_cache, tiny_model
from typer.testing import CliRunner

from layerwise import LayerwiseForCausalLM
from layerwise.diagnose import depth_view
from layerwise.reference import skipping
from layerwise.transform import drop_layers, original_layer_indices, parse_layer_list, save_pruned
from layerwise.transform.cli import prune_command

DROP = [0, 3]  # both survivors move, so a stale layer_idx or an unsliced layer_types shows


def hf_model(family, **overrides):
    """The shared small model of `family`, with a short sliding window where the family has one."""
    return conftest.hf_model(family, **{**SLIDING_WINDOWS.get(family, {}), **overrides})


def assert_prunes_like_skipping(model, drop, vocab):
    ids = torch.randint(1, vocab, (2, 12))
    with skipping(model, drop):
        expected = full_logits(model, ids)
    n_layers = len(depth_view(model).layers)
    pruned = drop_layers(copy.deepcopy(model), drop)
    stack = depth_view(pruned).layers
    assert len(stack) == pruned.config.num_hidden_layers == n_layers - len(drop)
    for position, layer in enumerate(stack):  # every layer_idx below a layer is its new KV-cache slot
        assert {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {position}
    torch.testing.assert_close(full_logits(pruned, ids), expected, rtol=1e-5, atol=1e-6)
    return pruned


def assert_cached_greedy_matches_full_forwards(pruned, vocab):
    prompt = torch.randint(1, vocab, (2, 8))
    with torch.no_grad():
        cached = pruned.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert cached.shape[1] == 13
    assert torch.equal(cached, greedy_without_cache(pruned, prompt, 5))


# ---- Hugging Face families ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", HF_FAMILIES)
def test_pruned_model_is_the_original_with_those_layers_skipped(family):
    assert_prunes_like_skipping(hf_model(family), DROP, vocab=128)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_pruned_model_decodes_with_its_cache_like_full_forwards(family):
    assert_cached_greedy_matches_full_forwards(drop_layers(hf_model(family), DROP), vocab=128)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_pruned_model_round_trips_through_save_and_load(family, tmp_path):
    pruned = drop_layers(hf_model(family), DROP)
    save_pruned(pruned, None, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_origin"] == [1, 2] and "layerwise_dropped_layers" not in saved
    assert saved["n_layer" if family == "gpt2" else "num_hidden_layers"] == 2
    assert list(tmp_path.glob("*.safetensors"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2 and loaded.config.layer_origin == [1, 2]
    ids = torch.randint(1, 128, (2, 12))
    assert torch.equal(full_logits(loaded, ids), full_logits(pruned, ids))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_surviving_layers_keep_their_own_attention_type(family, tmp_path):
    pruned = drop_layers(hf_model(family), DROP)  # original layers 1 (full) and 2 (sliding) survive
    assert pruned.config.layer_types == [ALTERNATING[1], ALTERNATING[2]] == ["full_attention", "sliding_attention"]
    for layer, kind in zip(pruned.model.layers, pruned.config.layer_types):
        assert layer.self_attn.layer_type == kind
    pruned.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.layer_types == pruned.config.layer_types
    assert [layer.self_attn.sliding_window for layer in loaded.model.layers] == [None, 4]


def test_qwen2_max_window_layers_moves_with_the_full_attention_layers_it_counts():
    pruned = drop_layers(hf_model("qwen2"), DROP)  # full, full, sliding, sliding -> full, sliding
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert pruned.config.max_window_layers == 1
    rebuilt = transformers.Qwen2Config(**{**HF_SMALL, **SLIDING_WINDOWS["qwen2"], "num_hidden_layers": 2,
                                          "max_window_layers": 1})
    assert rebuilt.layer_types == pruned.config.layer_types
    only_full = drop_layers(hf_model("qwen2"), [2, 3])
    assert only_full.config.layer_types == ["full_attention"] * 2 and not only_full.model.has_sliding_layers


def test_pruning_twice_records_indices_of_the_original_model():
    model = drop_layers(hf_model("llama"), [1])  # original 0, 2, 3 remain
    assert original_layer_indices(model.config) == [0, 2, 3]
    drop_layers(model, [1])  # position 1 is original layer 2
    assert model.config.layer_origin == [0, 3] == original_layer_indices(model.config)


@pytest.mark.parametrize("layers, message", [
    ([4], r"out of range for a 4-layer model; valid layer indices are 0\.\.3"),
    ([-1], r"out of range .* 0\.\.3"),
    ([1, 1], r"listed twice; valid layer indices are 0\.\.3"),
    ([0, 1, 2, 3], r"dropping all 4 layers leaves no model; keep at least one of 0\.\.3"),
    (["1"], r"not an integer; valid layer indices are 0\.\.3"),
])
def test_bad_indices_name_the_valid_range_and_leave_the_model_intact(layers, message):
    model = hf_model("llama")
    with pytest.raises(ValueError, match=message):
        drop_layers(model, layers)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_gpt2_with_attention_scaled_by_layer_index_is_refused():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(hf_model("gpt2", scale_attn_by_inverse_layer_idx=True), [1])


# ---- layerwise models -----------------------------------------------------------------------------------------

LAYERWISE_DROP = [1, 3]  # layer 0 stays: LNS keeps 1/sqrt(3) for original layer 2 now at position 1


@pytest.mark.parametrize("preset", ["pre-rmsnorm", "lns", "mix-ln", "deepnorm", "bhyt"])
def test_layerwise_pruned_model_keeps_each_surviving_layers_own_math(preset):
    pruned = assert_prunes_like_skipping(tiny_model(preset), LAYERWISE_DROP, vocab=256)
    assert pruned.config.n_layers == 2 and pruned.config.layer_origin == [0, 2]
    assert_cached_greedy_matches_full_forwards(pruned, vocab=256)


def test_layerwise_pruned_model_round_trips_through_save_and_load(tmp_path):
    pruned = drop_layers(tiny_model("pre-rmsnorm"), LAYERWISE_DROP)
    save_pruned(pruned, None, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LayerwiseForCausalLM)
    assert loaded.config.n_layers == 2 and loaded.config.layer_origin == [0, 2]
    ids = torch.randint(1, 256, (2, 12))
    assert torch.equal(full_logits(loaded, ids), full_logits(pruned, ids))


@pytest.mark.parametrize("preset, field", [("deepnorm", "norm_placement")])
def test_layerwise_depth_dependent_pruned_model_refuses_to_save(preset, field, tmp_path):
    # Reloading would rebuild the survivors with DeepNorm's alpha from the new L. (LNS reads each layer's origin
    # index from layer_origin, so a pruned LNS model saves: tests/test_program_layerwise.py.)
    pruned = drop_layers(tiny_model(preset), LAYERWISE_DROP)
    with pytest.raises(ValueError, match=rf"layer_origin=\[0, 2\] .* {field}="):
        pruned.save_pretrained(tmp_path)


@pytest.mark.parametrize("preset, reason", [("block-attnres", "AttnRes keeps a depth-attention mixer per sublayer"),
                                            ("resformer", "value_residual='resformer'")])
def test_layerwise_models_whose_layers_are_not_units_refuse_pruning(preset, reason):
    model = tiny_model(preset)
    with pytest.raises(ValueError, match=reason):
        drop_layers(model, [1])
    assert len(model.model.layers) == 4


# ---- layer lists and the command line -------------------------------------------------------------------------

def test_layer_lists_are_zero_based_with_inclusive_ranges():
    assert parse_layer_list("14,20-23") == [14, 20, 21, 22, 23]
    assert parse_layer_list(" 3, 0-1 ") == [0, 1, 3]
    for bad, message in [("5-3", "runs backwards; write it as 3-5"), ("1,2-4,4", "layer 4 appears twice"),
                         ("1,,2", "is not an index or a range a-b"), ("-1", "is not an index")]:
        with pytest.raises(ValueError, match=message):
            parse_layer_list(bad)


def test_prune_command_writes_a_loadable_model_and_says_what_it_removed(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "pruned"
    hf_model("llama").save_pretrained(source)
    app = typer.Typer()
    app.command()(prune_command)
    runner = CliRunner()
    result = runner.invoke(app, [str(source), "--drop", "1-2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "removed layers 1, 2 (0-based) of 4; 2 remain" in result.output and str(out) in result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.layer_origin == [0, 3]
    bad = runner.invoke(app, [str(source), "--drop", "3-1", "--out", str(out)])
    assert bad.exit_code == 2 and "runs backwards" in bad.output
    help_text = runner.invoke(app, ["--help"]).output
    assert "0-based" in help_text and "INCLUSIVE" in help_text


# ---- a real pretrained model ----------------------------------------------------------------------------------

def test_smollm2_pruned_and_saved_reloads_with_identical_logits(tmp_path):
    from layerwise.loading import load_model, smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tokenizer = load_model(path)
    drop_layers(model, parse_layer_list("14,20-23"))
    save_pruned(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert loaded.config.num_hidden_layers == 25
    assert loaded.config.layer_origin == [i for i in range(30) if i not in (14, 20, 21, 22, 23)]
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    ids = loaded_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer("The capital of France is", return_tensors="pt").input_ids)
    assert torch.equal(full_logits(loaded, ids), full_logits(model, ids))
