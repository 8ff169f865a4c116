"""Unified Normalization and PowerNorm: their formulas, backwards, phases and buffers, in float64."""

import warnings

import pytest
import torch
import transformers
from conftest import assert_compiled_training_matches_eager

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.errors import UserError
from layerwise.nn.running_norms import PowerNorm, UnifiedNorm

D, EPS = 6, 1e-5


def batches(n, shape=(3, 5, D), seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Channels of different scales, so per-channel statistics differ from a per-token or global one.
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, D, dtype=torch.float64)
            for _ in range(n)]


def fresh(cls, warmup=2):
    norm = cls(D, eps=EPS, warmup=warmup).double().train()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, D, dtype=torch.float64))
        norm.bias.copy_(torch.linspace(-1, 1, D, dtype=torch.float64))
    return norm


def psi2(x):
    return (x * x).reshape(-1, D).mean(0)


def un_by_hand(xs, dys, warmup_over, compensated):
    """The UN rule written out: window of W = 4 psi^2 (geometric mean once full, after warm-up), running EMA 0.9
    of the psi^2 used, r from it, and the backward's window and EMA of mean(g z)."""
    gamma, beta = torch.linspace(0.5, 2, D, dtype=torch.float64), torch.linspace(-1, 1, D, dtype=torch.float64)
    running, ema, window, gz_window = torch.ones(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), [], []
    out = []
    for x, dy in zip(xs, dys):
        window = (window + [psi2(x)])[-4:]
        var = torch.stack(window).prod(0) ** 0.25 if warmup_over and len(window) == 4 else psi2(x)
        r = ((var + EPS) / (running + EPS)).sqrt().clamp(0.2, 5) if compensated else torch.ones(D)
        running = 0.9 * running + 0.1 * var
        z = x / (var + EPS).sqrt()
        y = gamma * z + beta
        g = dy * gamma * r
        gz = (g * z).reshape(-1, D).mean(0)
        gz_window = (gz_window + [gz])[-4:]
        m = torch.stack(gz_window).mean(0) if warmup_over and len(gz_window) == 4 else gz
        ema = 0.9 * ema + 0.1 * m
        dx = (g - ema * z) / (var + EPS).sqrt()
        dgamma = (dy * z).reshape(-1, D).sum(0)
        out.append((y, dx, dgamma, running.clone()))
    return out


def run_norm(norm, xs, dys):
    out = []
    for x, dy in zip(xs, dys):
        x = x.clone().requires_grad_()
        norm.zero_grad()
        y = norm(x)
        y.backward(dy)
        out.append((y.detach(), x.grad, norm.weight.grad.clone(), norm.running_var.clone()))
    return out


@pytest.mark.parametrize("step, warmup_over, compensated", [(0, False, False), (5, True, False),
                                                            (1000, True, True)])
def test_un_forward_backward_and_running_statistic_follow_the_rule_written_out(step, warmup_over, compensated):
    norm = fresh(UnifiedNorm, warmup=2)
    norm.set_training_step(step, 100)
    assert (bool(norm.in_warmup), bool(norm.compensated)) == (not warmup_over, compensated)
    xs, dys = batches(7), batches(7, seed=1)
    for (y, dx, dgamma, running), (y_ref, dx_ref, dgamma_ref, running_ref) in zip(run_norm(norm, xs, dys),
                                                                              un_by_hand(xs, dys, warmup_over,
                                                                                         compensated)):
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dgamma, dgamma_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(running, running_ref, rtol=1e-12, atol=1e-12)


def test_un_compensation_r_is_not_one_in_the_compensated_test():
    """Guards the test above: with r = 1 the compensated case would not test the clamp."""
    xs = batches(2)
    running = 0.9 + 0.1 * psi2(xs[0])
    r = ((psi2(xs[1]) + EPS) / (running + EPS)).sqrt()
    assert (r - 1).abs().max() > 0.1 and (r.clamp(0.2, 5) == r).all()


