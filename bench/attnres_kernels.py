"""The AttnRes depth mix, ours against the fused kernels that pip packages ship: time and max |diff| vs the reference.

    python bench/attnres_kernels.py                         # CUDA: bf16 sources, 32 x 1024 tokens, d = 768
    python bench/attnres_kernels.py --tokens 2048 --d-model 384 --no-compile    # CPU: ours only

One problem: N completed sources [B, T, d] and S mixers (pseudo-query w_l, key-norm gain gamma_l), each mixer's
output sum_i softmax_i(w_l . RMSNorm_l(v_i)) v_i, forward and forward + backward. The reference is
`layerwise.kernels.attnres.reference_*` in float32 (stacked, keys normalised per mixer); "ours" is the fast path
(`source_logits` once per source for all mixers, `depth_softmax`, `depth_mix`, `mixer_input`), under torch.compile
unless `--no-compile`. The packages, each only if importable and only on CUDA (they are Triton kernels):

- flash-attn-res (`flash_attn_res.phase_1_batched_attention_triton_op(blocks [N,B,T,d], queries [S,d], eps)`):
  the paper's phase 1, all S queries at once; its key norm has no gain, so it gets gamma_l * w_l.
- Liger-Kernel (`liger_kernel.ops.attn_res.LigerAttnResFunction.apply(stacked, w, gamma, eps)`): one mixer per
  call, so S calls.
- flash-linear-attention (`fla.ops.attnres.fused_attnres(w, sources, gamma, rms_eps=eps)`): one mixer per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from layerwise.kernels import attnres as kernel


def reference(sources, queries, gains, eps):
    stacked = torch.stack(sources)
    outs = []
    for w, g in zip(queries, gains):
        v = stacked.float()
        keys = g * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        outs.append(kernel.reference_mix(kernel.reference_weights(keys, w), v))
    return torch.stack(outs)


def ours(sources, queries, gains, eps):
    q = kernel.effective_queries(list(queries), list(gains))
    logits = torch.stack([kernel.source_logits(v, q, eps) for v in sources])  # [N, B, T, S]
    weights, _, _ = kernel.depth_softmax(logits)
    weights = weights.movedim(-1, 0)
    mixed = kernel.depth_mix(weights, sources)  # outside autograd; each mixer's input carries the gradients
    return torch.stack([kernel.mixer_input(mixed[s], weights[s], sources) for s in range(len(mixed))])


def flash_attn_res(sources, queries, gains, eps):
    from flash_attn_res import phase_1_batched_attention_triton_op

    out, _ = phase_1_batched_attention_triton_op(torch.stack(sources), gains * queries, eps)
    return out


def liger(sources, queries, gains, eps):
    from liger_kernel.ops.attn_res import LigerAttnResFunction

    stacked = torch.stack(sources)
    return torch.stack([LigerAttnResFunction.apply(stacked, w, g, eps) for w, g in zip(queries, gains)])


def fla(sources, queries, gains, eps):
    from fla.ops.attnres import fused_attnres

    return torch.stack([fused_attnres(w, list(sources), g, rms_eps=eps) for w, g in zip(queries, gains)])


PACKAGES = {"flash-attn-res": ("flash_attn_res", flash_attn_res), "liger-kernel": ("liger_kernel", liger),
            "flash-linear-attention": ("fla", fla)}


def timed(fn, args, backward: bool, repeats: int, device) -> float:
    def once():
        inputs = [a.detach().requires_grad_(backward) if torch.is_tensor(a) and a.is_floating_point() else a
                  for a in args[:3]]
        sources = [s.detach().requires_grad_(backward) for s in args[0]]
        out = fn(sources, inputs[1], inputs[2], args[3])
        if backward:
            out.float().pow(2).mean().backward()
        return out

    for _ in range(2):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / repeats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help="B x T, default 32768 on CUDA, 2048 on CPU")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--sources", type=int, default=4, help="completed blocks N")
    parser.add_argument("--mixers", type=int, default=4, help="mixers S read them (a block's sublayers)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="write the rows and notes here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (32768 if device.type == "cuda" else 2048)
    torch.manual_seed(0)
    eps = 1e-6
    sources = [torch.randn(1, tokens, args.d_model, device=device).mul(s).to(dtype)
               for s in torch.linspace(0.5, 3.0, args.sources).tolist()]
    queries = torch.randn(args.mixers, args.d_model, device=device, dtype=dtype) * 0.5
    gains = torch.rand(args.mixers, args.d_model, device=device, dtype=dtype) + 0.5
    problem = (sources, queries, gains, eps)
    expected = reference(*problem)

    candidates = {"reference (stack, normalise per mixer)": reference,
                  "ours" + (" (compiled)" if args.compile else ""): torch.compile(ours) if args.compile else ours}
    notes = []
    for name, (module, fn) in PACKAGES.items():
        if device.type != "cuda":
            notes.append(f"{name}: not run, its kernels need CUDA")
            continue
        try:
            __import__(module)
        except ImportError:
            notes.append(f"{name}: not installed (pip install {name})")
            continue
        candidates[name] = fn
    rows = []
    for name, fn in candidates.items():
        try:
            with torch.no_grad():
                diff = (fn(*problem).float() - expected.float()).abs().max().item()
            forward = timed(fn, problem, False, args.repeats, device)
            try:
                train = timed(fn, problem, True, args.repeats, device)
            except (RuntimeError, NotImplementedError) as err:  # a forward-only kernel
                train, notes = None, notes + [f"{name}: no backward ({type(err).__name__})"]
            rows.append({"kernel": name, "max_abs_diff": diff, "forward_ms": forward, "train_ms": train})
        except Exception as err:  # a package whose API changed: report it and go on
            notes.append(f"{name}: failed, {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    lines = [f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
             f"{dtype}; {tokens} tokens, d={args.d_model}, {args.sources} sources, {args.mixers} mixers",
             f"command: python bench/attnres_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}", "",
             "| kernel | max abs diff vs reference | forward ms | forward + backward ms |", "|---|---:|---:|---:|"]
    for r in rows:
        train = "-" if r["train_ms"] is None else f"{r['train_ms']:.2f}"
        lines.append(f"| {r['kernel']} | {r['max_abs_diff']:.2e} | {r['forward_ms']:.2f} | {train} |")
    lines += [""] + [f"- {note}" for note in notes]
    print("\n".join(lines))
    result = {"header": lines[:2], "rows": rows, "notes": notes}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
