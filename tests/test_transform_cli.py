"""`layerwise transform MODEL --apply ... --out DIR`, the step registry behind it, and `--apply` in eval and
diagnose: steps run in order, the saved folder loads and says how it was made, mistakes cost nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from conftest import hf_model, tiny_model
from layerwise.cli import app
from layerwise.errors import UserError
from layerwise.transform import apply, parse_steps, registered_steps

runner = CliRunner()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_registered_step_is_described_in_the_help():
    help_text = runner.invoke(app, ["transform", "--help"], env={"COLUMNS": "200"}).output
    for name in registered_steps():
        assert f"  {name}" in help_text, f"step {name!r} is registered but `layerwise transform --help` omits it"


def test_apply_runs_steps_in_order_and_records_them():
    model = tiny_model("pre-ln", n_layers=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    expected_layers = [model.model.layers[i] for i in (0, 3)]
    out = apply(model, ["drop=1", "drop=1"], source="somewhere/model")  # the second drop=1 is the original 2
    assert [layer for layer in out.model.layers] == expected_layers
    assert out.config.layerwise_transforms == ["drop=1", "drop=1"]
    assert out.config.layerwise_source == "somewhere/model"
    assert _logits(out, ids).shape == (1, 12, model.config.vocab_size)


def test_every_step_is_parsed_before_any_runs():
    model = tiny_model("pre-ln", n_layers=4)
    with pytest.raises(UserError, match=r"unknown step 'dorp'; valid steps: .*drop"):
        apply(model, ["drop=1", "dorp=2"])
    assert model.config.n_layers == 4  # the valid first step did not run
    for bad, message in [("drop", "needs an argument"), ("drop=5-3", "runs backwards")]:
        with pytest.raises(UserError, match=message):
            parse_steps([bad])


def test_a_step_the_model_cannot_take_is_refused_with_the_reason():
    model = tiny_model("pre-ln", n_layers=4)
    with pytest.raises(UserError, match=r"--apply 'drop=7'.*out of range for a 4-layer model"):
        apply(model, ["drop=7"])
    with pytest.raises(UserError, match=r"--apply 'drop=0-3'.*leaves no model"):
        apply(model, ["drop=0-3"])


def test_transform_command_saves_a_loadable_model_with_its_provenance_and_card(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "out"
    hf_model("llama").save_pretrained(source)
    result = runner.invoke(app, ["transform", str(source), "--apply", "drop=1", "--apply", "drop=0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "4 -> 2 layers" in result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert loaded.config.num_hidden_layers == 2
    assert config["layerwise_transforms"] == ["drop=1", "drop=0"] and config["layerwise_source"] == str(source)
    card = (out / "README.md").read_text()
    assert "`drop=1`, `drop=0`" in card and str(source) in card and "AutoModelForCausalLM" in card


def test_transform_command_never_writes_over_another_folder_and_a_typo_loads_nothing(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "out"
    hf_model("llama").save_pretrained(source)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "layerwise.cli", "transform", str(source), "--apply", "drop=1",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "folder is not empty" in proc.stdout and "Traceback" not in proc.stderr
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    proc = subprocess.run([sys.executable, "-m", "layerwise.cli", "transform", str(tmp_path / "missing"),
                           "--apply", "flod-norms", "--out", str(tmp_path / "new")], capture_output=True, text=True)
    # The step is checked before the model is looked for: the message is about the step.
    assert proc.returncode == 2 and "unknown step 'flod-norms'" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_diagnose_applies_steps_in_memory(tmp_path):
    import numpy as np

    from layerwise.data.shards import write_shard

    source = tmp_path / "tiny"
    model = hf_model("llama")
    model.save_pretrained(source)
    shard = write_shard(tmp_path / "ids.bin", np.arange(64) % model.config.vocab_size, model.config.vocab_size)
    result = runner.invoke(app, ["diagnose", str(source), "--apply", "drop=0-1", "--tokens", "64", "--seq-len", "16",
                                 "--batch-size", "2", "--n-span", "1", "--no-removal", "--no-attention-entropy",
                                 "--data", str(shard),
                                 "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "d" / "diagnosis.json").read_text())
    assert report["apply"] == ["drop=0-1"] and report["n_layers"] == 2
    assert model.config.num_hidden_layers == 4 and json.loads((source / "config.json").read_text())[
        "num_hidden_layers"] == 4  # in memory only: the folder on disk is untouched


def test_transform_without_steps_saves_the_model_as_it_loads(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "out"
    model = hf_model("qwen2")
    model.save_pretrained(source)
    result = runner.invoke(app, ["transform", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "no steps: saved as loaded" in result.output
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids), _logits(model, ids))


def test_prune_records_its_step_and_source_like_transform(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "out"
    hf_model("llama").save_pretrained(source)
    result = runner.invoke(app, ["prune", str(source), "--drop", "1-2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((out / "config.json").read_text())
    assert config["layerwise_transforms"] == ["drop=1,2"] and config["layerwise_source"] == str(source)
    assert config["layer_origin"] == [0, 3] and "`drop=1,2`" in (out / "README.md").read_text()


def test_transform_overwrite_replaces_only_a_model_folder_and_never_the_source(tmp_path):
    source = tmp_path / "tiny"
    hf_model("llama").save_pretrained(source)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["transform", str(source), "--apply", "drop=1", "--out", str(mine), "--overwrite"])
    assert refused.exit_code != 0 and "holds none" in str(refused.exception)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # not a model folder: kept whole
    for target in (source, tmp_path):  # the model being read, and a folder holding it
        refused = runner.invoke(app, ["transform", str(source), "--apply", "drop=1", "--out", str(target),
                                      "--overwrite"])
        assert refused.exit_code != 0 and "is or contains the model being read" in str(refused.exception)
    assert transformers.AutoModelForCausalLM.from_pretrained(source).config.num_hidden_layers == 4
    previous = tmp_path / "previous"  # an earlier transform's output: --overwrite replaces it, whole
    assert runner.invoke(app, ["transform", str(source), "--apply", "drop=1", "--out", str(previous)]).exit_code == 0
    replaced = runner.invoke(app, ["transform", str(source), "--apply", "drop=0-1", "--out", str(previous),
                                   "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert transformers.AutoModelForCausalLM.from_pretrained(previous).config.num_hidden_layers == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
