"""LayerNorm removal by fine-tuning: FakeLN, the removal schedules, the trainer callbacks that run them, exact
resume, and the export to fixed-scale norms (layerwise) and to a stock GPT-2."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model, tiny_model

from layerwise.errors import UserError
from layerwise.nn.norms import FakeLayerNorm, FrozenScaleNorm
from layerwise.train.checkpoint import list_checkpoints
from layerwise.train.config import TrainConfig
from layerwise.train.norm_removal import (SCHEDULES, NormRemoval, as_gpt2_layernorm, data_dependent_norms, freeze,
                                          set_removal_state, tracked_stds, with_fake_norms)
from layerwise.train.trainer import TrainerCallback, train


def _constant_std_batch(B=3, T=7, d=16, std=2.5, dtype=torch.float64):
    """Tokens with arbitrary means and directions but one population std, the same at every position."""
    z = torch.randn(B, T, d, dtype=dtype)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, unbiased=False, keepdim=True)
    return z * std + torch.randn(B, T, 1, dtype=dtype)


def test_live_fakeln_is_layer_norm_and_tracks_the_batch_mean_std_of_first_and_other_positions():
    norm = FakeLayerNorm(16, eps=1e-5).double().train()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, y = torch.randn(3, 7, 16, dtype=torch.float64), 3 * torch.randn(3, 7, 16, dtype=torch.float64)
    assert torch.equal(norm(x), F.layer_norm(x, (16,), norm.weight, norm.bias, 1e-5))
    per_token = lambda t: (t.var(-1, unbiased=False) + 1e-5).sqrt()  # noqa: E731
    scale = norm.uses["x"]
    assert scale.std.item() == pytest.approx(per_token(x)[:, 1:].mean().item(), rel=1e-12)
    assert scale.std_bos.item() == pytest.approx(per_token(x)[:, 0].mean().item(), rel=1e-12)
    norm(y)  # EMA, momentum 0.9
    assert scale.std.item() == pytest.approx(0.9 * per_token(x)[:, 1:].mean().item()
                                             + 0.1 * per_token(y)[:, 1:].mean().item(), rel=1e-12)
    before = scale.std.clone()
    norm.eval()(3 * y)
    with torch.no_grad():
        norm.train()(3 * y)
    assert torch.equal(scale.std, before), "only training forwards with autograd on track the std"


def test_fake_with_the_tracked_std_equals_the_live_norm_on_its_calibration_batch_when_stds_are_equal():
    """What the equality can claim: after the batch repeated, the constant is the batch's mean per-token std,
    so fake == live exactly on tokens whose std is that mean, here all of them; a general batch differs by
    each token's std over the mean (checked too)."""
    norm = FakeLayerNorm(16).double().train()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = _constant_std_batch()
    for _ in range(3):
        live = norm(x)
    norm.uses["x"].fake = True
    torch.testing.assert_close(norm(x), live, rtol=0, atol=1e-12)
    general = torch.randn(3, 7, 16, dtype=torch.float64) * torch.rand(3, 7, 1, dtype=torch.float64) * 4
    assert (norm(general) - F.layer_norm(general, (16,), norm.weight, norm.bias, 1e-5)).abs().max() > 0.1


def test_fake_special_positions_use_the_first_position_std_until_switched_off():
    norm = FakeLayerNorm(8).double().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    norm(x)
    scale = norm.uses["x"]
    scale.fake = True
    scale.std.fill_(2.0)
    scale.std_bos.fill_(8.0)
    eot = torch.zeros(2, 5, dtype=torch.bool)
    eot[1, 3] = True
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / 2.0
    expected[:, 0] = centred[:, 0] / 8.0
    expected[1, 3] = centred[1, 3] / 8.0
    torch.testing.assert_close(norm(x, eot=eot), expected, rtol=0, atol=1e-14)
    scale.eot_special = False
    expected[1, 3] = centred[1, 3] / 2.0
    torch.testing.assert_close(norm(x, eot=eot), expected, rtol=0, atol=1e-14)
    scale.bos_special = False
    torch.testing.assert_close(norm(x, eot=eot), centred / 2.0, rtol=0, atol=1e-14)


