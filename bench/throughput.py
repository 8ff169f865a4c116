"""Training throughput of layerwise presets next to a minimal nanoGPT-style GPT-2, measured in one run.

    python bench/throughput.py --size 124m --out docs/throughput.json          # the H100 table
    python bench/throughput.py --size tiny --batch 4 --seq 128 --steps 5       # CPU smoke run

Each model runs forward + backward + AdamW (fused on CUDA) on random tokens: bf16 autocast and
torch.compile on CUDA, float32 eager on CPU. Tokens/s are timed over `--steps` after `--warmup` steps,
with CUDA synchronisation around the timed region; ratios are against the reference measured in the
same process. MFU = tokens/s x (6 N + 12 L d T) / peak, nanoGPT's estimate.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import layerwise  # noqa: F401
from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.train.trainer import peak_flops

DEFAULT_PRESETS = "pre-ln,pre-rmsnorm,lns,peri-ln,dyt,block-attnres,attnres,delta-attnres"


class ReferenceBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    """GPT-2 the nanoGPT way: learned positions, LayerNorm, fused qkv, GELU MLP, tied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(ReferenceBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def measure(name, model, cfg, args, device) -> dict:
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step():
        with autocast:
            out = forward(inputs)
            logits = out if torch.is_tensor(out) else out.logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    peak = peak_flops(device)
    flops = 6 * n_params + 12 * cfg.n_layers * cfg.d_model * args.seq
    return {"model": name, "params_m": n_params / 1e6, "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * seconds / args.steps, "mfu": tokens_per_s * flops / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--size", default="124m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile is None:
        args.compile = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)

    shape = ModelConfig.from_preset("pre-ln", args.size, max_seq_len=args.seq)
    rows = []
    reference = ReferenceGPT(shape.vocab_size, shape.d_model, shape.n_layers, shape.n_heads, args.seq)
    rows.append(measure("nanoGPT-style reference", reference, shape, args, device))
    del reference
    free(device)
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        cfg = ModelConfig.from_preset(preset, args.size, max_seq_len=max(args.seq, 256))
        try:
            rows.append(measure(preset, LayerwiseForCausalLM(cfg), cfg, args, device))
        except (torch.OutOfMemoryError, RuntimeError) as err:  # report and go on to the next model
            rows.append({"model": preset, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
        free(device)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        if "tokens_per_s" in row:
            row["ratio"] = row["tokens_per_s"] / base

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"device: {device_name}; torch {torch.__version__}; size {args.size}, batch {args.batch} x "
              f"{args.seq}, {'compiled' if args.compile else 'eager'}, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}\n"
              f"command: python bench/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    lines = [header, "", "| model | params | tokens/s | vs reference | ms/step | MFU | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | {r['error']} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        lines.append(f"| {r['model']} | {r['params_m']:.1f}M | {r['tokens_per_s']:,.0f} | {r['ratio']:.3f} | "
                     f"{r['ms_per_step']:.1f} | {mfu} | {mem} |")
    print("\n".join(lines))
    result = {"header": header, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
