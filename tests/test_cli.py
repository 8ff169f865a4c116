"""The `layerwise` command line and the bundled corpus, run as a user would."""

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data.corpus import byte_tokens, shakespeare_files, shakespeare_text, train_val_split
from layerwise.presets import PRESETS

runner = CliRunner()


def test_presets_json_lists_every_preset_with_paper_and_parameters():
    result = runner.invoke(app, ["presets", "--json", "--size", "124m"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["name"] for row in data["presets"]] == list(PRESETS)
    by_name = {row["name"]: row for row in data["presets"]}
    assert by_name["lns"]["changes"] == {"layernorm_scaling": True}
    assert 123e6 < by_name["pre-ln"]["params"] < 125e6


def test_presets_table_and_help_render():
    assert "block-attnres" in runner.invoke(app, ["presets"]).output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output and "presets" in result.output


def test_bad_input_exits_nonzero_with_one_line_reason():
    proc = subprocess.run([sys.executable, "-m", "layerwise.cli", "demo", "--presets", "pre-ln,nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown preset 'nope'" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_demo_trains_presets_on_shakespeare_and_prints_the_table():
    result = runner.invoke(app, ["demo", "--presets", "pre-ln,block-attnres", "--steps", "6", "--batch", "4",
                                 "--seq", "32"])
    assert result.exit_code == 0, result.output
    assert "Equal-budget comparison" in result.output and "block-attnres" in result.output


def test_bundled_corpus_is_the_42_shakespeare_works_as_bytes():
    assert len(shakespeare_files()) == 42
    text = shakespeare_text()
    assert "To be, or not to be" in text and len(text) > 5_000_000
    tokens = byte_tokens(text[:1000])
    assert bytes(tokens.to(torch.uint8).tolist()).decode() == text[:1000]
    train, val = train_val_split(byte_tokens(text))
    assert len(val) == int(0.1 * (len(train) + len(val)))
