"""The SmolLM2-135M per-layer quantization study of docs/results.md, on CPU.

    .venv/bin/python scripts/quantization_study.py [--model runs/smollm2-quant/full] [--out runs/smollm2-quant]

For each target average width (--bits) and each layer order (--orders, plus random with --seeds), the layers
get the widths `layerwise quantize --avg-bits B --widths W --order O` gives them (the same planner,
`layerwise.diagnose.quantization`, on the same calibration text: the start of the embedded Shakespeare), and
the model is scored on the first --limit LAMBADA items and --windows held-out windows of 512 tokens.

The study runs in one process and quantizes every layer at every width once: HQQ quantizes each linear on its
own, so a plan's model is assembled from those layers and equals what `layerwise quantize` writes for it
(tests/test_quantize.py pins that assembly equals the step). Quantizing SmolLM2 takes minutes on 2 cores;
once per width instead of once per plan is what makes 30 plans fit in an hour.

Writes OUT/importance.json, OUT/results.jsonl (one line per scored plan, resumable: a plan already scored
is skipped) and OUT/table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


from layerwise.arch.quantized import disk_bits, quantize_layers, quantized_modules, stored_layers
from layerwise.diagnose import depth_view
from layerwise.diagnose.metrics import spearman, token_batches
from layerwise.diagnose.quantization import BitPlan, allocate_bits, layer_importance, layer_linear_weights
from layerwise.evaluate.suite import evaluate
from layerwise.loading import load_model, load_tokens, smollm2_gguf

GROUP = 64  # the CLI's default --group


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SmolLM2 folder (default: OUT/full, made from the GGUF)")
    p.add_argument("--out", default="runs/smollm2-quant")
    p.add_argument("--bits", default="8,6,5,4,3.5,3,2.5")
    p.add_argument("--widths", default="2,3,4,8")
    p.add_argument("--orders", default="lim,zd,removal")
    p.add_argument("--seeds", default="0,1,2", help="random order seeds")
    p.add_argument("--limit", type=int, default=200, help="LAMBADA items")
    p.add_argument("--windows", type=int, default=20, help="held-out windows of 512 tokens")
    p.add_argument("--cal-tokens", type=int, default=4096, help="calibration tokens (windows of 512, 2 per batch)")
    p.add_argument("--ppl-data", default=None, help="held-out token shard in the model's tokens "
                   "(default: OUT/data/val.bin from `layerwise data build --sources large --tokenizer MODEL`)")
    return p.parse_args()


def prepare(args, out: Path) -> tuple[Path, Path]:
    import subprocess
    import sys

    lw = [sys.executable, "-m", "layerwise.cli"]
    model = Path(args.model) if args.model else out / "full"
    if not (model / "config.json").is_file():
        subprocess.run([*lw, "transform", str(smollm2_gguf()), "--out", str(model)], check=True)
    data = Path(args.ppl_data) if args.ppl_data else out / "data" / "val.bin"
    if not data.is_file():
        subprocess.run([*lw, "data", "build", "--sources", "large", "--tokenizer", str(model),
                        "--out", str(data.parent)], check=True)
    return model, data


def importances(model, tokenizer, orders: list[str], seeds: list[int], cal_tokens: int, path: Path) -> dict:
    known = json.loads(path.read_text()) if path.is_file() else {}
    view = depth_view(model)
    batches = list(token_batches(load_tokens(None, tokenizer, cal_tokens), 512, 2, cal_tokens))
    wanted = [(o, 0) for o in orders] + [("random", s) for s in seeds]
    for order, seed in wanted:
        key = order if order != "random" else f"random-s{seed}"
        if key not in known:
            print(f"{stamp()} importance: {key}", flush=True)
            known[key] = layer_importance(model, view, batches, order, seed)
            path.write_text(json.dumps(known, indent=1))
    return {key: known[key] for key in (o if o != "random" else f"random-s{s}" for o, s in wanted)}


def plans(importance: dict, params: list[int], targets: list[float], widths: list[int]) -> list[dict]:
    """Every (target, order) with its bits; a target that is a width is one uniform plan."""
    n = len(params)
    rows = []
    for target in targets:
        if target in widths:
            rows.append({"name": f"uniform-{target:g}", "target": target, "order": "uniform",
                         "bits": [int(target)] * n})
            continue
        for key, values in importance.items():
            bits = allocate_bits(values, params, target, widths)
            rows.append({"name": f"{key}-{target:g}", "target": target, "order": key.split("-s")[0]
                         if key.startswith("random") else key, "bits": bits})
    for row in rows:
        plan = BitPlan(row["order"], row["target"], widths, [0.0] * n, params, row["bits"])
        row["step"] = plan.step()
        row["avg_bits"] = plan.avg_bits
        row["low_layers"] = row["bits"].count(min(row["bits"])) if len(set(row["bits"])) > 1 else 0
    return rows


class LayerBank:
    """Each stored layer's linears quantized at each width, once."""

    def __init__(self, model):
        self.model, self.by_width = model, {}

    def linears(self, width: int) -> list[dict]:
        """Per stored layer, {name inside the layer: HQQ module} at `width`."""
        if width not in self.by_width:
            print(f"{stamp()} quantizing every layer at {width} bits", flush=True)
            quantized = quantize_layers(copy.deepcopy(self.model), [width] * len(stored_layers(self.model)), GROUP)
            self.by_width[width] = [quantized_modules(layer) for layer in stored_layers(quantized)]
        return self.by_width[width]

    def assemble(self, bits: list[int]):
        model = copy.deepcopy(self.model)
        for i, (layer, width) in enumerate(zip(stored_layers(model), bits)):
            for name, module in self.linears(width)[i].items():
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, module)
        return model


