"""PRepBN (Guo, Chen, Tang, Wang; ICML 2024, SLAB): its formula, init, step schedule, eval map and fold."""

import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_compiled_training_matches_eager, greedy_without_cache, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.errors import UserError
from layerwise.nn.initialization import init_weights
from layerwise.nn.norms import IdentityNorm, PRepBN, prepbn_lambda
from layerwise.train.checkpoint import list_checkpoints
from layerwise.train.config import TrainConfig
from layerwise.train.trainer import TrainerCallback, train
from layerwise.transform.norms import fold_prepbn
from layerwise.transform.steps import apply

D = 16


def f32(value):
    """`value` as the float32 lambda buffer holds it."""
    return torch.tensor(value, dtype=torch.float32).item()


def _random_norm(lam=0.0, seed=0, bias=True, dim=D):
    """A float64 PRepBN with random LN and BN affines, eta and running statistics, at weight `lam` on its LN."""
    g = torch.Generator().manual_seed(seed)
    norm = PRepBN(dim, eps=1e-5, bias=bias).double()
    with torch.no_grad():
        for tensor in (norm.weight, norm.bn_weight, norm.eta):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g, dtype=torch.float64))
        for tensor in [norm.bn_bias, norm.running_mean] + ([norm.bias] if bias else []):
            tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float64))
        norm.running_var.copy_(0.2 + 3 * torch.rand(dim, generator=g, dtype=torch.float64))
        norm.lam.fill_(lam)
    return norm


def _randomise_prepbns(model, lam=0.0):
    for i, norm in enumerate(m for m in model.modules() if isinstance(m, PRepBN)):
        fresh = _random_norm(lam, seed=i, bias=norm.bias is not None, dim=norm.weight.shape[0])
        norm.load_state_dict({k: v.to(norm.weight.dtype) for k, v in fresh.state_dict().items()})
    return model


def test_training_forward_is_lambda_ln_plus_rest_repbn_with_batch_statistics_like_batchnorm1d():
    norm = _random_norm(lam=0.3).train()
    bn = torch.nn.BatchNorm1d(D, eps=1e-5, momentum=0.1).double().train()
    with torch.no_grad():
        bn.weight.copy_(norm.bn_weight), bn.bias.copy_(norm.bn_bias)
        bn.running_mean.copy_(norm.running_mean), bn.running_var.copy_(norm.running_var)
    for step in range(2):
        x = torch.randn(3, 7, D, dtype=torch.float64) * 2 + 1
        expected_bn = bn(x.reshape(-1, D)).reshape(x.shape) + norm.eta * x
        expected_ln = F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5)
        torch.testing.assert_close(norm(x), 0.3 * expected_ln + 0.7 * expected_bn, rtol=0, atol=1e-12)
        # Running mean and unbiased running variance, momentum 0.1, like torch's BatchNorm.
        torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(norm.running_var, bn.running_var, rtol=0, atol=1e-12)


def test_no_grad_training_forwards_leave_the_running_statistics():
    norm = _random_norm().train()
    before = norm.running_mean.clone(), norm.running_var.clone()
    with torch.no_grad():
        norm(torch.randn(2, 5, D, dtype=torch.float64))
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])


def test_eval_at_lambda_zero_is_the_per_channel_affine_map_and_linear():
    norm = _random_norm(lam=0.0).eval()
    x, y = (torch.randn(2, 5, D, dtype=torch.float64) for _ in range(2))
    a, b = 0.7, -1.9
    zero = torch.zeros_like(x)
    torch.testing.assert_close(norm(a * x + b * y), a * norm(x) + b * norm(y) + (1 - a - b) * norm(zero),
                               rtol=0, atol=1e-10)
    scale, shift = norm.eval_affine()
    inv = (norm.running_var + 1e-5).rsqrt()
    torch.testing.assert_close(scale, norm.bn_weight * inv + norm.eta, rtol=0, atol=1e-14)
    torch.testing.assert_close(shift, norm.bn_bias - norm.bn_weight * norm.running_mean * inv, rtol=0, atol=1e-14)
    torch.testing.assert_close(norm(x), scale * x + shift, rtol=0, atol=1e-12)


