"""The results table of scripts/smollm2_reshape_study.sh, in markdown, from the files the study wrote.

    python scripts/reshape_table.py runs/smollm2-reshape

One row per model: the layers removed (original 0-based indices), the strategy's calibration loss, and every
eval score found under OUT/eval/<tasks>-<limit>/<model>/eval.json (with the items scored and 95% intervals).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rows(out: Path) -> list[dict]:
    passes = sorted(p for p in (out / "eval").iterdir() if p.is_dir())
    names = sorted({m.name for p in passes for m in p.iterdir() if (m / "eval.json").is_file()},
                   key=lambda n: (n != "full", n.split("-")[0],
                                  [int(t) if t.isdigit() else t for t in n.split("-")[1:]]))
    depth = (_read(out / "models" / "full" / "config.json") or {}).get("num_hidden_layers", 0)
    table = []
    for name in names:
        row = {"model": name}
        folder = out / "models" / name
        if name.endswith("-healed"):  # a run folder: its newest checkpoint is the healed model
            folder = max((out / f"heal-{name.removesuffix('-healed')}" / "checkpoints").glob("*/"), default=folder)
        config = _read(folder / "config.json") or {}
        plan = _read(folder / "prune_plan.json")
        origin = config.get("layer_origin")
        row["layers"] = config.get("num_hidden_layers", "")
        if origin is not None and len(set(origin)) < depth:
            row["removed"] = ",".join(str(i) for i in range(depth) if i not in set(origin))
        if plan is not None:
            row["calibration loss"] = f"{plan['full_loss']:.3f} -> {plan['pruned_loss']:.3f}"
        elif re.fullmatch(r"greedy-\d+", name):  # a prefix of the largest greedy plan: its round n measured it
            n, larger = int(name.split("-")[1]), sorted((out / "models").glob("greedy-*/prune_plan.json"))
            for other in map(_read, larger):
                if other and other["n_remove"] >= n:
                    best = min(c["value"] for c in other["rounds"][n - 1]["candidates"])
                    row["calibration loss"] = f"{other['full_loss']:.3f} -> {best:.3f}"
        for p in passes:
            result = _read(p / name / "eval.json")
            if result is None:
                continue
            row["seconds " + p.name] = result.get("seconds")
            for task, scores in result["tasks"].items():
                metrics, ci = scores["metrics"], scores.get("ci95", {})
                for metric in ("acc", "acc_norm", "perplexity"):
                    if metric in metrics and not (task == "hellaswag" and metric == "acc"):
                        low_high = ci.get(metric)
                        interval = f" ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else ""
                        row[f"{task} {metric} (n={scores['n']})"] = (f"{metrics[metric]:.1f}" if metric == "perplexity"
                                                                   else f"{metrics[metric]:.3f}{interval}")
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    columns = ["model", "layers", "removed", "calibration loss"]
    columns += sorted({k for row in table for k in row if k not in columns and not k.startswith("seconds")})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-reshape"))))
