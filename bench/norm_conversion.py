"""Inference speed of a layerwise Pre-LN model before and after fold-norms, pre-rmsnorm and pre-crmsnorm.

    python bench/norm_conversion.py                                   # the docs/benchmarks.md table (CPU)
    python bench/norm_conversion.py --layers 2 --d-model 64 --steps 2 --no-compile    # smoke run

The four models compute the same function (each conversion is exact; the run checks the logits agree), so
the only difference is the work per token: LayerNorm with gain and bias, LayerNorm with unit gain and no bias
(fold-norms), RMSNorm (pre-rmsnorm), and CRMSNorm on a stream one coordinate narrower (pre-crmsnorm). Each
runs a no-grad forward on random tokens, eager and under torch.compile, in one process, the models taking
turns call by call; the time is the median over `--steps` after `--warmup` calls, and each ratio is the
original's time over the converted model's (above 1: faster) in the same mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import layerwise  # noqa: F401
from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.transform import apply

STEPS = ("fold-norms", "pre-rmsnorm", "pre-crmsnorm")


def build(args) -> LayerwiseForCausalLM:
    cfg = ModelConfig.from_preset("pre-ln", "tiny", n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                  vocab_size=args.vocab, max_seq_len=args.seq, head_dim=None, d_ff=None)
    torch.manual_seed(0)
    model = LayerwiseForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-looking norms: a fold of ones and zeros would prove nothing
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def median_ms(runs: dict, tokens, warmup: int, steps: int) -> dict[str, float]:
    """Median ms per forward of each model. The models take turns call by call, so load from other processes
    on a shared machine falls on all of them alike instead of on whichever ran during it."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for i in range(warmup + steps):
            for name, run in runs.items():
                start = time.perf_counter()
                run(tokens)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    original = build(args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    models = {"pre-ln (original)": original}
    models.update({step: apply(copy.deepcopy(original), [step]).eval() for step in STEPS})
    with torch.no_grad():
        reference = original(tokens).logits
        agreement = {name: ((m(tokens).logits - reference).abs().max() / reference.abs().max()).item()
                     for name, m in models.items()}

    modes = ["eager"] + (["compiled"] if args.compile else [])
    rows = []
    for mode in modes:
        runs = {name: torch.compile(m) if mode == "compiled" else m for name, m in models.items()}
        ms = median_ms(runs, tokens, args.warmup, args.steps)
        rows += [dict(model=name, mode=mode, ms=ms[name], speedup=ms["pre-ln (original)"] / ms[name],
                      max_rel_dlogit=agreement[name]) for name in models]

    shape = dict(layers=args.layers, d_model=args.d_model, heads=args.heads, vocab=args.vocab, batch=args.batch,
                 seq=args.seq, threads=args.threads, dtype="float32")
    result = dict(shape=shape, torch=torch.__version__, machine=platform.machine(), rows=rows)
    print(f"CPU, {shape}")
    print("| model | mode | ms/forward | speedup vs pre-ln | max rel. dlogit |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['mode']} | {row['ms']:.1f} | {row['speedup']:.3f} | "
              f"{row['max_rel_dlogit']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
