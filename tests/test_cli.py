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
    assert result.exit_code == 0
    assert all(command in result.output for command in ("presets", "train", "compare", "data"))


def test_bad_input_exits_nonzero_with_one_line_reason():
    proc = subprocess.run([sys.executable, "-m", "layerwise.cli", "compare", "--presets", "pre-ln,nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown preset 'nope'" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_train_command_trains_from_a_yaml_config_with_overrides(tmp_path):
    from layerwise.data.build import build_corpus

    corpus = build_corpus(["shakespeare"], tmp_path / "data", vocab_size=300)
    config = tmp_path / "train.yaml"
    config.write_text(f"preset: peri-ln\nsize: tiny\ndata: {corpus}\nmax_tokens: 4k\nbatch_size: 4\nseq_len: 32\n"
                      f"tensorboard: false\nout: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--lr", "2e-3", "--set", "model.n_layers=2"])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "run" / "train.yaml").read_text()
    assert "lr: 0.002" in saved and "n_layers: 2" in saved
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["n_layers"] == 2


def test_data_build_command_writes_shards_and_manifest(tmp_path):
    result = runner.invoke(app, ["data", "build", "--out", str(tmp_path / "c"), "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    assert {"train.bin", "val.bin", "tokenizer.json", "manifest.json"} <= {p.name for p in (tmp_path / "c").iterdir()}


def test_bundled_corpus_is_the_42_shakespeare_works_as_bytes():
    assert len(shakespeare_files()) == 42
    text = shakespeare_text()
    assert "To be, or not to be" in text and len(text) > 5_000_000
    tokens = byte_tokens(text[:1000])
    assert bytes(tokens.to(torch.uint8).tolist()).decode() == text[:1000]
    train, val = train_val_split(byte_tokens(text))
    assert len(val) == int(0.1 * (len(train) + len(val)))


def test_the_bundled_corpus_is_package_data_of_layerwise_itself():
    # `pip install layerwise` alone must run the default job: the texts ship in the wheel, not in another package.
    import tomllib
    from pathlib import Path

    import layerwise.data

    package = Path(layerwise.data.__file__).parent
    assert all(path.parent == package / "shakespeare" for path in shakespeare_files())
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["layerwise.data"]
    shipped = {p for pattern in globs for p in package.glob(pattern)}
    assert set(shakespeare_files()) <= shipped and package / "shakespeare" / "NOTICE" in shipped
    assert not any("shakespeare" in dep for dep in pyproject["project"]["dependencies"])