def test_a_fakeln_model_with_every_norm_live_is_the_pre_ln_model_exactly():
    model = tiny_model("pre-ln", dtype=torch.float64)
    fake = with_fake_norms(model).eval()
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(fake(ids).logits, model(ids).logits)
    assert sorted(tracked_stds(fake)) == sorted(["final"] + [f"{p}.{i}" for p in ("ln2", "ln1qk", "ln1v")
                                                            for i in range(4)])


@pytest.mark.parametrize("preset, overrides, field", [("pre-rmsnorm", {}, "norm"), ("pre-ln", {"norm_placement": "peri"},
                                                     "norm_placement"), ("lns", {"norm": "layernorm"}, "layernorm_scaling")])
def test_models_the_removal_does_not_handle_are_refused_naming_the_field(preset, overrides, field):
    with pytest.raises(UserError, match=rf"ModelConfig\.{field}=.* is not supported") as err:
        with_fake_norms(tiny_model(preset, **overrides))
    assert "\n" not in str(err.value)


def test_the_reference_schedules_are_reproduced_step_for_step_at_their_own_length_and_depth():
    baroni = {what: step for step, what in SCHEDULES["baroni"].events(300, 12)}
    expected = {**{f"ln2.{i}": 20 + 2 * i for i in range(12)}, **{f"ln1qk.{i}": 44 + 2 * i for i in range(12)},
                **{f"ln1v.{i}": 68 + 3 * i for i in range(12)}, "final": 104, "eot": 106, "bos": 116}
    assert baroni == expected
    heimersheim = {what: step for step, what in SCHEDULES["heimersheim"].events(2000, 12)}
    assert heimersheim == {**{f"ln2.{i}": 200 + 20 * i for i in range(12)},
                           **{f"ln1qk.{i}": 440 + 20 * i for i in range(12)},
                           **{f"ln1v.{i}": 680 + 30 * i for i in range(12)}, "final": 1040, "eot": 1060, "bos": 1160}


@pytest.mark.parametrize("name", ["baroni", "heimersheim"])
def test_scaled_schedules_keep_the_order_and_fractions_and_refuse_runs_too_short(name):
    events = SCHEDULES[name].events(1000, 6)
    steps = [s for s, _ in events]
    assert steps == sorted(set(steps)) and len(events) == 3 * 6 + 3
    ref = SCHEDULES[name]
    assert steps[0] == ref.start * 1000 // ref.steps and steps[-1] == ref.bos * 1000 // ref.steps
    with pytest.raises(UserError, match="raise --max-tokens to at least") as err:
        ref.events(20, 6, tokens_per_step=64)
    needed = int(str(err.value).split("at least ")[1].split(" steps")[0])
    assert len({s for s, _ in ref.events(needed, 6)}) == 21


class Spy(TrainerCallback):
    def __init__(self):
        self.seen = {}

    def on_step_start(self, step, model):
        self.seen[step] = {name: (s.fake, s.eot_special, s.bos_special) for name, s in tracked_stds(model).items()}


STEPS = 34


