"""Layer programs inside layerwise models: `layer_order` runs stored layers at execution positions (tied loops),
`layer_origin` records provenance, and `program_layerwise_model` drops, repeats and reorders layers.

Every program is checked against the same computation written out by hand (the original layers called in the
new order, each with its own KV-cache slot), through a save and reload, and by cached decoding against greedy
full forwards."""

import copy
import math
import json

import pytest
import torch
import transformers
from conftest import full_logits, greedy_without_cache, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.arch import depth_view
from layerwise.errors import UserError
from layerwise.loading import load_model
from layerwise.nn.attention import ForwardContext
from layerwise.transform.layerwise_program import check_layerwise_program, program_layerwise_model
from layerwise.transform.program import program_layers

# Each scheme that takes programs (standard residual with every additive or post-add placement, and LNS).
PROGRAMMABLE = ["pre-rmsnorm", "pre-ln", "peri-ln", "post-ln", "lns"]
PROGRAMS = {
    "drop": [0, 2, 3],
    "duplicate": [0, 1, 2, 1, 2, 3],
    "reorder": [0, 2, 1, 3],
    "drop-and-repeat": [3, 1, 1, 0],
}
RESIDUAL_SCHEMES = ["pre-rmsnorm", "attnres", "block-attnres", "delta-attnres", "delta-block-attnres",
                    "resformer", "satformer", "bhyt", "lns"]
VOCAB = 256


def assert_cached_generate_is_greedy(model):
    model.generation_config.eos_token_id = None
    prompt = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 6))


@torch.no_grad()
def by_hand(model, order, ids):
    """The original standard-residual model's layers called in `order`; position p writes cache slot p (here no
    cache: every call is a full forward, so only the order of the layers and their own math matter)."""
    inner = model.model
    h, ctx = inner.embed(input_ids=ids)
    for p, current in enumerate(order):
        ctx.position = p
        h = inner.layers[current](h, ctx)
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("tie", [False, True], ids=["materialised", "tied"])
@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("preset", PROGRAMMABLE)
def test_program_runs_the_listed_layers_saves_reloads_and_decodes_exactly(preset, program, tie, tmp_path):
    order = PROGRAMS[program]
    original = tiny_model(preset, dtype=torch.float64)
    ids = torch.randint(1, VOCAB, (2, 10))
    expected = by_hand(original, order, ids)
    model = program_layerwise_model(copy.deepcopy(original), order, tie=tie)
    assert model.config.n_layers == len(order) and model.config.layer_origin == order
    torch.testing.assert_close(full_logits(model, ids), expected, rtol=0, atol=1e-12)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_origin"] == order
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, LayerwiseForCausalLM)
    assert torch.equal(full_logits(loaded, ids), full_logits(model, ids))
    reread, _ = load_model(tmp_path, dtype=torch.float64)  # the CLI's loader refuses missing or extra weights
    assert torch.equal(full_logits(reread.eval(), ids), full_logits(model, ids))
    assert_cached_generate_is_greedy(model)
    assert_cached_generate_is_greedy(loaded)


