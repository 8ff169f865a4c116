"""Fault injection: reruns, a second writer, corrupt checkpoints, torn logs, a full disk, changed settings and bad
input never lose a run, never report a wrong one, and end in one line (exit 2) rather than a traceback."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from layerwise.compare import compare
from layerwise.data.shards import HEADER_BYTES, write_shard
from layerwise.errors import UserError
from layerwise.runs import LOCK, read_metrics, run_tokenizer
from layerwise.train import checkpoint as checkpoint_module
from layerwise.train.checkpoint import list_checkpoints, verify_checkpoint
from layerwise.train.config import TrainConfig
from layerwise.train.trainer import train

SRC = Path(__file__).resolve().parents[1] / "src"


def small(corpus, out, **overrides) -> TrainConfig:
    model = {"preset": overrides.pop("preset", "pre-rmsnorm"), "size": "tiny", "n_layers": 2}
    base = dict(model=model, data=str(corpus), out=str(out), max_tokens=12 * 4 * 32,
                batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=6, eval_batches=2, telemetry_every=6,
                ckpt_every=6, log_every=1, tensorboard=False)
    return TrainConfig(**{**base, **overrides})


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != LOCK}


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "layerwise.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def cli_train_args(corpus, out, *extra) -> list[str]:
    return ["train", "--preset", "pre-rmsnorm", "--size", "tiny", "--data", str(corpus), "--out", str(out),
            "--max-tokens", "1536", "--batch-size", "4", "--seq-len", "32", "--set", "tensorboard=false",
            "--set", "threads=1", "--set", "model.n_layers=2", *extra]


def test_rerun_without_resume_is_refused_and_the_old_run_is_intact(corpus, tmp_path):
    run = tmp_path / "run"
    train(small(corpus, run))
    before = snapshot(run)
    with pytest.raises(UserError, match=f"{run} already holds a run.*--resume auto.*--overwrite"):
        train(small(corpus, run, lr=1e-3))
    assert snapshot(run) == before
    train(small(corpus, run, lr=1e-3, overwrite=True))  # moves the old run aside, whole
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == before
    assert json.loads((run / "checkpoints" / "step_0000012" / "trainer_state.json").read_text())[
        "train_config"]["lr"] == 1e-3


def test_a_second_process_on_a_locked_folder_is_refused_while_the_first_completes(corpus, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    first = subprocess.Popen([sys.executable, "-m", "layerwise.cli",
                              *cli_train_args(corpus, run, "--max-tokens", "128000", "--set", "ckpt_every=500")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not ((run / LOCK).exists() and (run / LOCK).read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run ended before it took the lock"
        time.sleep(0.05)
    second = cli(*cli_train_args(corpus, run, "--resume", "auto"))
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert second.returncode == 2 and "Traceback" not in second.stderr
    message = " ".join(second.stdout.split())  # rich wraps long lines
    # Naming the first's pid proves it was refused while the first held the folder.
    assert f"{run} is in use by another layerwise process (pid {first.pid} on " in message, message
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
    assert len({step for step, _ in vals}) == len(vals)  # one writer: one validation loss per step


def test_all_corrupt_checkpoints_are_set_aside_and_the_new_run_keeps_its_own(corpus, tmp_path):
    run = tmp_path / "run"
    train(small(corpus, run))
    old = list_checkpoints(run)
    assert len(old) == 2
    for path in old:
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    old_metrics = (run / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match="corrupt checkpoint moved"):
        train(small(corpus, run, resume="auto"))
    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step_0000006", "step_0000012"]
    for path in kept:
        verify_checkpoint(path)
    assert sorted(p.name for p in (run / "checkpoints" / "corrupt").iterdir()) == ["step_0000006", "step_0000012"]
    (aside,) = run.glob("metrics.jsonl.old-*")
    assert aside.read_text() == old_metrics


def test_retention_never_deletes_a_valid_checkpoint_for_a_corrupt_one(corpus, tmp_path):
    run = tmp_path / "run"
    train(small(corpus, run, keep_checkpoints=3))
    first, last = list_checkpoints(run)
    shutil.rmtree(last)
    fake = first.parent / "step_0000099"  # a corrupt checkpoint that sorts newer than every real one
    shutil.copytree(first, fake)
    (fake / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="corrupt checkpoint moved"):
        train(small(corpus, run, resume=str(first), keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000012"]
    assert [p.name for p in (run / "checkpoints" / "corrupt").iterdir()] == ["step_0000099"]


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(corpus, tmp_path):
    reference, torn = tmp_path / "reference", tmp_path / "torn"
    train(small(corpus, reference))
    train(small(corpus, torn, keep_checkpoints=3))
    shutil.rmtree(torn / "checkpoints" / "step_0000012")  # killed after step 12's record, before its checkpoint
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "tokens": 16')  # and mid-write of the next record
    with pytest.warns(UserWarning, match="partial last record"):
        train(small(corpus, torn, resume="auto", keep_checkpoints=3))
    timing = ("tokens_per_s", "data_fraction")  # wall-clock numbers; everything else must match exactly

    def losses(run):
        return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run)]

    assert losses(torn) == losses(reference)


def test_a_full_disk_leaves_earlier_checkpoints_valid_and_no_temporary_folder(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save, calls = checkpoint_module.save_file, {"n": 0}

    def fills_the_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's optimizer state (each checkpoint writes two files)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", fills_the_disk)
    with pytest.raises(OSError, match="disk full writing checkpoint step_0000012.*--resume auto"):
        train(small(corpus, run))
    (kept,) = list_checkpoints(run)
    verify_checkpoint(kept)
    assert list((run / "checkpoints").glob(".tmp-*")) == []
    (run / "checkpoints" / ".tmp-step_0000012-1").mkdir()  # left by a crash mid-write
    (run / "checkpoints" / "notes.txt").write_text("mine")  # the cleaning takes our temporary folders only
    (run / "analysis").mkdir()
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    train(small(corpus, run, resume="auto"))
    assert list((run / "checkpoints").glob(".tmp-*")) == []
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine" and (run / "analysis").is_dir()


def test_compare_refuses_to_reuse_runs_trained_with_other_settings(corpus, tmp_path):
    base = small(corpus, tmp_path / "unused", max_tokens=6 * 4 * 32)
    compare(["pre-rmsnorm"], [0], base, tmp_path / "cmp")
    changed = small(corpus, tmp_path / "unused", max_tokens=6 * 4 * 32, lr=1e-3)
    with pytest.raises(UserError, match=r"other settings \(lr: 0.003 in the checkpoint, 0.001 now\)"):
        compare(["pre-rmsnorm"], [0], changed, tmp_path / "cmp")
    again = compare(["pre-rmsnorm"], [0], base, tmp_path / "cmp")  # the same settings are still reused
    assert again["rows"][0]["final_val_loss"] == json.loads((tmp_path / "cmp" / "comparison.json").read_text())[
        "rows"][0]["final_val_loss"]


def test_resume_with_a_different_preset_is_refused_and_lists_the_fields(corpus, tmp_path):
    run = tmp_path / "run"
    train(small(corpus, run, max_tokens=6 * 4 * 32))
    recorded = (run / "model_config.json").read_text()
    with pytest.raises(UserError, match="other settings.*model.preset: 'pre-rmsnorm' in the checkpoint, 'lns' now"):
        train(small(corpus, run, max_tokens=6 * 4 * 32, preset="lns", resume="auto"))
    assert (run / "model_config.json").read_text() == recorded


def test_shard_ids_above_the_vocabulary_are_refused_before_any_folder_is_written(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train.bin", "val.bin"):
        write_shard(shards / name, rng.integers(0, 300, 4096), vocab_size=300)
    with open(shards / "val.bin", "r+b") as f:  # the first validation token, outside the vocabulary
        f.seek(HEADER_BYTES)
        f.write(np.uint16(5000).tobytes())
    (shards / "manifest.json").write_text(json.dumps({"vocab_size": 300}))  # a corpus is complete with its manifest
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"val.bin: token id 5000 >= the vocabulary of 300"):
        train(TrainConfig(data=str(shards), out=str(run), max_tokens=2048, batch_size=4, seq_len=32,
                          tensorboard=False))
    assert not run.exists()


def test_a_run_records_its_tokenizer_so_diagnose_and_eval_find_it(corpus, tmp_path):
    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    run = tmp_path / "run"
    train(small(data, run, max_tokens=6 * 4 * 32))
    shutil.rmtree(data)  # as the default corpus lives in a cache that the run does not name
    assert run_tokenizer(run) == run / "tokenizer.json"
    assert (run / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("case", ["yaml syntax", "yaml model list", "yaml quoted no", "yaml compile maybe",
                                  "micro_batch_size=abc", "threads=-1", "seed=abc", "model=foo", "resume atuo",
                                  "resume missing path", "out is a file", "divergence"])
def test_each_user_mistake_exits_2_with_one_line_and_no_traceback(corpus, tmp_path, case):
    yaml_file = tmp_path / "train.yaml"
    (tmp_path / "a-file").write_text("not a folder")
    files = {"yaml syntax": "lr: 1e-3\nseq_len: [32\n", "yaml model list": "model: [1, 2]\n",
             "yaml quoted no": 'tensorboard: "no"\n', "yaml compile maybe": "compile: maybe\n"}
    expected = {"yaml syntax": f"{yaml_file}:3:1", "yaml model list": "TrainConfig.model=[1, 2] must be a mapping",
                "yaml quoted no": "TrainConfig.tensorboard='no' must be true or false",
                "yaml compile maybe": "TrainConfig.compile='maybe' must be true or false",
                "micro_batch_size=abc": "TrainConfig.micro_batch_size='abc' must be an integer or null",
                "threads=-1": "TrainConfig.threads=-1 must be >= 0",
                "seed=abc": "TrainConfig.seed='abc' must be an integer",
                "model=foo": "TrainConfig.model='foo' must be a mapping",
                "resume atuo": "TrainConfig.resume='atuo' is not none, auto or an existing checkpoint folder",
                "resume missing path": "is not none, auto or an existing checkpoint folder",
                "out is a file": "is an existing file, not a folder",
                "divergence": "No checkpoint was written before it diverged"}
    out = tmp_path / "run"
    if case in files:
        yaml_file.write_text(files[case])
        args = cli_train_args(corpus, out, "--config", str(yaml_file))
    elif "=" in case:
        args = cli_train_args(corpus, out, "--set", case)
    elif case == "resume atuo":
        args = cli_train_args(corpus, out, "--resume", "atuo")
    elif case == "resume missing path":
        args = cli_train_args(corpus, out, "--resume", str(tmp_path / "no" / "step_0000010"))
    elif case == "out is a file":
        args = cli_train_args(corpus, tmp_path / "a-file")
    else:
        args = cli_train_args(corpus, out, "--lr", "1e6", "--set", "ckpt_every=5")
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = " ".join(result.stdout.split())  # rich wraps long lines
    assert message.count("error: ") == 1 and expected[case] in message.split("error: ")[1], message
    assert (tmp_path / "a-file").read_text() == "not a folder"
    if case != "divergence":
        assert not out.exists()  # refused before any work
