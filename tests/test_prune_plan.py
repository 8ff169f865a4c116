"""Choosing what to prune: each strategy picks what an independent computation picks. The references here
rebuild every candidate with `drop_layers` on a copy and score it with a plain forward (greedy, SLEB), read
`diagnose`'s removal_delta_loss (removal), or hook each layer's input and output (angular), so a mistake in the
in-memory skipping the plan measures with cannot hide."""

import copy
import json

import conftest
import numpy as np
import pytest
import torch
import transformers
import typer
from conftest import layer_calls, mean_loss, tiny_model
from typer.testing import CliRunner

from layerwise.data.corpus import byte_tokens, shakespeare_text
from layerwise.data.shards import read_shard, write_shard
from layerwise.diagnose import depth_view, diagnose
from layerwise.diagnose.pruning import plan_pruning
from layerwise.errors import UserError
from layerwise.transform import drop_layers
from layerwise.transform.cli import prune_command

N_LAYERS = 6


@pytest.fixture(scope="module")
def trained():
    """A 6-layer tiny model after a few Adam steps (float32) on Shakespeare bytes, then in float64, so removing a
    layer costs amounts that differ by far more than rounding."""
    model = tiny_model(n_layers=N_LAYERS)
    text = byte_tokens(shakespeare_text()[:8000])
    windows = text[: (len(text) // 33) * 33].reshape(-1, 33)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(6):
        batch = windows[step * 8:(step + 1) * 8]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.double().eval()
    return model, [windows[-4:-2], windows[-2:]]  # held-out calibration batches



def exhaustive_greedy(model, batches, n_remove):
    """SLEB by brute force: each round, every remaining layer removed for real from a copy and scored."""
    removed, rounds = [], []
    for _ in range(n_remove):
        losses = {i: mean_loss(drop_layers(copy.deepcopy(model), sorted(removed + [i])), batches)
                  for i in range(len(depth_view(model).layers)) if i not in removed}
        best = min(losses, key=losses.get)
        rounds.append((best, losses))
        removed.append(best)
    return rounds


def assert_greedy_matches_exhaustive(model, batches, n_remove):
    seen = []
    plan = plan_pruning(model, batches, n_remove, "greedy", on_round=lambda k, r: seen.append((k, r)))
    assert seen == list(enumerate(plan.rounds, start=1))
    reference = exhaustive_greedy(model, batches, n_remove)
    assert [r.removed for r in plan.rounds] == [[best] for best, _ in reference]
    for measured, (_, losses) in zip(plan.rounds, reference):
        assert [layers for layers, _ in measured.candidates] == [(i,) for i in losses]
        np.testing.assert_allclose([v for _, v in measured.candidates], list(losses.values()), rtol=1e-10)
    assert plan.removed == sorted(best for best, _ in reference)
    assert plan.pruned_loss == pytest.approx(reference[-1][1][reference[-1][0]], rel=1e-10)
    assert plan.full_loss == pytest.approx(mean_loss(model, batches), rel=1e-10)
    return plan


def test_greedy_picks_what_exhaustive_search_over_rebuilt_models_picks(trained):
    model, batches = trained
    plan = assert_greedy_matches_exhaustive(model, batches, 3)
    assert len(plan.rounds) == 3 and [len(r.candidates) for r in plan.rounds] == [6, 5, 4]
    # Trained, so the choice is not arbitrary: the best candidate of round 1 beats the worst by a clear margin.
    values = [v for _, v in plan.rounds[0].candidates]
    assert max(values) - min(values) > 1e-3


def test_greedy_on_a_hugging_face_family_picks_what_exhaustive_search_picks():
    model = conftest.hf_model("qwen2", num_hidden_layers=5).double()
    batches = [torch.randint(1, 128, (2, 24)) for _ in range(2)]
    assert_greedy_matches_exhaustive(model, batches, 2)


def test_removal_strategy_is_diagnoses_removal_delta_loss_sorted(trained):
    model, batches = trained
    plan = plan_pruning(model, batches, 2, "removal")
    delta = diagnose(model, batches, n_span=2, attention_entropy=False)["removal_delta_loss"]
    np.testing.assert_allclose([v for _, v in plan.rounds[0].candidates], delta.tolist(), rtol=1e-9, atol=1e-12)
    assert plan.removed == sorted(delta.argsort()[:2].tolist())
    assert plan.pruned_loss == pytest.approx(mean_loss(drop_layers(copy.deepcopy(model), plan.removed), batches),
                                             rel=1e-10)


def layer_boundaries(model, ids):
    """h_0..h_L from forward hooks on each layer: its input, and the last layer's output (never final-normed)."""
    calls = layer_calls(model, ids)
    return [inputs for inputs, _ in calls] + [calls[-1][1]]


@pytest.mark.parametrize("n_remove", [1, 2, 3])
def test_angular_strategy_removes_the_span_closest_in_angle_at_the_last_token(trained, n_remove):
    model, batches = trained
    distance = torch.zeros(N_LAYERS - n_remove + 1, dtype=torch.float64)
    for ids in batches:
        h = layer_boundaries(model, ids)
        for first in range(len(distance)):
            a, b = h[first][:, -1], h[first + n_remove][:, -1]
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            distance[first] += (torch.arccos(cos.clamp(-1, 1)) / torch.pi).sum()
    distance /= sum(ids.shape[0] for ids in batches)
    plan = plan_pruning(model, batches, n_remove, "angular")
    np.testing.assert_allclose([v for _, v in plan.rounds[0].candidates], distance.tolist(), rtol=1e-9)
    first = int(distance.argmin())
    assert plan.removed == list(range(first, first + n_remove))
    assert plan.pruned_loss == pytest.approx(mean_loss(drop_layers(copy.deepcopy(model), plan.removed), batches),
                                             rel=1e-10)


@pytest.mark.parametrize("n_remove, strategy, message", [
    (0, "greedy", "--remove 0"), (N_LAYERS, "greedy", f"--remove {N_LAYERS}"), (1, "random", "--strategy 'random'")])
def test_a_plan_that_removes_nothing_or_everything_or_by_an_unknown_strategy_is_refused(trained, n_remove, strategy,
                                                                                       message):
    model, batches = trained
    with pytest.raises(UserError, match=message):
        plan_pruning(model, batches, n_remove, strategy)


# ---- the command -------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A small random Llama on disk and a token shard to calibrate it on (it has no tokenizer)."""
    source, shard = tmp_path / "tiny", tmp_path / "calib.bin"
    conftest.hf_model("llama", num_hidden_layers=5).save_pretrained(source)
    write_shard(shard, np.random.default_rng(0).integers(1, 128, 400), vocab_size=128)
    return source, shard


def cli(*args):
    app = typer.Typer()
    app.command()(prune_command)
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("strategy", ["angular", "removal", "greedy"])
def test_prune_command_writes_the_model_and_a_plan_whose_pruned_loss_the_saved_model_has(saved, tmp_path, strategy):
    source, shard = saved
    out = tmp_path / "pruned"
    result = cli(source, "--remove", 2, "--strategy", strategy, "--data", shard, "--tokens", 256, "--seq-len", 64,
                 "--batch-size", 2, "--out", out)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["strategy"] == strategy and plan["n_remove"] == 2 and plan["n_layers"] == 5
    assert plan["calibration"] == {"data": str(shard), "tokens": 256, "seq_len": 64, "batch_size": 2}
    removed = plan["removed_layers"]
    assert len(removed) == 2 and plan["removed_original_layers"] == removed
    assert f"removed layers {', '.join(map(str, removed))} (0-based) of 5; 3 remain" in result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.layer_origin == [i for i in range(5) if i not in removed]
    windows = torch.as_tensor(read_shard(shard)[0][:256].astype("int64")).reshape(4, 64)
    batches = [windows[:2], windows[2:]]
    assert plan["pruned_loss"] == pytest.approx(mean_loss(loaded, batches), rel=1e-5)
    original = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert plan["full_loss"] == pytest.approx(mean_loss(original, batches), rel=1e-5)


def test_prune_command_names_the_option_it_refuses(saved, tmp_path):
    source, shard = saved
    out = tmp_path / "pruned"
    for args, message in [
        (["--remove", 5, "--strategy", "greedy"], "--remove 5: the model has 5 layers; remove 1..4"),
        (["--remove", 0, "--strategy", "greedy"], "--remove 0"),
        (["--remove", 2, "--strategy", "random"], "--strategy 'random'"),
        (["--remove", 2], "needs --strategy"),
        (["--remove", 2, "--strategy", "greedy", "--drop", "1"], "exactly one of --drop"),
        ([], "exactly one of --drop"),
        (["--drop", "1", "--strategy", "greedy"], "drop --strategy"),
    ]:
        result = cli(source, *args, "--data", shard, "--tokens", 256, "--seq-len", 64, "--out", out)
        assert result.exit_code != 0 and isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception), (args, str(result.exception))
    assert not out.exists()
