"""Attention Residuals (Kimi, arXiv 2603.15031) and Delta AttnRes, checked in float64 against their formulas
written out source by source in `layerwise.reference`."""

import pytest
import torch
from conftest import tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.hooks import capture
from layerwise.nn.residual import DepthAttention
from layerwise.reference import block_attnres_logits, delta_attnres_logits, depth_attention, full_attnres_logits


def test_attnres_with_zero_queries_is_the_mean_of_its_sources():
    sources = torch.randn(5, 2, 7, 16, dtype=torch.float64)
    mix = DepthAttention(dim=16).double()  # pseudo-query initialised to zero
    torch.testing.assert_close(mix(list(sources)), sources.mean(0))


def test_depth_attention_matches_the_formula_with_learned_queries():
    mix = DepthAttention(dim=16).double()
    with torch.no_grad():
        mix.query.normal_()
        mix.key_norm.weight.uniform_(0.5, 1.5)
    sources = list(torch.randn(4, 2, 3, 16, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1, 2.0]).view(4, 1, 1, 1))
    torch.testing.assert_close(mix(sources), depth_attention(mix, sources))


def _model(residual, n_layers=3, queries="random", **overrides):
    return tiny_model(n_layers=n_layers, residual=residual, dtype=torch.float64, random_queries=queries == "random",
                      **overrides)


def _embed_and_context(model, ids):
    """The embedding output and the forward context, exactly as the model's forward makes them."""
    return model.model.embed(input_ids=ids)


@pytest.mark.parametrize("n_blocks", [1, 2, 4, 8])
@pytest.mark.parametrize("queries", ["zero", "random"])
def test_block_attnres_matches_the_block_formula(n_blocks, queries):
    model = _model("block_attnres", n_layers=4, attnres_blocks=n_blocks, queries=queries)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, block_attnres_logits(model, ids, 8 // n_blocks))


@pytest.mark.parametrize("n_layers,n_blocks", [(3, 2), (6, 4), (12, 8)])
def test_block_attnres_refuses_blocks_that_split_a_layer(n_layers, n_blocks):
    """Blocks hold whole layers (a block of S sublayers is P = S/2 layers); 12 layers in 8 blocks would be 3
    sublayers each."""
    with pytest.raises(ValueError, match=rf"ModelConfig\.attnres_blocks={n_blocks} .*split a layer"):
        _model("block_attnres", n_layers=n_layers, attnres_blocks=n_blocks)


@pytest.mark.parametrize("size", ["tiny", "124m", "350m", "1b"])
def test_block_attnres_preset_puts_whole_layers_in_each_block_with_n_nearest_8(size):
    cfg = ModelConfig.from_preset("block-attnres", size)
    n_layers, n_blocks = cfg.n_layers, cfg.attnres_blocks
    assert n_layers % n_blocks == 0  # 2L / N sublayers per block is even
    assert n_blocks == {"tiny": 4, "124m": 6, "350m": 8, "1b": 8}[size]


def test_full_attnres_matches_its_formula():
    model = _model("full_attnres", n_layers=3)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, full_attnres_logits(model, ids))


