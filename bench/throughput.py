"""Training throughput of layerwise presets next to a minimal nanoGPT-style GPT-2, measured in one run.

    python bench/throughput.py --size 124m --out docs/throughput.json          # the H100 table
    python bench/throughput.py --size tiny --batch 4 --seq 128 --steps 5       # CPU smoke run
    python bench/throughput.py --size tiny --d-model 384 --layers 6 --heads 6 --vocab 8192 --batch 8 --seq 256 \
        --attnres-blocks 3 --presets pre-rmsnorm,block-attnres,attnres --modes eager,compiled --attnres-kernel reference,fast \
        --repeats 3 --threads 1 --warmup 2 --steps 4                           # issue 12's CPU AttnRes table

Each model runs forward + backward + AdamW (fused on CUDA) on random tokens: bf16 autocast and
torch.compile on CUDA, float32 eager on CPU (`--modes` picks eager and/or compiled). Tokens/s are timed over
`--steps` after `--warmup` steps, with CUDA synchronisation around the timed region; ratios are against the
nanoGPT-style reference and against `--baseline` (a preset), all measured in the same process. With
`--repeats` > 1 every model stays built and the timed rounds alternate between them, so a noisy machine
slows all alike; the fastest round counts. MFU = tokens/s x (6 N + 12 L d T) / peak, nanoGPT's estimate.

AttnRes presets run once per `--attnres-kernel` path (`layerwise.kernels.attnres`: "fast" or the forced
"reference"), so before and after sit in one table.

Training memory: on CUDA, the allocator's peak. On CPU (no allocator statistics), the bytes of the tensors
autograd saves for backward in one eager training step, deduplicated by storage (a view of a saved tensor costs
nothing more) and without the parameters, plus 4 x the parameter bytes (weights, gradients, AdamW's two
moments). It is exact and reproducible, where peak RSS would depend on the allocator and the other processes.
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
from layerwise.kernels import attnres as attnres_kernel
from layerwise.nn.residual import RESIDUALS
from layerwise.presets import preset_fields
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


def saved_for_backward_bytes(model, loss_of) -> int:
    """Bytes autograd keeps for backward in one eager step, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


class Run:
    """One model in one mode with its optimizer and batch, ready for timed rounds."""

    def __init__(self, name, model, cfg, args, device, compiled: bool, kernel_path: str = "fast"):
        self.name, self.cfg, self.args, self.device, self.compiled = name, cfg, args, device, compiled
        self.kernel_path = kernel_path
        self.model = model.to(device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if compiled else self.model
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
        self.inputs, self.targets = x[:, :-1], x[:, 1:]
        self.seconds: list[float] = []
        self.train_bytes = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            self.step()
        if device.type == "cuda":
            self.train_bytes = torch.cuda.max_memory_allocated()
        elif not compiled:
            param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            with attnres_kernel.use(kernel_path):
                saved = saved_for_backward_bytes(self.model, self.loss)
            self.train_bytes = saved + 4 * param_bytes

    def loss(self, forward):
        with self.autocast:
            out = forward(self.inputs)
            logits = out if torch.is_tensor(out) else out.logits
            return F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten())

    def step(self):
        with attnres_kernel.use(self.kernel_path):
            self.loss(self.forward).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_round(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.args.steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - t0)

    def row(self) -> dict:
        seconds = min(self.seconds)
        tokens_per_s = self.args.batch * self.args.seq * self.args.steps / seconds
        peak = peak_flops(self.device)
        flops = 6 * self.n_params + 12 * self.cfg.n_layers * self.cfg.d_model * self.args.seq
        return {"model": self.name, "mode": "compiled" if self.compiled else "eager", "params_m": self.n_params / 1e6,
                "tokens_per_s": tokens_per_s, "ms_per_step": 1000 * seconds / self.args.steps,
                "mfu": tokens_per_s * flops / peak if peak else None,
                "train_mem_gib": self.train_bytes / 2**30 if self.train_bytes else None}


def measure(name, model, cfg, args, device, compiled=False, kernel_path="fast") -> dict:
    run = Run(name, model, cfg, args, device, compiled, kernel_path)
    run.timed_round()
    return run.row()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def shape_overrides(args) -> dict:
    named = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "vocab_size": args.vocab}
    return {k: v for k, v in named.items() if v is not None}


