"""The bit planner: each importance equals an independent computation (plain forward hooks, a model rebuilt
without the layer, numpy over the weight matrices), and the allocation meets its target from below by less than
one layer's share."""

import copy
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import hf_model, layer_calls, mean_loss, tiny_model

from layerwise.diagnose import depth_view, diagnose
from layerwise.diagnose.quantization import (ORDERS, BitPlan, allocate_bits, check_bit_request, layer_importance,
                                             plan_bits, z_score_distribution)
from layerwise.errors import UserError
from layerwise.transform import drop_layers
from layerwise.transform.prune import parse_layer_list

MODELS = {"layerwise": lambda: tiny_model(n_layers=6, dtype=torch.float64),
          "llama": lambda: hf_model("llama").double(), "gpt2": lambda: hf_model("gpt2").double()}


def calibration(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (2, 12), generator=generator) for _ in range(2)]



def hand_lim(model, batches):
    """-cos(layer input, layer output) per token, mean over every calibration token, per position, in float64."""
    sums, n_tok = 0, 0
    for ids in batches:
        calls = [(a.double(), b.double()) for a, b in layer_calls(model, ids)]
        sums = sums + torch.stack([-((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum() for a, b in calls])
        n_tok += ids.numel()
    return (sums / n_tok).tolist()


def hand_zd(layer: torch.nn.Module) -> float:
    """Mean over the layer's weight matrices (every 2-D weight under it: its linears) of the fraction of
    entries with |z| > 1, z standardised over that matrix with numpy's (population) std."""
    fractions = []
    for module in layer.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() == 2:
            w = w.detach().double().numpy()
            fractions.append(float((np.abs((w - w.mean()) / w.std()) > 1).mean()))
    return sum(fractions) / len(fractions)



@pytest.mark.parametrize("family", list(MODELS))
def test_lim_is_minus_the_mean_per_token_cosine_of_each_layers_input_and_output(family):
    model = MODELS[family]()
    batches = calibration(model.config.vocab_size)
    lim = layer_importance(model, depth_view(model), batches, "lim")
    np.testing.assert_allclose(lim, hand_lim(model, batches), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", list(MODELS))
def test_lim_ranks_layers_as_shortgpt_block_influence_does(family):
    model = MODELS[family]()
    batches = calibration(model.config.vocab_size)
    lim = torch.tensor(layer_importance(model, depth_view(model), batches, "lim"), dtype=torch.float64)
    influence = diagnose(model, batches, n_span=1, removal=False, attention_entropy=False)["block_influence"]
    assert lim.argsort().tolist() == influence.argsort().tolist()
    torch.testing.assert_close(lim, influence - 1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", list(MODELS))
def test_zd_is_the_mean_over_the_layers_linears_of_the_fraction_beyond_one_std_and_zd_inverse_its_negation(family):
    model = MODELS[family]()
    view = depth_view(model)
    expected = [hand_zd(layer) for layer in view.layers]
    np.testing.assert_allclose(layer_importance(model, view, [], "zd"), [-v for v in expected], rtol=1e-12)
    np.testing.assert_allclose(layer_importance(model, view, [], "zd-inverse"), expected, rtol=1e-12)


def test_removal_importance_is_the_loss_of_the_model_rebuilt_without_the_layer_minus_the_full_loss():
    model = MODELS["layerwise"]()
    batches = calibration(model.config.vocab_size)
    full = mean_loss(model, batches)
    expected = [mean_loss(drop_layers(copy.deepcopy(model), [i]), batches) - full for i in range(6)]
    np.testing.assert_allclose(layer_importance(model, depth_view(model), batches, "removal"), expected,
                               rtol=1e-8, atol=1e-12)


def test_a_stored_layer_run_at_several_positions_takes_its_largest_importance():
    model = tiny_model(n_layers=4, layer_order=[0, 1, 2, 1], dtype=torch.float64)
    batches = calibration(model.config.vocab_size)
    per_position = hand_lim(model, batches)
    lim = layer_importance(model, depth_view(model), batches, "lim")
    np.testing.assert_allclose(lim, [per_position[0], max(per_position[1], per_position[3]), per_position[2]],
                               rtol=1e-10)


@pytest.mark.parametrize("distribution, expected", [
    ("gaussian", math.erfc(1 / math.sqrt(2))),  # 0.3173
    ("laplace", math.exp(-math.sqrt(2))),  # 0.2431: scale b = std / sqrt(2), P(|x| > std) = exp(-std / b)
])
def test_zd_of_a_gaussian_and_of_a_heavier_tailed_laplace_matrix(distribution, expected):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1000, generator=generator, dtype=torch.float64)
    if distribution == "laplace":
        u = torch.rand(1000, 1000, generator=generator, dtype=torch.float64) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    assert z_score_distribution(3 * w + 0.5) == pytest.approx(expected, abs=2e-3)


# ---- allocation ----------------------------------------------------------------------------------------------

def test_allocation_meets_the_target_from_below_by_less_than_one_layers_share_with_the_fewest_low_layers():
    rng = random.Random(0)
    for _ in range(2000):
        L = rng.randint(1, 40)
        importance = [rng.choice([rng.random(), 0.5]) for _ in range(L)]  # some ties
        params = [rng.randint(1, 10_000) for _ in range(L)]
        widths = rng.sample([2, 3, 4, 8], rng.randint(1, 4))
        target = rng.choice([rng.uniform(min(widths), max(widths)), float(rng.choice(widths))])
        bits = allocate_bits(importance, params, target, widths)
        avg = Fraction(sum(b * p for b, p in zip(bits, params)), sum(params))
        assert avg <= Fraction(target)
        if target in widths:
            assert set(bits) == {int(target)}
            continue
        lo, hi = max(w for w in widths if w < target), min(w for w in widths if w > target)
        assert set(bits) <= {lo, hi}
        ranked = sorted(range(L), key=lambda i: (importance[i], i))
        low = [i for i in ranked if bits[i] == lo]
        assert low == ranked[:len(low)], "the least important layers (ties: lower index) take the low width"
        share = Fraction(params[low[-1]] * (hi - lo), sum(params))
        assert Fraction(target) - avg < share, "one low layer fewer would already exceed the target"


@pytest.mark.parametrize("L, target, lo, hi", [(30, 3.5, 3, 4), (30, 3.45, 3, 4), (30, 3.55, 3, 4), (24, 2.5, 2, 3),
                                               (30, 6.0, 4, 8), (30, 5.0, 4, 8), (7, 3.1, 3, 4), (7, 3.9, 3, 4)])
def test_with_equal_layers_k_is_the_ceiling_of_the_two_width_rule(L, target, lo, hi):
    bits = allocate_bits(list(range(L)), [100] * L, target, (2, 3, 4, 8))
    k = math.ceil(L * (hi - target) / (hi - lo))
    assert bits == [lo] * k + [hi] * (L - k)
    # The reshape notes write k = round(L (hi - b) / (hi - lo)); rounding down (a fraction below one half, e.g.
    # L=30, b=3.45: 16.5 -> 16 by Python's round, 3.467 bits) would exceed the target, so we round up always.
    rounded = round(L * (hi - target) / (hi - lo))
    if rounded != k:
        assert (rounded * lo + (L - rounded) * hi) / L > target


def test_random_order_is_the_same_for_a_seed_and_differs_across_seeds():
    model = tiny_model(n_layers=12)
    view = depth_view(model)
    orders = {seed: layer_importance(model, view, [], "random", seed) for seed in range(3)}
    assert orders[0] == layer_importance(model, view, [], "random", 0)
    assert sorted(orders[0]) == list(range(12))
    assert len({tuple(v) for v in orders.values()}) == 3


def parse_step(text: str, n_layers: int) -> list[int]:
    spec = text.removeprefix("quantize=")
    default, *rest = spec.split("/")
    bits = [int(default)] * n_layers
    for part in rest:
        width, layers = part.split(":")
        for i in parse_layer_list(layers):
            bits[i] = int(width)
    return bits


def test_step_text_names_every_layers_width_with_the_most_common_width_as_default():
    rng = random.Random(1)
    for _ in range(200):
        L = rng.randint(1, 30)
        bits = [rng.choice([2, 3, 4, 8]) for _ in range(L)]
        plan = BitPlan("lim", 4.0, [2, 3, 4, 8], [0.0] * L, [1] * L, bits)
        assert parse_step(plan.step(), L) == bits
        counts = {w: bits.count(w) for w in bits}
        assert int(plan.step().removeprefix("quantize=").split("/")[0]) == max(counts, key=lambda w: (counts[w], w))
    assert BitPlan("lim", 3.5, [3, 4], [0.0] * 9, [1] * 9, [3, 3, 3, 3, 4, 4, 4, 3, 4]).step() == "quantize=3/4:4-6,8"
    assert BitPlan("lim", 3.5, [3, 4], [0.0] * 9, [1] * 9, [3, 3, 3, 3, 4, 4, 4, 3, 4] + [4]).step() \
        == "quantize=4/3:0-3,7"


@pytest.mark.parametrize("family", ["layerwise", "llama"])
@pytest.mark.parametrize("order", ORDERS)
def test_plan_bits_reaches_the_target_and_its_json_matches_its_step(family, order):
    model = MODELS[family]()
    batches = calibration(model.config.vocab_size)
    plan = plan_bits(model, depth_view(model), batches, avg_bits=3.5, widths=(2, 3, 4, 8), order=order, seed=2)
    L = len(depth_view(model).layers)
    assert plan.avg_bits == 3.5 and plan.bits.count(3) == L // 2  # the layers have equal parameter counts
    assert parse_step(plan.step(), L) == plan.bits
    data = plan.to_json()
    assert data["order"] == order and data["avg_bits"] == 3.5 and data["step"] == plan.step()
    assert [row["bits"] for row in data["layers"]] == plan.bits
    assert [row["importance"] for row in data["layers"]] == plan.importance
    low = {i for i, b in enumerate(plan.bits) if b == 3}
    assert max(plan.importance[i] for i in low) <= min(plan.importance[i] for i in range(L) if i not in low)


@pytest.mark.parametrize("avg_bits, widths, order, flag", [
    (1.5, (2, 3, 4, 8), "lim", "--avg-bits"), (9, (2, 3, 4, 8), "lim", "--avg-bits"),
    (3.5, (4, 8), "lim", "--avg-bits"), (float("nan"), (2, 4), "lim", "--avg-bits"),
    (3.5, (2, 5), "lim", "--widths"), (8, (4, 16), "lim", "--widths"), (3, (), "lim", "--widths"),
    (3, (3, 3, 4), "lim", "--widths"), (3.5, (2, 3, 4, 8), "fisher", "--order"),
])
def test_bad_requests_are_refused_naming_the_option(avg_bits, widths, order, flag):
    with pytest.raises(UserError, match=flag):
        check_bit_request(avg_bits, widths, order)
    if order in ORDERS:
        with pytest.raises(UserError, match=flag):
            allocate_bits([0.0, 1.0], [1, 1], avg_bits, widths)