def test_block_attnres_with_one_sublayer_per_block_equals_full_attnres():
    full = _model("full_attnres", n_layers=3)
    block = _model("block_attnres", n_layers=3, attnres_blocks=6)
    block.load_state_dict(full.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(block(ids).logits, full(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("n_layers,n_blocks", [(6, 12), (6, 6), (6, 3), (6, 2), (6, 1), (4, 8), (5, 5), (27, 9)])
def test_block_attnres_output_reads_floor_of_l_minus_1_over_p_plus_2_sources(n_layers, n_blocks):
    model = _model("block_attnres", n_layers=n_layers, attnres_blocks=n_blocks, queries="zero")
    with capture(model, "model.residual.final_mixer.hook_weights") as seen:
        model(torch.randint(0, 256, (1, 4)))
    counts = [w.shape[0] for w in seen.calls("model.residual.final_mixer.hook_weights")]  # [S, B, T] weights
    block_size = 2 * n_layers // n_blocks
    assert counts == [(2 * n_layers - 1) // block_size + 2]
    if block_size % 2 == 0:  # the paper's form, with P = S/2 layers per block
        assert counts[0] == (n_layers - 1) // (block_size // 2) + 2


def test_kimi_linear_48b_shape_has_ten_output_sources():
    """Kimi Linear 48B's shape, 27 layers in 9 blocks of 6 sublayers: 9 blocks + embedding = 10 sources."""
    cfg = ModelConfig.from_preset("block-attnres", "tiny", n_layers=27, attnres_blocks=9)
    with torch.device("meta"):
        model = LayerwiseForCausalLM(cfg)
    assert model.model.residual.source_count_at_output(27) == 10


def test_attnres_pseudo_queries_start_at_zero():
    for preset in ["attnres", "block-attnres", "delta-attnres", "delta-block-attnres"]:
        model = LayerwiseForCausalLM(ModelConfig.from_preset(preset, "tiny"))
        queries = [p for n, p in model.named_parameters() if n.endswith(".query")]
        assert queries and all(torch.count_nonzero(q) == 0 for q in queries)


def test_delta_attnres_routes_over_per_sublayer_changes():
    model = _model("delta_attnres", n_layers=3)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, delta_attnres_logits(model, ids))


def _mixer_sources(model, ids):
    """(mixer index, its sources) for every depth-attention mixer in one forward, in call order."""
    with capture(model, "model.residual.mixers.*.hook_sources") as seen:
        model(ids)
    return [(j, list(seen[f"model.residual.mixers.{j}.hook_sources"])) for j in range(len(model.model.residual.mixers))]


def test_delta_block_sources_are_block_deltas_not_alternating_sums():
    """Sources must be [e, D_0, D_1, ...] with D_k = h_start(k+1) - h_start(k); the released code's
    h - sources[-1] gives [e, D_0, e + D_1, ...] instead."""
    model = _model("delta_block_attnres", n_layers=4, attnres_blocks=4)  # one layer per block
    ids = torch.randint(0, 256, (1, 5))
    e, ctx = _embed_and_context(model, ids)
    records = _mixer_sources(model, ids)
    # Recompute the stream at each block start from the recorded forward: block starts are layers 0..3.
    last_sources = records[-1][1]  # the last MLP sublayer sees all four block sources
    assert len(last_sources) == 4
    torch.testing.assert_close(last_sources[0], e)
    # Each source is h at a block start minus h at the previous block start: they sum to h at the last start.
    block_starts = torch.cumsum(torch.stack(last_sources), 0)
    # h at the start of layer k = e + all sublayer outputs of layers < k; check against a reference forward.
    ref_states = _stream_at_layer_starts(model, ids)
    for k in range(4):
        torch.testing.assert_close(block_starts[k], ref_states[k])
    buggy_third = ref_states[2] - last_sources[1]  # what h - sources[-1] would have appended
    assert not torch.allclose(buggy_third, last_sources[2])


def _stream_at_layer_starts(model, ids):
    states = []
    # The stream itself is not an input of branch (AttnRes adds routing), so rebuild it from branch outputs.
    with capture(model, "model.layers.*.hook_out") as seen:
        model(ids)
    outputs = list(seen.values())  # attention then MLP of each layer, in layer order
    e, _ = _embed_and_context(model, ids)
    h = e
    for k in range(len(model.model.layers)):
        states.append(h)
        h = h + outputs[2 * k] + outputs[2 * k + 1]
    return states


def test_delta_block_with_one_block_per_layer_routes_over_layer_deltas():
    model = _model("delta_block_attnres", n_layers=3, attnres_blocks=3)
    ids = torch.randint(0, 256, (2, 6))
    records = _mixer_sources(model, ids)
    # Sublayer j (mixer j-1): attention of layer k sees k+1 sources once its block source is appended after it.
    counts = [len(sources) for _, sources in records]
    assert counts == [1, 1, 2, 2, 3]  # mlp0, attn1, mlp1, attn2, mlp2