def powernorm_by_hand(xs, dys, warmup_over):
    """PowerNorm written out: GroupScaling, batch psi^2 (warm-up) or running (after), running EMA 0.9 of the batch
    psi^2; backward (g - 0.1 ema_gz z) / sqrt(psi^2_batch + eps), ema_gz += mean((that numerator) z)."""
    gamma, beta = torch.linspace(0.5, 2, D, dtype=torch.float64), torch.linspace(-1, 1, D, dtype=torch.float64)
    running, ema = torch.ones(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    out = []
    for x, dy in zip(xs, dys):
        x = x.clone().requires_grad_()
        s = x / ((x * x).mean(-1, keepdim=True) + EPS).sqrt()  # GroupScaling keeps its exact autograd
        batch = psi2(s.detach())
        var = running if warmup_over else batch
        z = s.detach() / (var + EPS).sqrt()
        y = gamma * z + beta
        g = dy * gamma
        numerator = g - 0.1 * ema * z
        grad_s = numerator / (batch + EPS).sqrt()
        ema = ema + (numerator * z).reshape(-1, D).mean(0)
        s.backward(grad_s)
        running = 0.9 * running + 0.1 * batch
        out.append((y.detach(), x.grad, (dy * z).reshape(-1, D).sum(0), running.clone()))
    return out


@pytest.mark.parametrize("step, warmup_over", [(0, False), (2, True)])
def test_powernorm_forward_backward_and_running_statistic_follow_the_rule_written_out(step, warmup_over):
    norm = fresh(PowerNorm, warmup=2)
    norm.set_training_step(step, 100)
    xs, dys = batches(5), batches(5, seed=1)
    for got, want in zip(run_norm(norm, xs, dys), powernorm_by_hand(xs, dys, warmup_over)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_un_eval_is_a_per_channel_affine_map_of_the_running_statistic():
    norm = fresh(UnifiedNorm)
    for x in batches(3):
        norm(x.requires_grad_()).sum().backward()  # moves the running statistic off its init (in the backward)
    assert not torch.equal(norm.running_var, torch.ones(D, dtype=torch.float64))
    norm.eval()
    x, y = batches(2, seed=3)
    a, b = 0.7, -1.9
    with torch.no_grad():
        torch.testing.assert_close(norm(a * x + b * y), a * norm(x) + b * norm(y) + (1 - a - b) * norm(0 * x),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm(x), norm.weight * x / (norm.running_var + EPS).sqrt() + norm.bias,
                                   rtol=1e-14, atol=1e-14)


def test_powernorm_eval_is_group_scaling_then_a_per_channel_affine_map():
    norm = fresh(PowerNorm)
    for x in batches(3):
        norm(x.requires_grad_()).sum().backward()
    norm.eval()
    x, y = batches(2, seed=3)
    a, b = 0.7, -1.9
    with torch.no_grad():
        scaled = lambda t: t / ((t * t).mean(-1, keepdim=True) + EPS).sqrt()  # noqa: E731
        expected = norm.weight * scaled(x) / (norm.running_var + EPS).sqrt() + norm.bias
        torch.testing.assert_close(norm(x), expected, rtol=1e-14, atol=1e-14)
        # After GroupScaling the map is affine: on rows GroupScaling fixes (unit RMS up to eps) it is linear.
        ux, uy = scaled(x), scaled(y)
        after = lambda s: norm.weight * s / (norm.running_var + EPS).sqrt() + norm.bias  # noqa: E731
        torch.testing.assert_close(after(a * ux + b * uy), a * after(ux) + b * after(uy) + (1 - a - b) * after(0 * ux),
                                   rtol=1e-12, atol=1e-12)
        assert not torch.allclose(norm(2 * x), 2 * norm(x) - norm(0 * x)), "GroupScaling makes eval not affine in x"


@pytest.mark.parametrize("cls", [UnifiedNorm, PowerNorm])
def test_training_statistics_mix_positions_and_eval_does_not(cls):
    norm = fresh(cls)
    x = batches(1)[0]
    changed = x.clone()
    changed[:, -1] += 1.0  # only the last position
    assert not torch.allclose(norm(x)[:, 0], norm(changed)[:, 0]), "training mixes future tokens in"
    norm.eval()
    torch.testing.assert_close(norm(x)[:, :-1], norm(changed)[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [UnifiedNorm, PowerNorm])
def test_the_phase_follows_the_step_not_forward_calls_and_gradient_free_forwards_change_nothing(cls):
    norm = fresh(cls, warmup=3)
    for x in batches(5):
        norm(x).sum().backward()
    assert bool(norm.in_warmup), "forward calls must not end the warm-up"
    norm.set_training_step(2, 100)
    assert bool(norm.in_warmup)
    norm.set_training_step(3, 100)
    assert not bool(norm.in_warmup)
    frac = fresh(cls, warmup=0.25)
    frac.set_training_step(24, 100)
    assert bool(frac.in_warmup)
    frac.set_training_step(25, 100)
    assert not bool(frac.in_warmup)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with torch.no_grad():
        norm(batches(1, seed=5)[0])  # telemetry-like: training mode, no gradients
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())


def test_un_compensation_waits_for_1000_steps_or_the_warm_up_whichever_is_longer():
    norm = fresh(UnifiedNorm, warmup=2000)
    norm.set_training_step(1999, 10_000)
    assert not bool(norm.compensated)
    norm.set_training_step(2000, 10_000)
    assert bool(norm.compensated)
    short = fresh(UnifiedNorm, warmup=10)
    short.set_training_step(999, 10_000)
    assert not bool(short.compensated) and not bool(short.in_warmup)


@pytest.mark.parametrize("field", ["un_warmup_steps", "powernorm_warmup_steps"])
@pytest.mark.parametrize("value", [-1, 2.5, True, float("inf")])
def test_a_warmup_that_is_neither_a_fraction_nor_a_count_is_refused_naming_the_field(field, value):
    preset = field.split("_")[0]
    for selected in (preset, "pre-rmsnorm"):  # out of its domain even where no selected norm reads it
        with pytest.raises(UserError, match=f"ModelConfig.{field}=.* whole number of steps"):
            ModelConfig.from_preset(selected, **{field: value})


def test_a_warmup_field_without_its_norm_warns():
    with pytest.warns(UserWarning, match="un_warmup_steps=10 is read by norm un"):
        ModelConfig.from_preset("pre-rmsnorm", un_warmup_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_preset("un", un_warmup_steps=0.1)


@pytest.mark.parametrize("preset", ["un", "powernorm"])
def test_trained_running_statistics_survive_hf_save_and_load(preset, tmp_path):
    torch.manual_seed(0)
    model = LayerwiseForCausalLM(ModelConfig.from_preset(preset, un_warmup_steps=1) if preset == "un"
                                 else ModelConfig.from_preset(preset, powernorm_warmup_steps=1)).train()
    from layerwise.nn.schedule import set_training_step

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(6):
        set_training_step(model, step, 6)
        ids = torch.randint(0, 256, (2, 16))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for name, tensor in saved.items():  # every parameter and buffer: statistics, windows, EMAs, phase flags
        assert torch.equal(reloaded[name], tensor), name
    assert not torch.equal(model.model.layers[0].attn.norm_in.running_var, torch.ones(128)), "nothing was trained"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("preset", ["un", "powernorm"])
def test_compiled_fullgraph_after_warm_up_matches_eager_in_outputs_gradients_and_buffers(preset, backend):
    """aot_eager and inductor run AOTAutograd, whose partitioner may recompute saved values in the backward from
    the buffers; the running psi^2 sits near the batch's (UN's r unclamped, varying per channel) so a backward
    that read an updated buffer would differ."""
    from layerwise.nn.running_norms import geometric_mean
    from layerwise.nn.schedule import set_training_step

    torch.manual_seed(0)
    eager = LayerwiseForCausalLM(ModelConfig.from_preset(preset, n_layers=2)).train()
    batches_of_ids = [torch.randint(0, 256, (2, 16)) for _ in range(8)]
    for step, ids in enumerate(batches_of_ids[:5]):  # fill UN's windows and the EMAs with the warm-up's statistics
        set_training_step(eager, step, 20_000)
        eager(ids, labels=ids).loss.backward()
    set_training_step(eager, 12_000, 20_000)  # past both warm-ups and UN's 1000 uncompensated steps
    norms = [m for m in eager.modules() if isinstance(m, (UnifiedNorm, PowerNorm))]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in norms:
            recent = geometric_mean(norm.window) if preset == "un" else norm.running_var
            norm.running_var.copy_(recent * (0.7 + 0.7 * torch.rand(recent.shape, generator=gen)))
    if preset == "un":
        r = torch.stack([(geometric_mean(n.window) / n.running_var).sqrt() for n in norms])
        assert bool(norms[0].compensated) and (r > 0.5).all() and (r < 2).all() and r.std() > 0.05
    assert_compiled_training_matches_eager(eager, batches_of_ids[5:], backend)


def test_an_interrupted_un_run_resumed_equals_the_uninterrupted_one(corpus, tmp_path, monkeypatch):
    """Warm-up 4 steps of 12, gradient compensation from step 5 (instead of 1000) and checkpoints every 7: the
    resumed run starts after the warm-up, compensated, with the window, running statistics and g z EMAs of step 7,
    under gradient accumulation (2 micro-batches per step)."""
    import json
    import shutil

    from layerwise.nn import running_norms

    monkeypatch.setattr(running_norms, "UN_UNCOMPENSATED_STEPS", 5)
    probe = UnifiedNorm(D, warmup=4)
    probe.set_training_step(5, 12)
    assert bool(probe.compensated), "the trainer's steps 5..11 run compensated"

    from layerwise.train.checkpoint import list_checkpoints
    from layerwise.train.config import TrainConfig
    from layerwise.train.trainer import train

    def cfg(out, **extra):
        return TrainConfig(model=dict(preset="un", size="tiny", un_warmup_steps=4), data=str(corpus), out=str(out),
                           max_tokens=12 * 4 * 32, batch_size=4, micro_batch_size=2, seq_len=32, lr=3e-3, warmup=2,
                           eval_every=1000, eval_batches=2, telemetry_every=5, ckpt_every=7, log_every=1,
                           tensorboard=False, **extra)

    def losses(run):
        return {r["step"]: r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "train_loss" in r}

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(cfg(reference))
    train(cfg(resumed))
    shutil.rmtree(list_checkpoints(resumed)[-1])
    train(cfg(resumed, resume="auto"))
    assert losses(resumed) == losses(reference) and len(losses(reference)) == 12
