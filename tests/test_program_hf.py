"""Layer programs (`layers=`) on small random models of every HF family: the reprogrammed model runs the
listed layers in order, decodes with its KV cache exactly as full forwards do (one cache slot per position,
tied or materialised), round-trips through save/load when materialised, shares its weights when tied (and then
refuses to be saved), and its config says where each layer came from (`layer_origin`)."""

import copy
import json

import conftest
import pytest
import torch
import transformers
from conftest import HF_FAMILIES, HF_SMALL, SLIDING_WINDOWS, full_logits, greedy_without_cache
from torch import nn

from layerwise.diagnose import depth_view
from layerwise.errors import UserError
from layerwise.transform import (apply, drop_layers, original_layer_indices, parse_layer_program, program_layers,
                                 save_transformed)
from layerwise.transform.prune import save_pruned

# Each keeps Qwen's full-attention layers (0, 1) ahead of its sliding ones, which its config requires.
PROGRAMS = {"drop": [0, 2, 3], "duplicate": [0, 1, 1, 2, 3], "reorder": [1, 0, 3, 2]}
N_NEW = 8


def hf_model(family, **overrides):
    """The shared small model of `family` in float64, with a short sliding window where the family has one."""
    return conftest.hf_model(family, **{**SLIDING_WINDOWS.get(family, {}), **overrides}).double()



@torch.no_grad()
def cached_vs_full_forwards(model, prompt):
    """Greedy `generate` with the KV cache, and the largest gap between its per-step logits and the logits that
    full cache-free forwards of the generated sequence give at the same positions."""
    out = model.generate(prompt, max_new_tokens=N_NEW, do_sample=False, use_cache=True, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    full = full_logits(model, out.sequences)[:, prompt.shape[1] - 1:-1]
    cached = torch.stack(out.logits, dim=1)
    return out.sequences, (cached - full).abs().max().item()



def run_layers(model, order, ids):
    """Logits of `model` running its layers `order` by hand: each layer module's own forward, in sequence, via
    a stack the model reads (layer_idx untouched, no cache), to compare a program against."""
    stack = depth_view(model).layers
    original = list(stack)
    config = model.config
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    try:
        stack._modules.clear()
        for layer in (original[i] for i in order):
            stack.append(layer)
        config.num_hidden_layers = len(order)
        if saved[1] is not None:
            config.layer_types = [saved[1][i] for i in order]
        return full_logits(model, ids)
    finally:
        stack._modules.clear()
        for layer in original:
            stack.append(layer)
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]


def layer_idx_of(layer):
    return {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())  # parameters() counts a shared Parameter once


# ---- parsing --------------------------------------------------------------------------------------------------

def test_programs_are_zero_based_inclusive_ranges_in_order_with_repeats():
    assert parse_layer_program("0-3,2-3,4-5").order == (0, 1, 2, 3, 2, 3, 4, 5)
    assert parse_layer_program(" 3, 0-1 ,3").order == (3, 0, 1, 3)
    assert not parse_layer_program("0-1").tie and parse_layer_program("0-1,1:tie").tie
    assert parse_layer_program("0-1,1:tie").order == (0, 1, 1)


@pytest.mark.parametrize("text, message", [
    ("", "lists no layers"), (":tie", "lists no layers"),
    ("3-1", "runs backwards; write 1-3, or list the layers one by one to run them in reverse: 3,2,1"),
    ("0,,1", "is not an index or a range a-b; e.g. \"0-15,12-15,16-29\""), ("-1", "is not an index"),
    ("0-3:tied", "the only suffix is ':tie'"), ("a-b", "is not an index"),
])
def test_bad_program_text_names_the_reason_and_shows_an_example(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("\"", ".")):
        parse_layer_program(text)


def test_the_step_refuses_bad_text_before_touching_the_model():
    model = hf_model("llama")
    with pytest.raises(UserError, match=r"--apply 'layers=3-1': .*runs backwards"):
        apply(model, ["layers=0-3", "layers=3-1"])
    assert len(model.model.layers) == 4


