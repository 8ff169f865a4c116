"""Checkpoints and init written by earlier code stay valid: the fixtures under tests/fixtures/ were saved by the
code before variants carried their own rules (see tests/fixtures/make_fixtures.py)."""

from __future__ import annotations

import hashlib
import json
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
def test_an_old_checkpoint_loads_with_auto_and_gives_its_saved_logits(name):
    folder = FIXTURES / "checkpoints" / name
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)


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
