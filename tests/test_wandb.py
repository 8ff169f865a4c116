"""The optional Weights & Biases logger: off by default, offline without network inside the run folder, the
same scalars as metrics.jsonl, and a one-line error naming the extra when wandb is missing."""

import json
import struct
import sys
import time

import pytest

from layerwise.errors import UserError
from layerwise.runs import read_metrics
from layerwise.train.config import TrainConfig
from layerwise.train.metrics import scalars
from layerwise.train.trainer import train


def small(corpus, out, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(model=dict(preset="pre-ln", size="tiny", n_layers=2), data=str(corpus),
                                 out=str(out), max_tokens=4 * 4 * 32, batch_size=4, seq_len=32, warmup=1,
                                 eval_every=2, eval_batches=1, telemetry_every=2, ckpt_every=4, log_every=1,
                                 tensorboard=False), **overrides})


def wandb_history(path, timeout: float = 60.0) -> list[dict]:
    """The history rows of an offline run file (run-ID.wandb), once its writer (wandb-core, its own process,
    which may still be flushing after `finish()` returns) has written the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        rows, finished = _wandb_records(path)
        if finished or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(path) -> tuple[list[dict], bool]:
    """A 7-byte header (":W&B", magic, version), then protobuf `Record`s in LevelDB log framing (32 KiB blocks;
    each chunk a 7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, finished = path.read_bytes(), False
    assert data[:4] == b":W&B"
    rows, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero-filled tail
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            kind_of_record = record.WhichOneof("record_type")
            finished |= kind_of_record == "exit"
            if kind_of_record == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, finished


def test_wandb_is_off_by_default_and_a_mode_it_lacks_is_refused():
    assert TrainConfig().wandb == "off"
    with pytest.raises(UserError, match=r"TrainConfig.wandb='yes' is not one of off, offline, online"):
        TrainConfig(wandb="yes")


def test_an_offline_run_logs_the_metrics_jsonl_scalars_into_the_run_folder(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    train(small(corpus, run, wandb="offline"))
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stem == f"run-{(run / 'wandb_id').read_text()}"
    logged: dict[int, dict] = {}
    for row in wandb_history(run_file):
        logged.setdefault(row["_step"], {}).update(row)
    expected: dict[int, dict] = {}
    for record in read_metrics(run):
        expected.setdefault(record["step"], {}).update(scalars(record))
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, values in expected.items():
        assert {k: logged[step][k] for k in values} == pytest.approx(values, rel=1e-12), step
    assert "val_loss" in logged[4] and "telemetry/grad_norm_layers/01" in logged[4]


def test_a_missing_wandb_package_is_named_as_the_extra_before_the_run_folder_is_made(corpus, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'layerwise\[wandb\]'"):
        train(small(corpus, tmp_path / "run", wandb="offline"))
    assert not (tmp_path / "run").exists()