def blocks_override(preset: str, args) -> dict:
    """{"attnres_blocks": N} for a preset whose residual scheme reads it, when --attnres-blocks is given."""
    residual = RESIDUALS.get(preset_fields(preset, args.size).get("residual", "standard"))
    return {"attnres_blocks": args.attnres_blocks} if args.attnres_blocks and \
        "attnres_blocks" in residual.config_fields else {}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--size", default="124m")
    parser.add_argument("--d-model", type=int, help="override the size's width (and the reference's)")
    parser.add_argument("--layers", type=int, help="override the size's layer count")
    parser.add_argument("--heads", type=int, help="override the size's head count")
    parser.add_argument("--attnres-blocks", type=int, help="override N for the block AttnRes presets")
    parser.add_argument("--vocab", type=int, help="override the size's vocabulary")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per model, alternating between models")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--baseline", default="pre-rmsnorm", help="preset the 'vs baseline' column divides by")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--modes", help="eager, compiled or both (eager,compiled); default: --compile's")
    parser.add_argument("--attnres-kernel", default="fast",
                        help="AttnRes kernel paths to measure, e.g. reference,fast (layerwise.kernels.attnres)")
    parser.add_argument("--no-nanogpt", action="store_true", help="skip the nanoGPT-style reference")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.compile is None:
        args.compile = device.type == "cuda"
    modes = [m.strip() for m in (args.modes or ("compiled" if args.compile else "eager")).split(",")]
    kernel_paths = [k.strip() for k in args.attnres_kernel.split(",")]
    for path in kernel_paths:
        attnres_kernel._checked(path, "--attnres-kernel")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    overrides = shape_overrides(args)
    shape = ModelConfig.from_preset("pre-ln", args.size, max_seq_len=args.seq, **overrides)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    rows = []
    for mode in modes:
        compiled = mode == "compiled"
        builders = []
        if not args.no_nanogpt:
            builders.append(("nanoGPT-style reference", "fast", lambda: (
                ReferenceGPT(shape.vocab_size, shape.d_model, shape.n_layers, shape.n_heads, args.seq), shape)))
        for preset in presets:
            cfg = ModelConfig.from_preset(preset, args.size, max_seq_len=max(args.seq, 256), **overrides,
                                          **blocks_override(preset, args))
            routed = "attnres" in cfg.residual
            for path in kernel_paths if routed else ["fast"]:
                label = f"{preset} [{path}]" if routed and len(kernel_paths) > 1 else preset
                builders.append((label, path, lambda cfg=cfg: (LayerwiseForCausalLM(cfg), cfg)))
        runs, mode_rows = [], []
        for label, path, build in builders:
            try:
                model, cfg = build()
                run = Run(label, model, cfg, args, device, compiled, path)
                if args.repeats == 1:
                    run.timed_round()
                    mode_rows.append(run.row())
                    # One line per model as it finishes, so a run stopped by a time limit leaves what it measured.
                    print(f"{label} ({mode}): {mode_rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
                    del run, model
                    free(device)
                else:
                    runs.append(run)
                    mode_rows.append(run)
            except (torch.OutOfMemoryError, RuntimeError) as err:  # report and go on to the next model
                mode_rows.append({"model": label, "mode": mode,
                                  "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
                free(device)
        for _ in range(args.repeats if runs else 0):
            for run in runs:
                run.timed_round()
        rows += [r.row() if isinstance(r, Run) else r for r in mode_rows]
        del runs, mode_rows
        free(device)
    for mode in modes:
        ok = [r for r in rows if r["mode"] == mode and "tokens_per_s" in r]
        ref = next((r for r in ok if r["model"] == "nanoGPT-style reference"), None)
        base = next((r for r in ok if r["model"] == args.baseline), None)
        for row in ok:
            row["ratio"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
            row["vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
            if base and row["train_mem_gib"] and base["train_mem_gib"]:
                row["mem_vs_baseline"] = row["train_mem_gib"] / base["train_mem_gib"]

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    d, n_layers, heads, vocab = shape.d_model, shape.n_layers, shape.n_heads, shape.vocab_size
    header = (f"device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; size {args.size} "
              f"(d={d}, {n_layers} layers, {heads} heads, vocab {vocab}), batch {args.batch} x {args.seq}, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, best of {args.repeats} rounds of "
              f"{args.steps} steps\n"
              f"command: python bench/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    memory = "peak GiB" if device.type == "cuda" else "train GiB (saved + 4x params)"
    lines = [header, "", f"| model | mode | params | tokens/s | vs reference | vs {args.baseline} | ms/step | MFU | "
             f"{memory} | memory vs {args.baseline} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {r['params_m']:.1f}M | {r['tokens_per_s']:,.0f} | "
                     f"{fmt(r['ratio'], '.3f')} | {fmt(r['vs_baseline'], '.3f')} | {r['ms_per_step']:.1f} | "
                     f"{fmt(r['mfu'], '.1%')} | {fmt(r['train_mem_gib'], '.3f')} | "
                     f"{fmt(r.get('mem_vs_baseline'), '.3f')} |")
    print("\n".join(lines))
    result = {"header": header, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