# ---- every HF family ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["materialised", "tied"])
@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_program_runs_its_layers_in_order_and_decodes_with_its_cache_like_full_forwards(family, program, tie):
    order = PROGRAMS[program]
    model = hf_model(family)
    ids = torch.randint(1, 128, (2, 12))
    expected = run_layers(model, order, ids)
    text = f"layers={','.join(map(str, order))}" + (":tie" if tie else "")
    reprogrammed = apply(copy.deepcopy(model), [text])
    stack = depth_view(reprogrammed).layers
    assert len(stack) == reprogrammed.config.num_hidden_layers == len(order)
    assert [layer_idx_of(layer) for layer in stack] == [{p} for p in range(len(order))]  # one slot per position
    assert reprogrammed.config.layer_origin == order
    if getattr(model.config, "layer_types", None) is not None:
        assert reprogrammed.config.layer_types == [model.config.layer_types[i] for i in order]
    torch.testing.assert_close(full_logits(reprogrammed, ids), expected, rtol=0, atol=1e-12)

    prompt = torch.randint(1, 128, (2, 8))
    sequences, gap = cached_vs_full_forwards(reprogrammed, prompt)
    assert sequences.shape[1] == 8 + N_NEW
    assert torch.equal(sequences, greedy_without_cache(reprogrammed, prompt, N_NEW))
    assert gap < 1e-5


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_materialised_program_round_trips_through_save_and_load(family, tmp_path):
    model = apply(hf_model(family), ["layers=0,1,1,2,3"])
    original_ptrs = {p.data_ptr() for p in depth_view(model).layers[1].parameters()}
    assert original_ptrs.isdisjoint(p.data_ptr() for p in depth_view(model).layers[2].parameters())
    save_transformed(model, None, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_origin"] == [0, 1, 1, 2, 3] and saved["layerwise_transforms"] == ["layers=0,1,1,2,3"]
    assert saved["n_layer" if family == "gpt2" else "num_hidden_layers"] == 5
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).double().eval()
    assert loaded.config.num_hidden_layers == 5 and loaded.config.layer_origin == [0, 1, 1, 2, 3]
    ids = torch.randint(1, 128, (2, 12))
    # 1e-6, not equality: Gemma's float32 embedding scale is recomputed at load (8e-8 apart even untransformed)
    torch.testing.assert_close(full_logits(loaded, ids), full_logits(model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_tied_program_shares_weights_and_refuses_to_save_writing_nothing(family, tmp_path):
    model = hf_model(family)
    n_before = n_parameters(model)
    tied = apply(model, ["layers=0,1,1,2,3:tie"])
    first, second = depth_view(tied).layers[1], depth_view(tied).layers[2]
    assert first is not second
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert a is b, name
    assert n_parameters(tied) == n_before
    with torch.no_grad():  # one tensor: a change made through one occurrence is seen by the other
        next(first.parameters()).add_(1.0)
    assert torch.equal(next(first.parameters()), next(second.parameters()))
    for save in (save_transformed, save_pruned):
        with pytest.raises(UserError, match=r"tied .* save a program with materialised copies .*to-layerwise"):
            save(tied, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_occurrences_keep_sharing_after_a_dtype_conversion():
    tied = apply(hf_model("llama"), ["layers=0,1,1,2,3:tie"]).float()
    first, second = tied.model.layers[1], tied.model.layers[2]
    assert all(a is b for a, b in zip(first.parameters(), second.parameters()))
    assert first.self_attn.q_proj.weight.dtype == torch.float32


def test_naive_repeat_with_one_layer_idx_breaks_cached_decoding():
    """The bug the per-position slots fix: one layer object run twice writes its keys into one cache slot
    twice, so the cached logits drift from full forwards while a cache-free forward is right."""
    model = hf_model("llama")
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[0], layers[1], layers[1], layers[2]])
    model.config.num_hidden_layers = 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 1, 2]
    _, gap = cached_vs_full_forwards(model, torch.randint(1, 128, (2, 8)))
    assert gap > 1e-2
    fixed = apply(hf_model("llama"), ["layers=0,1,1,2:tie"])
    _, fixed_gap = cached_vs_full_forwards(fixed, torch.randint(1, 128, (2, 8)))
    assert fixed_gap < 1e-6  # the unmodified model's own gap is 1.5e-8 here (rotary angles in float32)