def test_tied_program_stores_each_layer_once_and_its_gradients_accumulate(tmp_path):
    original = tiny_model("pre-rmsnorm", dtype=torch.float64)
    n_params = sum(p.numel() for p in original.parameters())
    model = program_layerwise_model(copy.deepcopy(original), PROGRAMS["duplicate"], tie=True)
    assert model.config.layer_order == [0, 1, 2, 1, 2, 3] and len(model.model.layers) == 4
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.state_dict()) == len(original.state_dict())
    positions = depth_view(model).layers
    assert positions[1] is positions[3] and len(positions) == 6
    # One backward through both runs of layer 1 puts into its one weight tensor the sum of what each run
    # contributes, dL/dW = sum over runs of g_run^T x_run (g: the gradient at that run's output).
    ids = torch.randint(1, VOCAB, (2, 8))
    weight = model.model.layers[1].mlp.fn.output_projection().weight
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    both = weight.grad.clone()
    # Exact accumulation: autograd sums into the one tensor; each position's contribution is a term.
    model.zero_grad()
    sources = []

    def keep(module, args, out):
        sources.append(out)

    handle = model.model.layers[1].mlp.fn.output_projection().register_forward_hook(keep)
    loss = model(input_ids=ids, labels=ids).loss
    handle.remove()
    assert len(sources) == 2  # the tied layer ran at two positions
    grads = torch.autograd.grad(loss, sources)
    x_in = []
    handle = model.model.layers[1].mlp.fn.output_projection().register_forward_pre_hook(
        lambda m, args: x_in.append(args[0]))
    model(input_ids=ids, labels=ids)
    handle.remove()
    per_run = [g.flatten(0, 1).T @ x.flatten(0, 1) for g, x in zip(grads, x_in)]
    torch.testing.assert_close(both, per_run[0] + per_run[1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(per_run[0], per_run[1])


def test_tied_sharing_survives_dtype_casts():
    model = program_layerwise_model(tiny_model("pre-rmsnorm"), PROGRAMS["duplicate"], tie=True)
    model.to(torch.float64)
    positions = model.model.positions
    assert positions[1].attn.fn.q_proj.weight is positions[3].attn.fn.q_proj.weight
    assert positions[1].attn.fn.q_proj.weight.dtype == torch.float64
    model.half()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model().parameters())


@pytest.mark.parametrize("preset", PROGRAMMABLE)
def test_a_program_that_runs_every_layer_once_in_order_is_the_original_model(preset):
    original = tiny_model(preset, dtype=torch.float64)
    ids = torch.randint(1, VOCAB, (2, 10))
    for tie in (False, True):
        model = program_layerwise_model(copy.deepcopy(original), [0, 1, 2, 3], tie=tie)
        assert model.config.layer_order is None and model.config.layer_origin is None
        assert torch.equal(full_logits(model, ids), full_logits(original, ids))


def test_programs_compose_and_record_origins_of_the_original_model(tmp_path):
    model = program_layerwise_model(tiny_model("lns", dtype=torch.float64), [0, 1, 2, 1, 2, 3], tie=True)
    model = program_layerwise_model(model, [0, 3, 4, 5], tie=True)  # drop position 1 and 2: runs 1, 2, 3 remain
    assert model.config.layer_origin == [0, 1, 2, 3] and model.config.layer_order is None
    # LNS kept each layer's own scale 1/sqrt(origin + 1), so the result is the original model.
    ids = torch.randint(1, VOCAB, (2, 10))
    torch.testing.assert_close(full_logits(model, ids), full_logits(tiny_model("lns", dtype=torch.float64), ids),
                               rtol=0, atol=0)


def test_lns_scale_follows_the_origin_index_after_a_reorder():
    model = program_layerwise_model(tiny_model("lns"), [3, 0], tie=False)
    scales = [layer.attn.depth_scale for layer in model.model.layers]
    assert scales == [4 ** -0.5, 1.0]
    rebuilt = LayerwiseForCausalLM(ModelConfig.from_dict(model.config.to_dict()))
    assert [layer.attn.depth_scale for layer in rebuilt.model.layers] == scales


@pytest.mark.parametrize("preset", RESIDUAL_SCHEMES)
def test_fresh_model_with_a_tied_loop_trains_and_decodes_for_every_residual_scheme(preset):
    blocks = dict(attnres_blocks=3) if preset == "block-attnres" else {}  # 12 sublayers in blocks of 2 layers
    model = tiny_model(preset, n_layers=6, layer_order=[0, 1, 2, 1, 2, 3], dtype=torch.float64, **blocks)
    assert len(model.model.layers) == 4
    ids = torch.randint(1, VOCAB, (2, 8))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    tied = model.model.layers[1].attn.fn.q_proj.weight
    assert tied.grad is not None and tied.grad.abs().sum() > 0
    model.eval()
    assert_cached_generate_is_greedy(model)


def test_value_residual_reads_the_execution_position():
    # Position 0 exports the values every later position mixes; a tied loop over layer 0 must not re-export.
    model = tiny_model("resformer", n_layers=3, layer_order=[0, 1, 0], dtype=torch.float64)
    seen = []
    original = model.model.value_residual.forward
    model.model.value_residual.forward = lambda idx, *a: (seen.append(idx), original(idx, *a))[1]
    model(input_ids=torch.randint(1, VOCAB, (1, 5)))
    assert seen == [0, 1, 2]


def test_old_config_with_dropped_layers_loads_as_layer_origin(tmp_path):
    model = tiny_model("pre-rmsnorm", n_layers=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("layer_origin", None)
    config.pop("layer_order", None)
    config["layerwise_dropped_layers"] = [1, 3]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.layer_origin == [0, 2]
    ids = torch.randint(1, VOCAB, (1, 6))
    assert torch.equal(full_logits(loaded.eval(), ids), full_logits(model, ids))


@pytest.mark.parametrize("fields, message", [
    (dict(layer_order=[0, 1, 0]), r"ModelConfig\.layer_order=\[0, 1, 0\] has 3 entries but n_layers=4"),
    (dict(layer_order=[0, 2, 0, 2]), r"ModelConfig\.layer_order=.* never runs stored layer\(s\) \[1\]"),
    (dict(layer_order=[0, -1, 0, 1]), r"ModelConfig\.layer_order=.* non-negative integers"),
    (dict(layer_origin=[0, 1]), r"ModelConfig\.layer_origin=\[0, 1\] has 2 entries"),
    (dict(layer_order=[0, 1, 0, 1], layer_origin=[0, 1, 2, 1]), r"ModelConfig\.layer_origin=.* positions 0 and 2"),
    (dict(norm_placement="mixln", mixln_ratio=0.5, layer_order=[0, 1, 0, 1]),
     r"ModelConfig\.layer_order=.* lays out differently"),
])
def test_invalid_programs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("pre-rmsnorm", "tiny", **fields)


@pytest.mark.parametrize("preset, order, reason", [
    ("block-attnres", [0, 1, 3], "cannot drop layers of a residual='block_attnres' model: AttnRes keeps"),
    ("resformer", [0, 1, 1, 2, 3], "cannot repeat layers of a value_residual='resformer' model: the value mix"),
    ("attnres", [0, 1, 1, 2, 3], "cannot repeat layers of a residual='full_attnres' model: AttnRes keeps a trained"),
    ("pre-rmsnorm", [0, 4], r"layer 4 in the layer program is not a position .* 0\.\.3"),
    ("pre-rmsnorm", [], "layer program is empty"),
])
def test_programs_a_model_cannot_take_are_refused_with_the_reason(preset, order, reason):
    model = tiny_model(preset)
    with pytest.raises(UserError, match=reason):
        check_layerwise_program(model, order, tie=True)
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("preset, order", [("delta-attnres", [1, 0, 2, 3]), ("mix-ln", [0, 1, 3])])
def test_position_dependent_models_run_a_program_in_memory_but_refuse_to_save_it(preset, order, tmp_path):
    """As drop does: the reshaped model can be scored in memory, but its config would rebuild its layers at
    their new positions differently, so saving it is refused with the reason."""
    model = program_layers(tiny_model(preset), order)
    assert model.config.layer_origin == order
    model(torch.randint(0, VOCAB, (1, 6)))
    with pytest.raises(UserError, match=r"layer_origin=.* cannot be combined with"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_diagnostic_views_follow_execution_positions():
    from layerwise.diagnose.trace import layerwise_trace

    model = tiny_model("pre-rmsnorm", n_layers=6, layer_order=[0, 1, 2, 1, 2, 3], dtype=torch.float64)
    ids = torch.randint(1, VOCAB, (1, 7))
    trace = layerwise_trace(model, ids)
    assert len(trace.hidden) == 7 and len(trace.sublayers) == 6 and trace.attention_entropy.shape == (6,)
    torch.testing.assert_close(trace.logits, full_logits(model, ids), rtol=0, atol=1e-12)
    h = trace.hidden
    for p in range(6):
        torch.testing.assert_close(h[p + 1] - h[p], trace.sublayers[p].attn_out + trace.sublayers[p].mlp_out)


def test_forward_context_position_defaults_to_the_layer_slot():
    assert ForwardContext(rope=(torch.zeros(1), torch.zeros(1))).position is None


def test_pruned_lns_model_saves_and_reloads_with_each_layers_own_scale(tmp_path):
    from layerwise.transform import drop_layers, save_pruned

    pruned = drop_layers(tiny_model("lns", dtype=torch.float64), [1, 3])
    save_pruned(pruned, None, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.layer_origin == [0, 2] and not loaded.config.layerwise_dropped_layers
    assert [layer.attn.depth_scale for layer in loaded.model.layers] == [1.0, 1 / math.sqrt(3)]
    ids = torch.randint(1, VOCAB, (2, 10))
    assert torch.equal(full_logits(loaded, ids), full_logits(pruned, ids))


def test_dropping_a_layer_of_a_tied_model_drops_that_position_only():
    from layerwise.transform import drop_layers

    model = tiny_model("pre-rmsnorm", n_layers=6, layer_order=[0, 1, 2, 1, 2, 3], dtype=torch.float64)
    ids = torch.randint(1, VOCAB, (2, 10))
    expected = by_hand(model, [0, 1, 2, 1, 3], ids)  # stored layers, by hand: position 4 (layer 2's rerun) gone
    pruned = drop_layers(model, [4])
    assert pruned.config.layer_order == [0, 1, 2, 1, 3] and len(pruned.model.layers) == 4
    assert pruned.config.layer_origin == [0, 1, 2, 1, 3]
    torch.testing.assert_close(full_logits(pruned, ids), expected, rtol=0, atol=1e-12)
    assert_cached_generate_is_greedy(pruned)


@pytest.mark.parametrize("preset", ["pre-rmsnorm", "attnres"])
def test_depth_telemetry_reports_every_execution_position_of_a_tied_model(preset):
    import contextlib

    from layerwise.train.telemetry import measure_depth

    model = tiny_model(preset, n_layers=6, layer_order=[0, 1, 2, 1, 2, 3])
    rec = measure_depth(model, torch.randint(1, VOCAB, (2, 8)), contextlib.nullcontext())
    assert len(rec["hidden_rms"]) == 7 and len(rec["attn_contribution"]) == len(rec["mlp_contribution"]) == 6
    # Positions 1 and 3 run one layer on different inputs: their contributions differ.
    assert rec["attn_contribution"][1] != rec["attn_contribution"][3]
