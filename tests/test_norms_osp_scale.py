"""Single-Scale RMSNorm (Park et al., ACL 2025, Outlier-Safe Pre-Training) and the scale-vector add-ons of
Wang et al. (arXiv 2605.26895), checked in float64 against the papers' formulas."""

import pytest
import torch

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.initialization import Constant, init_of
from layerwise.nn.norms import RMSNorm, SingleScaleRMSNorm

TIGHT = dict(atol=1e-12, rtol=1e-12)
D = 16


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64) * 3 + 0.5


def test_ssrmsnorm_is_one_scalar_times_the_rms_normalised_input():
    torch.manual_seed(0)
    norm = SingleScaleRMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.fill_(-1.7)
    x = x64(3, 5, D)
    expected = -1.7 * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, **TIGHT)
    assert norm.weight.shape == (1,)


def test_ssrmsnorm_model_has_one_scalar_gain_per_norm_initialised_to_one():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("ssrmsnorm", "tiny"))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    # Every pre-sublayer norm of the 4 layers plus the final norm is single-scale: no per-channel gain left.
    assert len(norms) == 2 * 4 + 1
    for norm in norms:
        assert isinstance(norm, SingleScaleRMSNorm)
        assert norm.weight.shape == (1,) and norm.weight.item() == 1.0
        assert init_of(norm) == Constant(1.0)


def test_ssrmsnorm_model_equals_the_rmsnorm_model_whose_gains_are_its_scalars_broadcast():
    torch.manual_seed(0)
    single, plain = (LayerwiseForCausalLM(ModelConfig.from_preset(name, "tiny")).double().eval()
                     for name in ("ssrmsnorm", "pre-rmsnorm"))
    with torch.no_grad():
        for norm in single.modules():
            if isinstance(norm, SingleScaleRMSNorm):
                norm.weight.uniform_(0.5, 2.0)
    plain.load_state_dict({k: v.expand_as(plain.state_dict()[k]) for k, v in single.state_dict().items()})
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(single(ids).logits, plain(ids).logits, **TIGHT)
