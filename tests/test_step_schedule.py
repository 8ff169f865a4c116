"""The trainer and a model's own state: it drives the step schedules (layerwise.nn.schedule), the same on resume,
and keeps batch-statistics norms whole across a skipped step."""

import torch
from torch import nn

from layerwise.nn.schedule import scheduled_modules, set_training_step, steps_of
from layerwise.train.trainer import ModelStepSchedule


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.tensor(-1))
        self.seen = []

    def set_training_step(self, step, total_steps):
        self.step.fill_(step)
        self.seen.append((step, total_steps))


def test_steps_of_reads_fractions_and_counts_like_warmup():
    assert steps_of(0.25, 120) == 30
    assert steps_of(0.0, 120) == 0
    assert steps_of(40, 120) == 40
    assert steps_of(1, 120) == 1


def test_every_scheduled_module_is_set_including_nested_ones():
    model = nn.Sequential(nn.Linear(2, 2), Recorder(), nn.Sequential(Recorder()))
    assert len(scheduled_modules(model)) == 2
    set_training_step(model, 7, 10)
    assert [m.seen for m in scheduled_modules(model)] == [[(7, 10)], [(7, 10)]]


def test_the_trainer_callback_passes_the_runs_total_steps():
    class Cfg:
        total_steps = 123

    model = nn.Sequential(Recorder())
    callback = ModelStepSchedule()
    assert callback.prepare(model, Cfg()) is model
    callback.on_step_start(5, model)
    assert model[0].seen == [(5, 123)] and int(model[0].step) == 5


def test_a_run_splitting_the_batch_says_so_when_a_norm_uses_batch_statistics():
    from layerwise.train.trainer import batch_statistics_note

    class BatchStatNorm(nn.Module):
        batch_statistics = True

    model = nn.Sequential(nn.Linear(2, 2), BatchStatNorm())
    assert batch_statistics_note(model, micro_batch=8, batch_size=8) is None  # whole batches: nothing differs
    note = batch_statistics_note(model, micro_batch=4, batch_size=8)
    assert "BatchStatNorm" in note and "4 sequences" in note and "global batch of 8" in note
    assert "rank 0" not in note and "rank 0's" in batch_statistics_note(model, 4, 8, ddp=True)
    assert batch_statistics_note(nn.Sequential(nn.Linear(2, 2)), micro_batch=4, batch_size=8) is None


def test_the_batch_statistics_norms_are_flagged_and_rmsnorm_is_not():
    from layerwise.nn.norms import NORMS

    assert all(NORMS.get(name).batch_statistics for name in ("prepbn", "un", "powernorm"))
    assert not NORMS.get("rmsnorm").batch_statistics


def test_a_skipped_non_finite_step_leaves_the_batch_statistics_as_they_were(corpus, tmp_path, monkeypatch):
    """The step's forward has already moved the running statistics; a NaN batch would poison them for good."""
    from layerwise.nn.norms import PRepBN
    from layerwise.train.config import TrainConfig
    from layerwise.train.trainer import Trainer, train
    from safetensors.torch import load_file

    original = Trainer._train_step

    def flaky(poison):
        def step_fn(self, step, forward, wrapped, model, *args):
            out = original(self, step, forward, wrapped, model, *args)
            if step != 3:
                return out
            if poison:  # what a NaN batch does to the statistics
                for m in model.modules():
                    if isinstance(m, PRepBN):
                        m.running_var.fill_(float("nan"))
            return float("nan"), out[1], out[2]
        return step_fn

    finals = {}
    for poison in (False, True):
        monkeypatch.setattr(Trainer, "_train_step", flaky(poison))
        out = tmp_path / f"poison-{poison}"
        cfg = TrainConfig(model=dict(preset="prepbn", size="tiny"), data=str(corpus), out=str(out),
                          max_tokens=6 * 4 * 32, batch_size=4, seq_len=32, eval_every=100, eval_batches=2,
                          ckpt_every=100, tensorboard=False)
        result = train(cfg)
        assert result["bad_steps"] == 1
        (last,) = sorted((out / "checkpoints").iterdir())[-1:]
        finals[poison] = load_file(last / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in finals[True].values())
    assert finals[True].keys() == finals[False].keys()
    assert all(torch.equal(finals[True][k], finals[False][k]) for k in finals[False])