def _run(corpus, out, **overrides):
    base = dict(model=dict(preset="pre-ln", size="tiny", n_layers=3, d_model=64), data=str(corpus), out=str(out),
                max_tokens=STEPS * 2 * 32, batch_size=2, seq_len=32, lr=1e-3, warmup=2, eval_every=1000,
                eval_batches=1, telemetry_every=1000, ckpt_every=13, keep_checkpoints=5, log_every=1,
                tensorboard=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted removal (the Heimersheim schedule on 3 layers in 34 steps), watched by a spy."""
    out = tmp_path_factory.mktemp("removal") / "reference"
    removal, spy = NormRemoval("heimersheim"), Spy()
    train(_run(corpus, out), callbacks=[removal, spy])
    return out, removal, spy


def test_the_trainer_switches_exactly_the_scheduled_norms_at_the_scheduled_steps(reference_run):
    run, removal, spy = reference_run
    at = {what: step for step, what in removal.events}
    assert at == {what: step for step, what in SCHEDULES["heimersheim"].events(STEPS, 3)}
    assert sorted(spy.seen) == list(range(STEPS))  # the start-of-run call and step 0's see the same state
    for step in range(STEPS):
        for name, (fake, eot_special, bos_special) in spy.seen[step].items():
            assert fake == (step >= at[name]), (step, name)
            assert eot_special == (step < at["eot"]) and bos_special == (step < at["bos"]), (step, name)
    config = json.loads((list_checkpoints(run)[-1] / "config.json").read_text())
    assert config["norm"] == "fakeln"


def test_a_checkpoint_saved_mid_removal_reloads_with_its_switches_and_stds(reference_run):
    from transformers import AutoModelForCausalLM

    run, _, spy = reference_run
    step_13 = list_checkpoints(run)[0]
    assert step_13.name == "step_0000013"
    loaded = AutoModelForCausalLM.from_pretrained(step_13)
    uses = tracked_stds(loaded)
    assert {name: (s.fake, s.eot_special, s.bos_special) for name, s in uses.items()} == spy.seen[12]
    assert all(torch.isfinite(s.std) for s in uses.values())


def test_a_removal_interrupted_and_resumed_equals_the_uninterrupted_one(corpus, tmp_path, reference_run):
    """Resumed from step 13, inside the ln_1 Q/K phase: the tracked stds come back from the checkpoint, the
    switches from the step."""
    from safetensors.torch import load_file
    from test_train import train_losses

    reference, removal, _ = reference_run
    assert removal.events[0][0] < 13 < removal.events[-1][0]
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)  # the run as it was when killed after writing step 13
    for later in list_checkpoints(resumed)[1:]:
        shutil.rmtree(later)
    train(_run(corpus, resumed, resume="auto"), callbacks=[NormRemoval("heimersheim")])
    assert train_losses(resumed) == train_losses(reference)
    a, b = (load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (reference, resumed))
    assert a.keys() == b.keys() and any(".uses." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _all_fake(model, seed=0):
    """Every use switched with its own std (V unlike Q/K), no special positions: the end of a removal."""
    generator = torch.Generator().manual_seed(seed)
    for scale in tracked_stds(model).values():
        scale.std.copy_(0.5 + torch.rand((), generator=generator, dtype=torch.float64))
        scale.std_bos.copy_(scale.std * 3)
    set_removal_state(model, [(0, name) for name in tracked_stds(model)] + [(0, "eot"), (0, "bos")], 0)
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_freeze_computes_the_fake_model_exactly_with_the_value_std_folded_into_v_proj(bias):
    model = tiny_model("pre-ln", dtype=torch.float64, bias=bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1 if name.endswith("weight") else 0, 0.3)
    fake = _all_fake(with_fake_norms(model))
    frozen = freeze(fake)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(frozen(ids).logits, fake(ids).logits, rtol=0, atol=1e-10)
    assert frozen.config.qkv_bias != bias  # a model without biases gets a value bias (zero q/k biases)
    assert data_dependent_norms(frozen) == [] and data_dependent_norms(fake) != []
    assert {type(m) for m in frozen.modules() if "Norm" in type(m).__name__} == {FrozenScaleNorm}
    tracked_stds(fake)["ln1v.2"].fake = False
    with pytest.raises(ValueError, match=r"not yet: \['ln1v.2'\]"):
        freeze(fake)


def test_end_of_text_tokens_read_the_first_position_std_on_the_value_path_only():
    """Tokens before the first EOT see no difference; the EOT token's own output changes through its values."""
    model = tiny_model("pre-ln", dtype=torch.float64)
    fake = _all_fake(with_fake_norms(model, eot_token_id=7))
    ids = torch.tensor([[3, 9, 4, 7, 2, 8]])
    plain = fake(ids).logits
    for scale in tracked_stds(fake).values():
        scale.eot_special = True
    special = fake(ids).logits
    assert torch.equal(special[:, :3], plain[:, :3]) and not torch.allclose(special[:, 3:], plain[:, 3:])
    for name, scale in tracked_stds(fake).items():
        scale.eot_special = name.startswith("ln1v")
    torch.testing.assert_close(fake(ids).logits, special, rtol=0, atol=0)


def test_the_exported_model_reloads_and_its_cached_generate_equals_full_forwards(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerwise.transform.save import save_transformed

    frozen = freeze(_all_fake(with_fake_norms(tiny_model("pre-ln"))))
    save_transformed(frozen, None, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert data_dependent_norms(loaded) == []
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, frozen(ids).logits, rtol=0, atol=0)
    out = loaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, eos_token_id=None,
                          pad_token_id=0)
    greedy = ids
    for _ in range(8):
        greedy = torch.cat([greedy, loaded(greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, greedy)


def test_a_gpt2_comes_back_as_a_stock_gpt2_whose_layernorms_compute_the_frozen_scales(tmp_path):
    """eps = 1e12 and gamma * 1e6 / sigma give (x - mean) / sqrt(var + 1e12) ~= (x - mean) / 1e6, off by a
    relative var / 2e12: with the stream's std near 10 (embeddings scaled up) that is 5e-11 in float64, and
    float32 rounding (1e-6 of the largest logit) once saved and reloaded as a stock GPT2LMHeadModel."""
    from transformers import GPT2LMHeadModel

    from layerwise.arch.state_dict import layerwise_to_hf

    source = hf_model("gpt2").train()
    with torch.no_grad():
        source.transformer.wte.weight.mul_(500)
        source.transformer.wpe.weight.mul_(500)
    fake = NormRemoval("baroni").prepare(source, TrainConfig(max_tokens=100 * 64, batch_size=1, seq_len=64))
    frozen = freeze(_all_fake(fake.double()))
    ids = torch.randint(0, 128, (2, 10))
    stream_std = frozen.model.embed_tokens(ids).std().item()
    assert 5 < stream_std < 20, stream_std
    gpt2 = layerwise_to_hf(as_gpt2_layernorm(frozen), "gpt2").eval()
    expected = frozen(ids).logits
    assert (gpt2(ids).logits - expected).abs().max() <= 1e-9 * expected.abs().max()
    gpt2.float().save_pretrained(tmp_path / "gpt2")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e12}
    assert (loaded(ids).logits.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_remove_norms_cli_takes_a_gpt2_and_exports_a_frozen_layerwise_model_and_a_stock_gpt2(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from layerwise.cli import app

    torch.manual_seed(0)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"))
    source.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"

    def cli(max_tokens, out):
        return CliRunner().invoke(app, [
            "remove-norms", str(tmp_path / "gpt2"), "--data", str(corpus), "--max-tokens", str(max_tokens),
            "--batch-size", "2", "--seq-len", "16", "--schedule", "heimersheim", "--out", str(out),
            "--set", "eval_batches=1", "--set", "tensorboard=false"])

    too_short = cli(10 * 2 * 16, tmp_path / "short")
    assert too_short.exit_code != 0 and "raise --max-tokens to at least" in str(too_short.exception)
    assert not (tmp_path / "short").exists(), "refused before the run folder is made"
    result = cli(19 * 2 * 16, out)
    assert result.exit_code == 0, result.output
    events = dict((what, step) for step, what in SCHEDULES["heimersheim"].events(19, 2))
    assert (f"ln2 {events['ln2.0']}, ln1qk {events['ln1qk.0']}, ln1v {events['ln1v.0']}, final {events['final']}, "
            f"eot {events['eot']}, bos {events['bos']}") in " ".join(result.output.split())
    run_config = json.loads((list_checkpoints(out)[-1] / "config.json").read_text())
    assert run_config["norm"] == "fakeln"
    assert run_config["fakeln_eot_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert exported.config.norm == "frozen" and data_dependent_norms(exported) == []
    gpt2 = GPT2LMHeadModel.from_pretrained(out / "model-gpt2").eval()
    ids = torch.randint(0, 512, (2, 12))
    expected = exported(ids).logits
    assert (gpt2(ids).logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_model_mid_removal_decodes_with_a_cache_once_no_position_is_special_and_refuses_before():
    """Norms take a chunk's first token as position 0, which a cached continuation does not start at."""
    from conftest import greedy_without_cache

    fake = _all_fake(with_fake_norms(tiny_model("pre-ln")))  # every use fake, no special position
    prompt = torch.randint(1, 256, (1, 5))
    with torch.no_grad():
        cached = fake.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(fake, prompt, 6))
    for scale in tracked_stds(fake).values():
        scale.bos_special = True
    with pytest.raises(ValueError, match="decodes only without a KV cache"):
        fake.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=True, pad_token_id=0)


def test_a_model_file_has_no_tokenizer_to_read_an_end_of_text_id_from(tmp_path):
    from layerwise.train.cli import _eot_token_id

    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF\x03\x00\xff\xfe not utf-8")
    assert _eot_token_id(weights) is None
