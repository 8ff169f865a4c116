"""Every preset at tiny size: finite forward/backward, causality, learning, and graph-break-free tracing."""

import re

import pytest
import torch
from conftest import tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.presets import PRESETS, SIZES, preset_fields

ALL_PRESETS = list(PRESETS)
# "Method (Surname et al., ...": a method name, then a parenthesis that opens with its authors.
CITATION = re.compile(r"^[^(]*\w[^(]*\((?:[A-Z][\w-]+)(?: et al\.| Team|, [A-Z])")


def _tiny(name, **overrides):
    return tiny_model(name, **overrides).train()  # training mode, as the steps below train


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_forward_backward_is_finite_and_reaches_every_parameter(name):
    model = _tiny(name)
    ids = torch.randint(0, 256, (2, 32))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 32, 256)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient (an unused parameter breaks DDP)"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_changing_token_t_never_changes_earlier_logits(name):
    model = _tiny(name).eval()
    ids = torch.randint(0, 256, (2, 24))
    t = 13
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t:], b[:, t:]), "the changed token must matter from position t on"


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_a_few_adamw_steps_on_a_fixed_batch_lower_the_loss(name):
    model = _tiny(name)
    ids = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_torch_compile_traces_the_whole_model_without_graph_breaks(name):
    model = _tiny(name)
    ids = torch.randint(0, 256, (2, 16))
    model(ids)  # BHyT computes its constant c on the first (eager) forward
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(ids, labels=ids)
    torch.testing.assert_close(out.logits, model(ids).logits)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_every_preset_is_valid_at_every_size(name):
    for size in SIZES:
        cfg = ModelConfig(**preset_fields(name, size))
        assert cfg.preset == name


@pytest.mark.parametrize("size", list(SIZES))
def test_value_residual_presets_differ_from_the_baseline_only_in_the_value_residual(size):
    """ResFormer, SATFormer and the baseline are compared against each other: one change each, QK-norm alike."""
    base = preset_fields("pre-rmsnorm", size)
    for name in ("resformer", "satformer"):
        fields = preset_fields(name, size)
        assert {k for k in fields if fields[k] != base.get(k)} == {"preset", "value_residual"}, name


def test_every_preset_names_its_method_and_the_papers_authors_in_one_line():
    for preset in PRESETS.values():
        assert "\n" not in preset.paper and CITATION.match(preset.paper), (preset.name, preset.paper)
    assert not CITATION.match("Pre-LN (tiny)") and not CITATION.match("(Xiong et al., ICML 2020)")


def test_pre_ln_124m_has_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-ln", "124m"))
    n = sum(p.numel() for p in model.parameters())
    assert 123e6 < n < 125e6, n


def test_bf16_autocast_forward_backward_works_on_cpu():
    model = _tiny("block-attnres")
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
