"""The results tables of scripts/quantization_study.sh, in markdown, from the files the study wrote.

    python scripts/quantization_table.py runs/smollm2-quant

One table per score (LAMBADA accuracy, LAMBADA perplexity, held-out token perplexity), a row per target
average width (the float model first), a column per layer order; random is the mean +- sample standard
deviation over its seeds (n = the seeds found). A target that is itself a width has one plan for every order
(all layers at it). `low` is how many layers took the lower width, from the lim plan's quant_plan.json; `MiB`
is that plan's quantized.safetensors.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

ORDERS = ("lim", "zd", "zd-inverse", "removal", "random")
SCORES = (  # (title, eval pass folder prefix, task, metric, format)
    ("LAMBADA accuracy", "lambada-", "lambada", "acc", "{:.3f}"),
    ("LAMBADA perplexity", "lambada-", "lambada", "perplexity", "{:.1f}"),
    ("held-out token perplexity", "perplexity-", "perplexity", "token_perplexity", "{:.2f}"),
)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def plans(out: Path) -> list[dict]:
    with open(out / "plans.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def score(out: Path, name: str, prefix: str, task: str, metric: str) -> tuple[float, int] | None:
    """The metric of `name`'s eval in the first pass folder OUT/eval/PREFIX* that holds one, with its n."""
    for folder in sorted((out / "eval").glob(f"{prefix}*")):
        result = _read(folder / name / "eval.json")
        if result is not None and task in result["tasks"]:
            scores = result["tasks"][task]
            return scores["metrics"][metric], scores["n"]
    return None


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))} (n={len(values)})"


def layout(out: Path, plan: dict) -> tuple[str, str]:
    """(layers at the lower width / layers, MiB on disk) of one plan's model folder."""
    folder = out / "models" / plan["name"]
    data = _read(folder / "quant_plan.json")
    low = ""
    if data is not None:
        bits = [layer["bits"] for layer in data["layers"]]
        low = f"{bits.count(min(bits)) if len(set(bits)) > 1 else 0}/{len(bits)}"
    elif plan["order"] == "uniform":
        low = "0"
    weights = next((w for w in (folder / "quantized.safetensors", folder / "model.safetensors") if w.is_file()),
                   folder / "quantized.safetensors")
    return low, f"{weights.stat().st_size / 2**20:.1f}" if weights.is_file() else ""


def tables(out: Path) -> str:
    rows = plans(out)
    targets = sorted({float(r["target"]) for r in rows}, reverse=True)
    sections = []
    for title, prefix, task, metric, fmt in SCORES:
        ns: set[int] = set()
        lines = [f"### {title}", "", "| avg bits | low | MiB | " + " | ".join(ORDERS) + " |",
                 "|" + "---|" * (3 + len(ORDERS))]
        for target in targets:
            at = [r for r in rows if float(r["target"]) == target]
            uniform = [r for r in at if r["order"] in ("uniform", "float")]
            cells = []
            for order in ORDERS:
                values = []
                for plan in uniform or [r for r in at if r["order"] == order]:
                    found = score(out, plan["scored_as"], prefix, task, metric)
                    if found is not None:
                        values.append(found[0])
                        ns.add(found[1])
                cells.append(cell(values[:1] if uniform else values, fmt))
            reference = uniform[0] if uniform else next((r for r in at if r["order"] == "lim"), at[0])
            low, mib = layout(out, reference)
            label = "float" if reference["order"] == "float" else f"{target:g}"
            lines.append(f"| {label} | {low} | {mib} | " + " | ".join(cells) + " |")
        unit = "windows of 512 tokens" if task == "perplexity" else "items"
        lines[1:1] = ["", f"n = {', '.join(map(str, sorted(ns))) or '?'} {unit}"]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


if __name__ == "__main__":
    print(tables(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-quant")))