# ---- configs and provenance -----------------------------------------------------------------------------------

def test_qwen2_window_boundary_counts_the_full_attention_positions():
    model = apply(hf_model("qwen2"), ["layers=0,1,1,2,3"])  # full, full, full, sliding, sliding
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert model.config.max_window_layers == 3 and model.model.has_sliding_layers
    rebuilt = transformers.Qwen2Config(**{**HF_SMALL, **SLIDING_WINDOWS["qwen2"], "num_hidden_layers": 5,
                                          "max_window_layers": 3})
    assert rebuilt.layer_types == model.config.layer_types
    only_full = apply(hf_model("qwen2"), ["layers=0,1,0"])
    assert only_full.config.max_window_layers == 3 and not only_full.model.has_sliding_layers


def test_qwen2_program_putting_a_sliding_layer_first_is_refused():
    model = hf_model("qwen2")
    with pytest.raises(UserError, match=r"max_window_layers=2 .* keep layers 0\.\.1 \(in any order\) ahead"):
        apply(model, ["layers=3,2,1,0"])
    assert len(model.model.layers) == 4 and model.config.layer_types[0] == "full_attention"


def test_origins_compose_across_transforms_and_old_configs_still_say_what_they_dropped():
    model = apply(hf_model("llama"), ["drop=1", "layers=2,0,1,1"])  # origins 0, 2, 3 -> 3, 0, 2, 2
    assert model.config.layer_origin == [3, 0, 2, 2] == original_layer_indices(model.config)
    assert model.config.layerwise_transforms == ["drop=1", "layers=2,0,1,1"]
    old = hf_model("llama", num_hidden_layers=3)
    old.config.layerwise_dropped_layers = [1]  # a config written before layer_origin
    assert original_layer_indices(old.config) == [0, 2, 3]
    drop_layers(old, [0])
    assert old.config.layer_origin == [2, 3] and not hasattr(old.config, "layerwise_dropped_layers")


@pytest.mark.parametrize("program, message", [
    ("layers=0,4", r"layer index 4 is out of range for a 4-layer model; valid layer indices are 0\.\.3"),
])
def test_out_of_range_program_is_refused_naming_the_valid_range(program, message):
    model = hf_model("mistral")
    with pytest.raises(UserError, match=message):
        apply(model, [program])
    assert len(model.model.layers) == 4


def test_empty_program_is_refused_before_the_model_changes():
    model = hf_model("llama")
    with pytest.raises(UserError, match="the layer program is empty, which leaves no model"):
        program_layers(model, [])
    assert len(model.model.layers) == 4


def test_gpt2_with_attention_scaled_by_layer_index_is_refused():
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=True: layer i scales its attention"):
        apply(hf_model("gpt2", scale_attn_by_inverse_layer_idx=True), ["layers=0,1,1,2,3"])


def test_layerwise_drop_writes_layer_origin_and_reads_an_old_dropped_layers_config():
    model = conftest.tiny_model("pre-rmsnorm", layerwise_dropped_layers=[1])  # 4 layers left of an original 5
    assert original_layer_indices(model.config) == [0, 2, 3, 4]
    drop_layers(model, [0])
    assert model.config.layer_origin == [2, 3, 4] and model.config.layerwise_dropped_layers is None
    assert model.config.n_layers == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_positions_are_traced_like_materialised_copies(family):
    """Diagnostics hook each position's modules: a tied occurrence must not share hooks with its source, or one
    position's recorded states overwrite the other's."""
    from layerwise.arch import depth_view
    from layerwise.diagnose.trace import trace

    model = conftest.hf_model(family).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    tied = apply(copy.deepcopy(model), ["layers=0-3,1-2:tie"])
    copies = apply(copy.deepcopy(model), ["layers=0-3,1-2"])
    a, b = trace(tied, depth_view(tied), ids, False), trace(copies, depth_view(copies), ids, False)
    assert len(a.hidden) == len(b.hidden) == 7
    for x, y in zip(a.hidden, b.hidden):
        assert torch.equal(x, y)
    assert len(a.sublayers) == len(b.sublayers) == 6
    for x, y in zip(a.sublayers, b.sublayers):
        for part in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            assert torch.equal(getattr(x, part), getattr(y, part))
