"""The full `layerwise train` step (data loading, clipping, logging included) next to the bare model step.

    python bench/trainer.py --size 124m --preset pre-ln --batch 32 --seq 1024 --steps 60    # GPU
    python bench/trainer.py --size tiny --batch 8 --seq 128 --steps 20                      # CPU smoke run

Data: `--data` (any layerwise data path), or by default an llm.c-format shard of random GPT-2 ids
written to a temporary folder, so the memory-mapped read path is exercised without shipping a corpus.
Reports trainer tokens/s, bare-model tokens/s (bench/throughput.py's measurement, same process), their
ratio, and the share of wall time the trainer spends assembling batches (target: <= 2%).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from layerwise import LayerwiseForCausalLM
from layerwise.data.build import open_token_data
from layerwise.data.shards import write_llmc_shard
from layerwise.train.config import TrainConfig
from layerwise.train.trainer import build_model_config, train


def _throughput_module():
    spec = importlib.util.spec_from_file_location("throughput", Path(__file__).with_name("throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pre-ln")
    parser.add_argument("--size", default="124m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            rng = np.random.default_rng(0)
            n_train = max(1_000_000, 4 * args.steps * args.batch * args.seq)  # sampled windows rarely repeat
            for split, n in (("train", n_train), ("val", 100_000)):
                write_llmc_shard(Path(tmp) / f"random_{split}_000.bin", rng.integers(0, 50257, n))
            data = tmp
        log_every = 10
        cfg = TrainConfig(model=dict(preset=args.preset, size=args.size), data=data, out=str(Path(tmp) / "run"),
                          max_tokens=args.steps * args.batch * args.seq, batch_size=args.batch, seq_len=args.seq,
                          log_every=log_every, eval_every=10**9, eval_batches=1, telemetry_every=10**9,
                          ckpt_every=10**9, compile=cuda, tensorboard=False, warmup=0)
        train(cfg)
        model_cfg = build_model_config(cfg, open_token_data(data).vocab_size)  # exactly the trained model
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds compilation
    trainer_tps = statistics.median(r["tokens_per_s"] for r in timed)
    data_fraction = statistics.median(r["data_fraction"] for r in timed)

    throughput = _throughput_module()
    bare_args = argparse.Namespace(batch=args.batch, seq=args.seq, warmup=10 if cuda else 2,
                                   steps=30 if cuda else 5, compile=cuda)
    device = torch.device("cuda" if cuda else "cpu")
    bare = throughput.measure(args.preset, LayerwiseForCausalLM(model_cfg), model_cfg, bare_args, device)
    result = {"preset": args.preset, "size": args.size, "batch": args.batch, "seq": args.seq,
              "trainer_tokens_per_s": trainer_tps, "bare_tokens_per_s": bare["tokens_per_s"],
              "trainer_vs_bare": trainer_tps / bare["tokens_per_s"], "data_fraction": data_fraction,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "command": "python bench/trainer.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
