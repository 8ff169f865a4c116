"""Inference cost of AttnRes next to a standard residual: prefill time and per-token decode time with the KV cache.

    python bench/inference.py --d-model 384 --layers 6 --heads 6 --vocab 8192 --attnres-blocks 3 --batch 8 --prompt 256 \\
        --new-tokens 32 --presets pre-rmsnorm,block-attnres,attnres --attnres-kernel reference,fast,auto --threads 1

Every model is built first; then each timed round runs, model after model, one prefill of `--prompt` tokens and
`--new-tokens` greedy decode steps (T = 1, reading the KV cache), so a noisy machine slows all alike; the
fastest of `--repeats` rounds counts. Float32 eager on CPU, bf16 autocast on CUDA. Ratios are to `--baseline`.
AttnRes presets run once per `--attnres-kernel` path (`layerwise.kernels.attnres`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.kernels import attnres as attnres_kernel

sys.path.insert(0, str(Path(__file__).parent))
from throughput import blocks_override  # noqa: E402  (one rule for --attnres-blocks)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_round(model, ids, new_tokens, kernel_path, device) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with attnres_kernel.use(kernel_path), autocast:
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new_tokens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="pre-rmsnorm,block-attnres,attnres")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--attnres-blocks", type=int, help="override N for the block AttnRes presets")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--baseline", default="pre-rmsnorm")
    parser.add_argument("--attnres-kernel", default="reference,fast,auto")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                                   "vocab_size": args.vocab}.items() if v is not None}
    paths = [attnres_kernel._checked(p.strip(), "--attnres-kernel") for p in args.attnres_kernel.split(",")]
    torch.manual_seed(0)
    runs = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        cfg = ModelConfig.from_preset(preset, args.size, max_seq_len=args.prompt + args.new_tokens + 1, **overrides,
                                      **blocks_override(preset, args))
        model = LayerwiseForCausalLM(cfg).to(device).eval()
        routed = "attnres" in cfg.residual
        for path in paths if routed else ["fast"]:
            label = f"{preset} [{path}]" if routed and len(paths) > 1 else preset
            runs.append({"model": label, "net": model, "path": path, "prefill": [], "decode": []})
    ids = torch.randint(0, runs[0]["net"].config.vocab_size, (args.batch, args.prompt), device=device)
    for run in runs:  # warm-up round, untimed
        timed_round(run["net"], ids, 2, run["path"], device)
    for _ in range(args.repeats):
        for run in runs:
            prefill, decode = timed_round(run["net"], ids, args.new_tokens, run["path"], device)
            run["prefill"].append(prefill)
            run["decode"].append(decode)
    rows = [{"model": r["model"], "prefill_ms": 1000 * min(r["prefill"]), "decode_ms": 1000 * min(r["decode"])}
            for r in runs]
    base = next((r for r in rows if r["model"] == args.baseline), None)
    for row in rows:
        row["prefill_vs_baseline"] = row["prefill_ms"] / base["prefill_ms"] if base else None
        row["decode_vs_baseline"] = row["decode_ms"] / base["decode_ms"] if base else None
    cfg0 = runs[0]["net"].config
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; d={cfg0.d_model}, "
             f"{cfg0.n_layers} layers, vocab {cfg0.vocab_size}; batch {args.batch}, prompt {args.prompt}, "
             f"{args.new_tokens} new tokens; best of {args.repeats}",
             f"command: python bench/inference.py {' '.join(argv if argv is not None else sys.argv[1:])}", "",
             f"| model | prefill ms | vs {args.baseline} | decode ms/token | vs {args.baseline} |",
             "|---|---:|---:|---:|---:|"]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['model']} | {r['prefill_ms']:.1f} | {fmt(r['prefill_vs_baseline'])} | "
                     f"{r['decode_ms']:.2f} | {fmt(r['decode_vs_baseline'])} |")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()