def score(model, tokenizer, data: Path, limit: int, windows: int) -> dict:
    lambada = evaluate(model, tokenizer, ["lambada"], limit=limit)["lambada"]
    heldout = evaluate(model, tokenizer, ["perplexity"], limit=windows, data=data, seq_len=512)["perplexity"]
    return {"lambada_acc": lambada.metrics["acc"], "lambada_ppl": lambada.metrics["perplexity"],
            "lambada_n": lambada.n, "heldout_ppl": heldout.metrics["token_perplexity"], "heldout_n": heldout.n}


def table(rows: list[dict], float_row: dict, orders: list[str], importance: dict) -> str:
    columns = [*orders, "random"]
    out = [f"Float: LAMBADA acc {float_row['lambada_acc']:.3f}, LAMBADA ppl {float_row['lambada_ppl']:.1f}, "
           f"held-out ppl {float_row['heldout_ppl']:.2f} (n = {float_row['lambada_n']} items, "
           f"{float_row['heldout_n']} windows).", ""]
    if "lim" in importance and "zd" in importance:
        zd = [-v for v in importance["zd"]]  # the zd importance is -ZD
        rho = spearman(torch.tensor(importance["lim"]), torch.tensor(importance["zd"]))
        out += [f"ZD across layers {min(zd):.3f}-{max(zd):.3f}; Spearman(LIM, ZD importance) = {rho:.2f}.", ""]
    for title, key, fmt in (("LAMBADA accuracy", "lambada_acc", "{:.3f}"), ("LAMBADA perplexity", "lambada_ppl",
                            "{:.1f}"), ("held-out token perplexity", "heldout_ppl", "{:.2f}")):
        out += [f"#### {title}", "", "| avg bits | layers at the lower width | bits on disk | "
                + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
        for target in sorted({r["target"] for r in rows}, reverse=True):
            at = [r for r in rows if r["target"] == target]
            cells = []
            for order in columns:
                values = [r[key] for r in at if r["order"] in (order, "uniform")]
                if not values:
                    cells.append("")
                elif len(values) == 1:
                    cells.append(fmt.format(values[0]))
                else:
                    cells.append(f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}")
            low = sorted({r["low_layers"] for r in at})
            disk = statistics.mean(r["disk_bits_layers"] for r in at)
            out.append(f"| {target:g} | {'/'.join(map(str, low))} of {len(at[0]['bits'])} | {disk:.2f} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = prepare(args, out)
    model, tokenizer = load_model(model_dir)
    model.eval()
    orders = args.orders.split(",")
    widths = [int(w) for w in args.widths.split(",")]
    targets = [float(b) for b in args.bits.split(",")]
    importance = importances(model, tokenizer, orders, [int(s) for s in args.seeds.split(",")],
                             args.cal_tokens, out / "importance.json")
    params = layer_linear_weights(model)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.is_file():
        done = {r["name"]: r for r in map(json.loads, results_path.read_text().splitlines())}
    if "float" not in done:
        print(f"{stamp()} scoring the float model", flush=True)
        done["float"] = {"name": "float", **score(model, tokenizer, data, args.limit, args.windows)}
        with results_path.open("a") as f:
            f.write(json.dumps(done["float"]) + "\n")
    bank = LayerBank(model)
    scored_by_bits = {tuple(r["bits"]): r for r in done.values() if "bits" in r}
    rows = []
    for plan in plans(importance, params, targets, widths):
        twin = scored_by_bits.get(tuple(plan["bits"]))
        if twin is None:
            print(f"{stamp()} {plan['name']}: {plan['step']}", flush=True)
            quantized = bank.assemble(plan["bits"])
            result = {**plan, "disk_bits_layers": disk_bits(quantized)[0],
                      **score(quantized, tokenizer, data, args.limit, args.windows)}
            del quantized
            with results_path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            scored_by_bits[tuple(plan["bits"])] = twin = result
            print(f"{stamp()}   lambada {result['lambada_acc']:.3f} (ppl {result['lambada_ppl']:.1f}), "
                  f"held-out ppl {result['heldout_ppl']:.2f}", flush=True)
        rows.append({**twin, **{k: plan[k] for k in ("name", "target", "order")}})
    (out / "table.md").write_text(table(rows, done["float"], orders, importance))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