def test_eval_mid_decay_mixes_the_layernorm_with_the_running_statistics_repbn():
    norm = _random_norm(lam=0.25).eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    scale, shift = norm.eval_affine()
    ln = F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), 0.25 * ln + 0.75 * (scale * x + shift), rtol=0, atol=1e-12)


def test_preset_puts_prepbn_everywhere_and_init_is_pure_layernorm_with_unit_eta():
    model = tiny_model("prepbn", dtype=torch.float64)
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    assert len(norms) == 2 * 4 + 1 and model.model.norm in norms
    _randomise_prepbns(model, lam=0.4)
    for norm in norms:
        init_weights(norm)
        assert float(norm.lam) == 1.0 and torch.equal(norm.eta, torch.ones(1, dtype=torch.float64))
        assert torch.equal(norm.bn_weight, torch.ones(D * 8, dtype=torch.float64))
        assert not norm.bn_bias.any() and not norm.running_mean.any() and not norm.bias.any()
        assert torch.equal(norm.running_var, torch.ones(D * 8, dtype=torch.float64))
    # At init the model is its LayerNorm twin.
    twin = tiny_model("pre-ln", dtype=torch.float64, mlp="swiglu")
    twin.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.rpartition(".")[2] in ("bn_weight", "bn_bias", "eta", "running_mean",
                                                          "running_var", "lam")})
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=1e-12)


def test_lambda_schedule_reads_fractions_and_steps():
    norm = PRepBN(D, decay_steps=0.5, warmup_steps=0.25)
    seen = []
    for step in range(100):
        norm.set_training_step(step, 100)
        seen.append(float(norm.lam))
    assert seen[:26] == [1.0] * 26 and seen[50] == 0.5 and seen[75:] == [0.0] * 25
    assert seen == [f32(prepbn_lambda(s, 25, 50)) for s in range(100)]
    assert [prepbn_lambda(s, 2, 0) for s in range(4)] == [1.0, 1.0, 0.0, 0.0]
    steps = PRepBN(D, decay_steps=10)
    steps.set_training_step(4, 1000)
    assert float(steps.lam) == f32(0.6)


@pytest.mark.parametrize("overrides, field", [
    (dict(prepbn_decay_steps=-0.1), "prepbn_decay_steps"),
    (dict(prepbn_decay_steps=2.5), "prepbn_decay_steps"),
    (dict(prepbn_warmup_steps=True), "prepbn_warmup_steps"),
    (dict(heterogeneous_gains=True), "heterogeneous_gains"),
])
def test_bad_fields_are_refused_at_construction_naming_the_field(overrides, field):
    with pytest.raises(UserError, match=f"ModelConfig.{field}="):
        ModelConfig.from_preset("prepbn", "tiny", **overrides)


def test_cached_generate_in_eval_mode_equals_full_forwards():
    model = _randomise_prepbns(tiny_model("prepbn"), lam=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # tied: sharpen the flat logits of a random init
    prompt = torch.randint(0, 256, (2, 7))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 10))


def test_training_mode_statistics_let_later_tokens_reach_earlier_outputs():
    """The batch statistics mix positions: what the docstring warns of, and why eval uses running statistics."""
    model = _randomise_prepbns(tiny_model("prepbn", dtype=torch.float64), lam=0.0).train()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 256
    with torch.no_grad():  # no_grad: the running statistics stay, so both forwards see the same model
        assert not torch.allclose(model(ids).logits[:, :-1], model(changed).logits[:, :-1])
        model.eval()
        torch.testing.assert_close(model(ids).logits[:, :-1], model(changed).logits[:, :-1], rtol=0, atol=1e-12)


# ---- the trainer drives the schedule -------------------------------------------------------------------------

STEPS = 10


def _run(corpus, out, **overrides):
    base = dict(model=dict(preset="prepbn", size="tiny", n_layers=2, d_model=32, prepbn_decay_steps=6,
                           prepbn_warmup_steps=2),
                data=str(corpus), out=str(out), max_tokens=STEPS * 2 * 16, batch_size=2, seq_len=16, lr=1e-3,
                warmup=2, eval_every=1000, eval_batches=1, telemetry_every=1000, ckpt_every=5, keep_checkpoints=5,
                log_every=1, tensorboard=False)
    return TrainConfig(**{**base, **overrides})


