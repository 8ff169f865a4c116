"""The `layerwise` command line and the bundled corpus, run as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.config import ModelConfig, field_names
from layerwise.data.corpus import byte_tokens, shakespeare_files, shakespeare_text, train_val_split
from layerwise.model import LayerwiseForCausalLM
from layerwise.presets import PRESETS
from layerwise.train.config import TrainConfig

runner = CliRunner()
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Its own build, not the session's: 300 tokens is not a multiple of 64, so the model's padded vocabulary
    (320) shows that the CLI pads it."""
    from layerwise.data.build import build_corpus

    return build_corpus(["shakespeare"], tmp_path_factory.mktemp("data") / "c", vocab_size=300)


def dry_run(*args: str) -> dict:
    result = runner.invoke(app, ["train", *args, "--dry-run"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


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


def test_train_command_trains_from_a_yaml_config_with_overrides(tmp_path, corpus):
    config = tmp_path / "train.yaml"
    config.write_text(f"model:\n  preset: peri-ln\n  size: tiny\ndata: {corpus}\nmax_tokens: 4k\nbatch_size: 4\n"
                      f"seq_len: 32\ntensorboard: false\nout: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--lr", "2e-3", "--set", "model.n_layers=2"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "train.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["model"] == {"preset": "peri-ln", "size": "tiny", "n_layers": 2}
    model_cfg = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert model_cfg["n_layers"] == 2 and model_cfg["norm_placement"] == "peri"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_file_in_configs_resolves_through_the_cli(path, corpus):
    resolved = dry_run("--config", str(path), "--data", str(corpus))
    given = yaml.safe_load(path.read_text())
    assert resolved["train"] == TrainConfig.from_yaml(path, data=str(corpus)).to_dict()
    model = {k: v for k, v in given["model"].items() if k != "size"}
    assert {k: resolved["model_config"][k] for k in model} == model


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ has no YAML files: the walk above would test nothing"


def test_dry_run_puts_preset_size_and_model_sets_into_the_model_mapping(corpus):
    resolved = dry_run("--preset", "lns", "--size", "tiny", "--set", "model.n_layers=2", "--data", str(corpus))
    assert resolved["train"]["model"] == {"preset": "lns", "size": "tiny", "n_layers": 2}
    fields = resolved["model_config"]
    assert fields["layernorm_scaling"] is True and fields["n_layers"] == 2 and fields["d_model"] == 128
    assert fields["vocab_size"] == 320  # the corpus's 300 tokens padded to a multiple of 64
    model = LayerwiseForCausalLM(ModelConfig(**fields))
    assert resolved["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(fields) == set(field_names())


def test_options_override_the_yaml_model_mapping(tmp_path, corpus):
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  preset: dyt\n  n_layers: 3\n")
    resolved = dry_run("--config", str(config), "--preset", "pre-ln", "--data", str(corpus))
    assert resolved["train"]["model"] == {"preset": "pre-ln", "size": "tiny", "n_layers": 3}
    assert resolved["model_config"]["norm"] == "layernorm" and resolved["model_config"]["n_layers"] == 3


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    proc = _python("import sys, layerwise.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("imports", ["import layerwise, transformers", "import transformers, layerwise"])
def test_import_layerwise_registers_with_the_auto_classes_in_either_order(tmp_path, imports):
    LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", n_layers=1)).save_pretrained(tmp_path)
    proc = _python(f"{imports}\n"
                   f"print(type(transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "LayerwiseForCausalLM"


def test_user_errors_are_one_line_and_debug_shows_the_traceback():
    command = ["-m", "layerwise.cli", "train", "--preset", "nope", "--dry-run"]
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()]
    assert proc.stdout.startswith("error: TrainConfig.model.preset='nope'")
    for how in (dict(args=["--debug"], env={}), dict(args=[], env={"LAYERWISE_DEBUG": "1"})):
        proc = subprocess.run([sys.executable, *command[:2], *how["args"], *command[2:]], capture_output=True,
                              text=True, env={**os.environ, **how["env"]})
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_diagnose_runs_in_the_dtype_and_device_asked_for(tmp_path):
    import numpy as np

    from layerwise.data.shards import write_shard

    torch.manual_seed(0)
    LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", n_layers=2)).save_pretrained(tmp_path / "m")
    shard = write_shard(tmp_path / "t.bin", np.random.default_rng(0).integers(0, 256, 512), 256)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = runner.invoke(app, ["diagnose", str(tmp_path / "m"), "--data", str(shard), "--tokens", "256",
                                     "--seq-len", "64", "--n-span", "2", "--no-removal", "--no-attention-entropy",
                                     "--device", "cpu", "--dtype", dtype, "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        report = json.loads((out / "diagnosis.json").read_text())
        assert report["dtype"] == dtype and report["device"] == "cpu"
        losses[dtype] = report["metrics"]["loss"][0]
    assert losses["bfloat16"] != losses["float32"]  # the weights really were bf16
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05


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
