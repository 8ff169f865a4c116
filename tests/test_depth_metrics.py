"""One metric vocabulary: training telemetry and `layerwise diagnose` report the same number under each shared
name, on every kind of model, and each name means what `layerwise.depth_metrics` says."""

from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_model

from layerwise.diagnose import diagnose
from layerwise.nn.hooks import capture
from layerwise.reference import mean_token_rms
from layerwise.report.comparison import telemetry_series
from layerwise.train.telemetry import measure_depth

# Standard stream, post-add layers, BHyT's parallel layer (one shared statistic), and every routing scheme.
PRESETS = ["pre-rmsnorm", "post-ln", "bhyt", "block-attnres", "attnres", "delta-attnres", "delta-block-attnres"]


def trained_looking(preset):
    overrides = {"attnres_blocks": 3} if preset in ("block-attnres", "delta-block-attnres") else {}
    return tiny_model(preset, n_layers=3, random_queries=True, **overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_telemetry_and_diagnose_agree_on_every_shared_name(preset):
    model = trained_looking(preset)
    ids = torch.randint(0, 256, (2, 12))
    telemetry = measure_depth(model, ids, nullcontext())
    diagnosis = diagnose(model, [ids], n_span=2, removal=False, attention_entropy=False).metrics()
    shared = set(telemetry) & set(diagnosis)
    assert shared == {"hidden_rms", "hidden_var", "layer_contribution", "attn_contribution", "mlp_contribution"}
    for name in shared:
        torch.testing.assert_close(torch.tensor(telemetry[name], dtype=torch.float64), diagnosis[name],
                                   rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("preset", ["pre-rmsnorm", "block-attnres"])
def test_hidden_rms_is_the_per_token_rms_of_the_readout_and_ends_at_the_final_norm_input(preset):
    model = trained_looking(preset)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), capture(model, ["model.layers.*.attn.hook_in", "model.hook_final_norm_in"]) as seen:
        model(ids)
    telemetry = measure_depth(model, ids, nullcontext())
    attn_inputs = [mean_token_rms(seen[f"model.layers.{i}.attn.hook_in"].double()).item() for i in range(3)]
    h_L = seen["model.hook_final_norm_in"].double()
    assert telemetry["hidden_rms"][-1] == pytest.approx(mean_token_rms(h_L).item(), rel=1e-12)
    if preset == "pre-rmsnorm":  # the stream is what each layer reads
        assert telemetry["hidden_rms"][:3] == pytest.approx(attn_inputs, rel=1e-12)
        assert "routed_input_rms" not in telemetry
    else:  # AttnRes: a sublayer reads its own routing, which is not the readout h_l
        assert telemetry["routed_input_rms"] == pytest.approx(attn_inputs, rel=1e-12)
        assert telemetry["hidden_rms"][1:3] != pytest.approx(attn_inputs[1:], rel=1e-3)


def test_hidden_rms_is_the_mean_over_tokens_not_one_rms_over_all_values():
    model = trained_looking("pre-rmsnorm")
    ids = torch.randint(0, 256, (2, 12))
    telemetry = measure_depth(model, ids, nullcontext())
    h0 = model.model.embed_tokens(ids).detach()
    assert telemetry["hidden_rms"][0] == pytest.approx(mean_token_rms(h0.double()).item(), rel=1e-12)
    assert telemetry["hidden_rms"][0] != pytest.approx(h0.pow(2).mean().sqrt().item(), rel=1e-4)


def test_measuring_depth_leaves_no_hooks_and_restores_training_mode():
    model = trained_looking("block-attnres").train()
    measure_depth(model, torch.randint(0, 256, (1, 6)), nullcontext())
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_the_comparison_plot_reads_runs_logged_under_the_old_names():
    old = {"hidden_rms": [1.0, 2.0], "attn_ratio": [0.5], "mlp_ratio": [0.25]}
    new = {"hidden_rms": [1.0, 2.0], "attn_contribution": [0.4], "mlp_contribution": [0.2]}
    assert telemetry_series(old, "mlp_contribution") == [0.25] and telemetry_series(old, "attn_contribution") == [0.5]
    assert telemetry_series(new, "mlp_contribution") == [0.2] and telemetry_series(new, "hidden_rms") == [1.0, 2.0]
    assert telemetry_series(None, "hidden_rms") is None and telemetry_series(old, "grad_norm_layers") is None
