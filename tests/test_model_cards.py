"""Every model folder layerwise writes carries a README.md model card: base model, recipe or steps, data and
tokens, and the evaluation its writer measured; text from outside cannot restructure it."""

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import conftest
from layerwise.data.shards import write_shard
from layerwise.model_card import code, escaped, render_card
from layerwise.runs import read_metrics
from layerwise.train.checkpoint import list_checkpoints, verify_checkpoint
from layerwise.train.config import TrainConfig
from layerwise.train.trainer import train
from layerwise.transform import apply
from layerwise.transform.card import model_card
from layerwise.transform.cli import prune_command


def test_text_from_outside_shows_as_written_and_cannot_add_headings_rows_or_lines():
    assert escaped("a*b_c|d<e>\n# f") == r"a\*b\_c\|d\<e\> \# f"
    assert code("runs/a`b") == "``runs/a`b``" and code("`x`") == "`` `x` ``" and code("a\nb") == "`a b`"
    model = apply(conftest.tiny_model("pre-ln", n_layers=2), ["drop=1"], source="evil|path\n# Injected `x`")
    card = model_card(model, evaluation={"loss | ppl\n# row": 1.5})
    assert not any(line.startswith("# Injected") or line.startswith("# row") for line in card.splitlines())
    assert "- base model: `` evil|path # Injected `x` ``" in card  # CommonMark strips the pad spaces
    table = [line for line in card.splitlines() if line.startswith("| loss")]
    assert table == [r"| loss \| ppl \# row | 1.5000 |"]  # one row of two cells: the pipe is escaped


def test_a_card_without_evaluation_figures_has_no_evaluation_section():
    card = render_card("t", [("data", "d")])
    assert "## Evaluation" not in card and "- data: d" in card


def test_checkpoint_cards_name_base_recipe_data_tokens_and_the_held_out_loss_measured_at_that_step(corpus,
                                                                                                   tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(model=dict(preset="lns", size="tiny", n_layers=2), data=str(corpus), out=str(run),
                      max_tokens=4 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, warmup=1, eval_every=4,
                      eval_batches=2, ckpt_every=2, keep_checkpoints=2, log_every=1, tensorboard=False)
    train(cfg)
    middle, final = list_checkpoints(run)
    final_card, middle_card = (final / "README.md").read_text(), (middle / "README.md").read_text()
    val = [r for r in read_metrics(run) if "val_loss" in r][-1]
    assert val["step"] == 4
    for expected in ("preset `lns` at size `tiny` with n\\_layers=`2`", f"- data: `{corpus}`",
                     "- tokens trained: 512 (4 of 4 steps)", "lr 0.003 with a cosine schedule",
                     f"| held-out loss | {val['val_loss']:.4f} |", "on the first 8 windows of 32 tokens"):
        assert expected in final_card, expected
    # Step 2 was not evaluated: its card says so by having no figures rather than borrowing step 0's.
    assert "- tokens trained: 256 (2 of 4 steps)" in middle_card and "## Evaluation" not in middle_card
    assert "README.md" in verify_checkpoint(final)["files"]  # the manifest covers the card like the weights


@pytest.fixture
def calibrated(tmp_path):
    source, shard = tmp_path / "tiny", tmp_path / "calib.bin"
    conftest.hf_model("llama", num_hidden_layers=4).save_pretrained(source)
    write_shard(shard, np.random.default_rng(0).integers(1, 128, 400), vocab_size=128)
    return source, shard


def prune(*args):
    app = typer.Typer()
    app.command()(prune_command)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_planned_prune_card_reports_the_plans_calibration_losses_and_a_named_drop_reports_none(calibrated,
                                                                                                 tmp_path):
    source, shard = calibrated
    result = prune(source, "--remove", 1, "--strategy", "removal", "--data", shard, "--tokens", 256,
                   "--seq-len", 64, "--out", tmp_path / "planned")
    assert result.exit_code == 0, result.output + repr(result.exception)
    plan = json.loads((tmp_path / "planned" / "prune_plan.json").read_text())
    card = (tmp_path / "planned" / "README.md").read_text()
    assert f"- steps, in order: `drop={plan['removed_layers'][0]}`" in card
    assert f"- calibration data: `{shard}`, 256 tokens in windows of 64 (removal chose the layers)" in card
    assert f"| calibration loss, full model | {plan['full_loss']:.4f} |" in card
    assert f"| calibration loss, pruned | {plan['pruned_loss']:.4f} |" in card
    result = prune(source, "--drop", 2, "--out", tmp_path / "named")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "named" / "README.md").read_text()
    assert "`drop=2`" in card and f"- base model: `{source}`" in card and "## Evaluation" not in card