class LambdaSpy(TrainerCallback):
    """The lambda of every PRepBN as each step starts (after the schedule callback, which runs first)."""

    def __init__(self):
        self.seen = {}

    def on_step_start(self, step, model):
        self.seen[step] = {float(m.lam) for m in model.modules() if isinstance(m, PRepBN)}


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepbn") / "reference"
    spy = LambdaSpy()
    train(_run(corpus, out), callbacks=[spy])
    return out, spy


def test_the_trainer_sets_lambda_per_optimizer_step_also_under_gradient_accumulation(corpus, tmp_path,
                                                                                     reference_run):
    _, spy = reference_run
    accumulated = LambdaSpy()
    train(_run(corpus, tmp_path / "micro", micro_batch_size=1), callbacks=[accumulated])
    expected = {step: {f32(prepbn_lambda(step, 2, 6))} for step in range(STEPS)}
    assert spy.seen == expected and accumulated.seen == expected
    assert expected[4] == {f32(2 / 3)} and expected[8] == {0.0}


def test_a_run_resumed_mid_decay_equals_the_uninterrupted_one(corpus, tmp_path, reference_run):
    from safetensors.torch import load_file
    from test_train import train_losses

    reference, _ = reference_run
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    checkpoints = list_checkpoints(resumed)
    assert checkpoints[0].name == "step_0000005"  # lambda = 2/3 there: mid-decay
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[0])
    assert {float(m.lam) for m in loaded.modules() if isinstance(m, PRepBN)} == {f32(prepbn_lambda(4, 2, 6))}
    train(_run(corpus, resumed, resume="auto"))
    assert train_losses(resumed) == train_losses(reference)
    a, b = (load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (reference, resumed))
    assert a.keys() == b.keys() and any(k.endswith("running_var") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- fold --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(norm_bias=False, layernorm_scaling=True)])
def test_fold_gives_the_same_logits_with_no_norm_left_and_reloads(overrides, tmp_path):
    model = _randomise_prepbns(tiny_model("prepbn", dtype=torch.float64, **overrides), lam=0.0)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        folded = apply(model, ["fold-prepbn"])
        after = folded(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    assert not any(isinstance(m, PRepBN) for m in folded.modules())
    assert isinstance(folded.model.norm, IdentityNorm) and folded.config.norm == "identity"
    assert not folded.config.tie_word_embeddings and folded.config.lm_head_bias and folded.config.bias
    folded.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert type(loaded) is LayerwiseForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after)


def test_fold_refuses_a_norm_mid_decay_naming_it_and_its_lambda():
    model = _randomise_prepbns(tiny_model("prepbn", dtype=torch.float64), lam=0.0)
    model.model.layers[1].mlp.norm_in.lam.fill_(0.25)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.norm_in has lambda=0.25"):
        fold_prepbn(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # refused before any change


@pytest.mark.parametrize("overrides, feeds", [(dict(norm_placement="peri"), "residual"),
                                              (dict(embedding_norm=True), "stream")])
def test_fold_refuses_a_prepbn_that_feeds_more_than_linears(overrides, feeds):
    model = _randomise_prepbns(tiny_model("prepbn", **overrides), lam=0.0)
    with pytest.raises(UserError, match=f"feeds the {feeds}, not only linears"):
        apply(model, ["fold-prepbn"])


def test_fold_refuses_a_model_without_prepbn():
    with pytest.raises(UserError, match="norm='prepbn'"):
        apply(tiny_model("pre-ln"), ["fold-prepbn"])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_mid_decay_matches_eager_in_outputs_gradients_and_buffers(backend):
    """AOTAutograd (aot_eager, inductor) may recompute saved values in the backward from the buffers, which the
    forward updates in place; mid-decay both the LN and the RepBN parts carry gradient."""
    torch.manual_seed(0)
    eager = _randomise_prepbns(LayerwiseForCausalLM(ModelConfig.from_preset("prepbn", n_layers=2)).train(), lam=0.4)
    assert_compiled_training_matches_eager(eager, [torch.randint(0, 256, (2, 16)) for _ in range(3)], backend)
    norm = next(m for m in eager.modules() if isinstance(m, PRepBN))
    assert 0 < float(norm.lam) < 1 and norm.eta.grad.abs() > 0 and norm.weight.grad.abs().max() > 0
