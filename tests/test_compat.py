"""Checkpoints and init written by earlier code stay valid: the fixtures under tests/fixtures/ were written by the
code before variants carried their own rules (see tests/fixtures/make_fixtures.py).

No weight file is kept in git. Each old checkpoint is its `config.json` plus `saved.json`: the name, shape,
dtype and sha256 of every tensor the old code saved, and the logits it computed. The test regenerates the
weights the way the old code made them (seed 1, then 0.1 N(0, 1) added to every parameter), proves they are
the saved bytes, and loads them under the old config.json with AutoModelForCausalLM."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import layerwise.model  # noqa: F401  (registers the layerwise Auto classes)
from layerwise.config import ModelConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINTS = sorted(p.name for p in (FIXTURES / "checkpoints").iterdir())
INIT_REFERENCE = json.loads((FIXTURES / "init_reference.json").read_text())


def test_the_fixtures_are_present():
    assert set(CHECKPOINTS) == {"pre-ln", "dyt", "block-attnres", "satformer"}


@pytest.mark.filterwarnings("error::UserWarning")  # an old config sets no field its variants ignore
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_an_old_checkpoint_loads_with_auto_and_gives_its_saved_logits(name, tmp_path):
    fixture = FIXTURES / "checkpoints" / name
    saved = json.loads((fixture / "saved.json").read_text())
    folder = regenerate_checkpoint(fixture, tmp_path / name)
    weights = load_file(str(folder / "model.safetensors"))
    assert {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": _sha256(v)}
            for k, v in sorted(weights.items())} == saved["tensors"]  # the old file, key for key and byte for byte
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor(saved["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(saved["logits"]), rtol=1e-5, atol=1e-6)


def regenerate_checkpoint(fixture: Path, folder: Path) -> Path:
    """The checkpoint the old code saved: its weights rebuilt as tests/fixtures/make_fixtures.py made them, saved
    with today's code, beside the old code's own config.json and generation_config.json."""
    from layerwise.model import LayerwiseForCausalLM

    torch.manual_seed(1)
    model = LayerwiseForCausalLM(ModelConfig.from_json_file(fixture / "config.json")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(fixture / name, folder / name)
    return folder


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(INIT_REFERENCE))
def test_init_is_bit_identical_to_the_reference(name):
    from layerwise.model import LayerwiseForCausalLM

    reference = INIT_REFERENCE[name]
    torch.manual_seed(0)
    model = LayerwiseForCausalLM(ModelConfig(**reference["fields"]))
    hashes = {n: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
              for n, p in model.named_parameters()}
    changed = sorted(n for n in reference["parameters"] if hashes.get(n) != reference["parameters"][n])
    assert sorted(hashes) == sorted(reference["parameters"]) and changed == []
