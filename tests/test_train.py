"""The trainer on real text: learning, metrics, telemetry, exact resume after SIGKILL, corrupt checkpoints,
non-finite steps, and torchrun DDP matching a single process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerwise.config import ModelConfig, field_names
from layerwise.errors import UserError
from layerwise.train.checkpoint import CorruptCheckpoint, latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from layerwise.train.config import TrainConfig, apply_overrides, parse_count
from layerwise.train.optim import lr_at, param_groups
from layerwise.train.trainer import (TrainingDiverged, Trainer, attention_gain_refresh_every, build_model_config,
                                      train)


def small(corpus, out, preset="pre-rmsnorm", **overrides) -> TrainConfig:
    base = dict(model=dict(preset=preset, size="tiny"), data=str(corpus), out=str(out), max_tokens=24 * 8 * 64,
                batch_size=8, seq_len=64, lr=3e-3, warmup=2, eval_every=12, eval_batches=4, telemetry_every=12,
                ckpt_every=12, log_every=1, tensorboard=False)
    return TrainConfig(**{**base, **overrides})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(run) if "train_loss" in r}


@pytest.mark.parametrize("preset", ["pre-ln", "block-attnres"])
def test_training_lowers_validation_loss_and_logs_metrics_and_telemetry(corpus, tmp_path, preset):
    result = train(small(corpus, tmp_path, preset=preset, tensorboard=preset == "pre-ln"))
    recs = records(tmp_path)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.8, vals  # step 0, 12, 24
    assert all({"step", "tokens"} <= set(r) for r in recs)
    assert recs[-1]["tokens"] == 24 * 8 * 64 and result["steps"] == 24
    telemetry = [r["telemetry"] for r in recs if "telemetry" in r][-1]
    n_layers = 4
    assert len(telemetry["grad_norm_layers"]) == n_layers and len(telemetry["hidden_rms"]) == n_layers + 1
    assert len(telemetry["attn_contribution"]) == n_layers and all(v > 0 for v in telemetry["mlp_contribution"])
    if preset == "block-attnres":
        weights = telemetry["depth_weights"]
        assert len(weights) == 2 * n_layers + 1 and "model.residual.final_mixer" in weights
        assert all(abs(sum(w) - 1) < 1e-4 for w in weights.values())  # mean weights over tokens sum to 1
        assert len(telemetry["routed_input_rms"]) == n_layers
    else:
        assert "depth_weights" not in telemetry and "routed_input_rms" not in telemetry
    if preset == "pre-ln":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train_loss", "val_loss", "tokens_per_s"} <= tags
        assert len(events.Scalars("train_loss")) == 24
        assert "telemetry/hidden_rms/04" in tags and "telemetry/grad_norm_layers/03" in tags
    model_dir = list_checkpoints(tmp_path)[-1]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.preset == preset


def test_telemetry_hidden_rms_is_the_residual_stream_rms_for_pre_ln(corpus, tmp_path):
    from layerwise import LayerwiseForCausalLM, ModelConfig
    from layerwise.reference import mean_token_rms
    from layerwise.train.telemetry import measure_depth
    from contextlib import nullcontext

    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", "tiny", vocab_size=512))
    ids = torch.randint(0, 512, (2, 16))
    rec = measure_depth(model, ids, nullcontext())
    h = model.model.embed_tokens(ids)
    expected = []
    from layerwise.nn.attention import ForwardContext, rope_cos_sin
    ctx = ForwardContext(rope=rope_cos_sin(torch.arange(16)[None], 32, 10000.0))
    for layer in model.model.layers:
        expected.append(mean_token_rms(h).item())
        h = layer(h, ctx)
    expected.append(mean_token_rms(h).item())
    assert rec["hidden_rms"] == pytest.approx(expected, rel=1e-5)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "layerwise.cli", "train", *args]


def _cli_args(corpus, out, *extra):
    return ["--preset", "lns", "--size", "tiny", "--data", str(corpus), "--out", str(out), "--max-tokens", "20480",
            "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--set", "ckpt_every=5", "--set", "log_every=1",
            "--set", "eval_every=20", "--set", "tensorboard=false", "--set", "threads=1", *extra]


def test_sigkill_then_resume_auto_reproduces_the_uninterrupted_losses(corpus, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_cli(*_cli_args(corpus, reference)), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(*_cli_args(corpus, killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_0000015" / "MANIFEST.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(train_losses(killed))
    assert killed_at < 40, "the kill must land mid-run"
    resumed = subprocess.run(_cli(*_cli_args(corpus, killed, "--resume", "auto")), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, got = train_losses(reference), train_losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    assert got == expected  # bit-identical on CPU, before and after the kill


def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(corpus, tmp_path):
    train(small(corpus, tmp_path, ckpt_every=6, keep_checkpoints=3, max_tokens=12 * 8 * 64))
    first, second = list_checkpoints(tmp_path)[-2:]
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CorruptCheckpoint, match="model.safetensors.*truncated"):
        verify_checkpoint(second)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert latest_valid_checkpoint(tmp_path) == first
    (first / "MANIFEST.json").unlink()  # an interrupted write
    with pytest.raises(CorruptCheckpoint, match="did not finish"):
        verify_checkpoint(first)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_without_a_nan_checkpoint(corpus, tmp_path,
                                                                                        monkeypatch):
    original = Trainer._train_step
    calls = {"n": 0}

    def flaky(self, step, *args):
        loss, grad_norm, x = original(self, step, *args)
        calls["n"] += 1
        return (float("nan") if step == 3 else loss), grad_norm, x

    monkeypatch.setattr(Trainer, "_train_step", flaky)
    result = train(small(corpus, tmp_path / "one-bad", max_tokens=8 * 8 * 64))
    assert result["bad_steps"] == 1
    assert any(r.get("skipped_nonfinite") for r in records(tmp_path / "one-bad"))

    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(small(corpus, tmp_path / "diverged", model={"init_std": 1e30}, max_bad_steps=3, ckpt_every=1))
    assert list_checkpoints(tmp_path / "diverged") == []


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_torchrun_two_gloo_processes_match_one_process(corpus, tmp_path, sharding):
    args = ["--preset", "block-attnres", "--size", "tiny", "--data", str(corpus), "--max-tokens", "5120",
            "--batch-size", "8", "--seq-len", "64", "--set", "log_every=1", "--set", "eval_every=10",
            "--set", "ckpt_every=100", "--set", "tensorboard=false", "--set", "threads=1"]
    single = tmp_path / "single"
    subprocess.run(_cli(*args, "--out", str(single)), check=True, capture_output=True)
    double = tmp_path / sharding
    extra = ["--set", "fsdp=true", "--set", "ckpt_every=5"] if sharding == "fsdp2" else []
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "layerwise.cli", "train", *args, *extra, "--out", str(double)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = train_losses(single), train_losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step
    val_a = [r["val_loss"] for r in records(single) if "val_loss" in r]
    val_b = [r["val_loss"] for r in records(double) if "val_loss" in r]
    assert val_b == pytest.approx(val_a, rel=1e-5)
    if sharding == "fsdp2":  # full (unsharded) weights were gathered into a loadable checkpoint
        assert verify_checkpoint(list_checkpoints(double)[-1])["step"] == 10


def test_train_config_reads_counts_and_rejects_bad_fields(tmp_path):
    assert parse_count("2M") == 2_000_000 and parse_count("500k") == 500_000 and parse_count("1.5B") == 1_500_000_000
    with pytest.raises(ValueError, match="TrainConfig.schedule='linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    cfg = apply_overrides(TrainConfig(), ["lr=3e-4", "model.n_layers=6", "max_tokens=1M"])
    assert cfg.lr == 3e-4 and cfg.model == {"preset": "pre-rmsnorm", "size": "tiny", "n_layers": 6}
    assert cfg.max_tokens == 1_000_000
    path = tmp_path / "t.yaml"
    cfg.save_yaml(path)
    assert TrainConfig.from_yaml(path) == cfg


def test_the_model_is_one_mapping_of_preset_size_and_model_config_fields():
    cfg = TrainConfig(model={"preset": "lns", "n_layers": 2})
    assert cfg.model == {"preset": "lns", "size": "tiny", "n_layers": 2}
    with pytest.raises(UserError, match="TrainConfig.model got unknown field.*n_layer;"):
        TrainConfig(model={"n_layer": 2})
    with pytest.raises(UserError, match="TrainConfig.model.preset='nope'"):
        TrainConfig(model={"preset": "nope"})
    with pytest.raises(UserError, match="TrainConfig.model.size='2b'"):
        TrainConfig(model={"size": "2b"})
    for old, new in (("vocab_size", "tokenizer_vocab_size"), ("preset", "model.preset"), ("size", "model.size")):
        with pytest.raises(UserError, match=f"TrainConfig.{old} is now {new}"):
            TrainConfig.from_dict({old: 300})


def test_a_train_yaml_saved_before_the_model_mapping_still_reads():
    legacy = TrainConfig.from_yaml(Path(__file__).parent / "data" / "legacy-train.yaml")
    assert legacy.model == {"preset": "peri-ln", "size": "tiny", "n_layers": 2}
    assert legacy.tokenizer_vocab_size == 300 and legacy.lr == 2e-3 and legacy.out == "runs/old"
    assert legacy == TrainConfig(model={"preset": "peri-ln", "n_layers": 2}, tokenizer_vocab_size=300, lr=2e-3,
                                 out="runs/old")


def test_a_legacy_model_config_file_becomes_the_model_mapping(tmp_path):
    with_preset, plain = tmp_path / "with_preset.yaml", tmp_path / "plain.yaml"
    with_preset.write_text("preset: lns\nd_model: 64\n")
    plain.write_text("d_model: 64\nn_layers: 2\nn_heads: 2\n")
    train_yaml = tmp_path / "train.yaml"
    # model_config replaced the top-level preset and size; `model:` overrides still went on top.
    train_yaml.write_text(f"preset: dyt\nsize: 124m\nmodel_config: {with_preset}\nmodel: {{n_layers: 2}}\n")
    assert TrainConfig.from_yaml(train_yaml).model == {"preset": "lns", "size": "tiny", "d_model": 64, "n_layers": 2}
    train_yaml.write_text(f"model_config: {plain}\n")
    cfg = TrainConfig.from_yaml(train_yaml)
    # A file without `preset` was read over ModelConfig's defaults; the converted mapping builds the same model.
    model_cfg = build_model_config(cfg, vocab_size=256)
    expected = ModelConfig(d_model=64, n_layers=2, n_heads=2, vocab_size=256, max_seq_len=256)
    assert {k: getattr(model_cfg, k) for k in field_names() if k != "preset"} == \
        {k: getattr(expected, k) for k in field_names() if k != "preset"}


def test_schedules_warm_up_then_decay_to_the_floor():
    cosine = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1, schedule="cosine")
    values = [lr_at(s, cosine, 100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(values[10:], values[11:]))
    wsd = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    values = [lr_at(s, wsd, 100) for s in range(101)]
    assert values[50] == 1.0 and values[79] == 1.0 and values[90] == pytest.approx(0.5) and values[100] == 0.0


def test_weight_decay_skips_norms_biases_embeddings_and_attnres_queries():
    from layerwise import LayerwiseForCausalLM, ModelConfig

    model = LayerwiseForCausalLM(ModelConfig.from_preset("block-attnres", "tiny", bias=True))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert any(n.endswith(".query") for n in kept) and any(n.endswith(".bias") for n in kept)
    assert all(p.ndim == 2 for p in decay["params"]) and "model.layers.0.attn.fn.q_proj.weight" in decayed
    assert not any(n.endswith(".query") or "norm" in n for n in decayed)


def test_seednorm_alpha_and_beta_are_decayed_and_its_gamma_is_not():
    """SeeDNorm's paper decays alpha and beta; gamma follows the baseline's (undecayed) norm-gain policy."""
    from layerwise import LayerwiseForCausalLM, ModelConfig

    model = LayerwiseForCausalLM(ModelConfig.from_preset("seednorm", "tiny"))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    seednorm = [n.removesuffix(".alpha") for n in names.values() if n.endswith(".alpha")]
    assert seednorm and "model.norm" in seednorm  # every norm, the final one included
    for norm in seednorm:
        assert {f"{norm}.alpha", f"{norm}.beta"} <= decayed and f"{norm}.weight" in kept


def _attention_gains(checkpoint: Path) -> tuple[list[float], list[float]]:
    """The saved c of every BHyT layer, and c recomputed from the saved weights with T = 32."""
    from safetensors.torch import load_file

    from layerwise.nn.norms import attention_output_gain

    weights = load_file(checkpoint / "model.safetensors")
    saved, recomputed = [], []
    for i in range(4):
        prefix = f"model.layers.{i}."
        saved.append(weights[prefix + "attn_gain"].item())
        v, o = weights[prefix + "attn.fn.v_proj.weight"], weights[prefix + "attn.fn.o_proj.weight"]
        recomputed.append(attention_output_gain(v, o, 4, 32).item())
    return saved, recomputed


def test_attention_gain_refresh_interval_is_total_over_50_between_1_and_1000():
    assert [attention_gain_refresh_every(n) for n in (10, 49, 100, 149, 20_000, 50_000, 10**6)] == \
        [1, 1, 2, 2, 400, 1000, 1000]


def test_bhyt_gain_is_refreshed_during_training_and_a_resumed_run_refreshes_on_the_same_steps(corpus, tmp_path,
                                                                                             monkeypatch):
    """c is recomputed after every 3rd step (the interval a 150-step run gets) with T = seq_len. The run is
    resumed from step 7, between two refreshes: recomputing c at the resume would change step 8's loss."""
    import shutil

    from layerwise.train import trainer

    monkeypatch.setattr(trainer, "attention_gain_refresh_every", lambda total: 3)
    cfg = dict(preset="bhyt", batch_size=4, seq_len=32, max_tokens=12 * 4 * 32, eval_every=1000, telemetry_every=1000,
               ckpt_every=7)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(small(corpus, reference, **cfg))
    at_7, at_12 = (_attention_gains(path) for path in list_checkpoints(reference))
    assert at_12[0] == pytest.approx(at_12[1], rel=1e-6)  # step 12 refreshed c from the step-12 weights
    assert at_7[0] != pytest.approx(at_7[1], rel=1e-6)  # step 7 still holds step 6's c
    assert all(abs(a - b) > 1e-6 * abs(b) for a, b in zip(at_7[0], at_12[0])), "c must follow the weights"

    train(small(corpus, resumed, **cfg))
    last = list_checkpoints(resumed)[-1]
    assert last.name == "step_0000012"
    shutil.rmtree(last)
    train(small(corpus, resumed, resume="auto", **cfg))
    assert train_losses(resumed) == train_losses(reference)
    assert _attention_gains(list_checkpoints(resumed)[-1])[0] == at_12[0]
