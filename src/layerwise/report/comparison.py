"""Comparison report for runs trained under one budget: Markdown + JSON table and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, list[dict]], params: dict[str, int]) -> list[dict]:
    """One row per variant: mean and std over seeds, sorted by final validation loss; each with its difference
    from the baseline, the first variant in `runs` (`beyond_seed_spread`: see `beyond_seed_spread`)."""
    rows = []
    for name, summaries in runs.items():
        final_mean, final_std = _mean_std([s["final_val_loss"] for s in summaries])
        best_mean, _ = _mean_std([s["best_val_loss"] for s in summaries])
        speeds = [s["tokens_per_s"] for s in summaries if s["tokens_per_s"]]
        rows.append({"preset": name, "seeds": len(summaries), "params": params[name],
                     "final_val_loss": final_mean, "final_val_loss_std": final_std, "best_val_loss": best_mean,
                     "val_ppl": math.exp(min(final_mean, 700.0)), "tokens": summaries[0]["tokens"],  # no overflow
                     "tokens_per_s": statistics.fmean(speeds) if speeds else None})
    base = rows[0] if rows else None
    for r in rows:
        r["baseline"] = base["preset"]
        r["delta_vs_baseline"] = r["final_val_loss"] - base["final_val_loss"]
        r["beyond_seed_spread"] = beyond_seed_spread(r, base)
        # Runs of one seed see the same batches whatever the preset, so the per-seed differences are paired.
        paired = [s["final_val_loss"] - b["final_val_loss"] for s, b in zip(runs[r["preset"]], runs[base["preset"]])]
        r["paired_delta_std"] = _mean_std(paired)[1] if len(paired) == r["seeds"] == base["seeds"] else None
    return sorted(rows, key=lambda r: r["final_val_loss"])


def beyond_seed_spread(row: dict, base: dict) -> bool | None:
    """Whether two variants' mean +/- std intervals of final validation loss are disjoint: the difference is
    larger than the two seed spreads together. None with one seed (no spread) or for the baseline itself."""
    if row is base or row["seeds"] < 2 or base["seeds"] < 2:
        return None
    return abs(row["final_val_loss"] - base["final_val_loss"]) > row["final_val_loss_std"] + base["final_val_loss_std"]


def _perplexity(value: float) -> str:
    """Two decimals, or four significant digits for a diverged run's (which can run to 1e13)."""
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.4g}"


def markdown_table(rows: list[dict]) -> str:
    base = rows[0].get("baseline", "") if rows else ""
    lines = [f"| preset | params | final val loss | vs {base} | beyond seed spread | best val loss | val ppl | tokens "
             "| tokens/s |",
             "|---|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for r in rows:
        spread = f" ± {r['final_val_loss_std']:.4f}" if r["seeds"] > 1 else ""
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        delta = "-" if r["preset"] == base or "delta_vs_baseline" not in r else f"{r['delta_vs_baseline']:+.4f}"
        if delta != "-" and r.get("paired_delta_std") is not None and r["seeds"] > 1:
            delta += f" ± {r['paired_delta_std']:.4f}"
        beyond = {True: "yes", False: "no", None: "-"}[r.get("beyond_seed_spread")]
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['final_val_loss']:.4f}{spread} | {delta} | "
                     f"{beyond} | {r['best_val_loss']:.4f} | {r['val_ppl']:.2f} | {r['tokens']:,} | {speed} |")
    return "\n".join(lines)


def console_table(rows: list[dict]):
    """`markdown_table`'s rows as a rich table for an 80-column terminal: the tokens, the same for every run
    under one budget, go to the title, and the headers are shortened (the legend under it says what they mean)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    tokens = sorted({r["tokens"] for r in rows})
    table = Table(title=f"tokens per run: {', '.join(f'{t:,}' for t in tokens)}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    for header in ("preset", "params", "final", "best", "ppl", "tok/s"):
        table.add_column(header, justify="left" if header == "preset" else "right", no_wrap=True)
    for r in rows:
        spread = f"±{r['final_val_loss_std']:.4f}" if r["seeds"] > 1 else ""
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        table.add_row(r["preset"], f"{r['params'] / 1e6:.2f}M", f"{r['final_val_loss']:.4f}{spread}",
                      f"{r['best_val_loss']:.4f}", _perplexity(r["val_ppl"]), speed)
    legend = Text("final, best: validation loss (final: mean ± std over seeds); ppl = exp(final); tok/s: "
                  "training throughput")
    return Group(table, legend)  # the legend as wide as the terminal, not the table


def plot_loss_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, summaries in runs.items():
        first = summaries[0]
        line = ax_val.plot(*zip(*first["val_curve"]), marker="o", ms=3, label=name)[0]
        tokens, losses = zip(*first["train_curve"])
        window = max(1, len(losses) // 50)
        smooth = [statistics.fmean(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
        ax_train.plot(tokens, smooth, color=line.get_color(), label=name)
    for ax, title in ((ax_train, "train loss (smoothed)"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Telemetry names before the shared vocabulary (layerwise.depth_metrics): runs written then still plot.
# Their hidden_rms was one RMS over all values (the routed input under AttnRes), close to but not the
# per-token mean of today's runs.
OLD_TELEMETRY_NAMES = {"attn_contribution": "attn_ratio", "mlp_contribution": "mlp_ratio"}


def telemetry_series(telemetry: dict | None, name: str) -> list[float] | None:
    """One per-layer telemetry series of a run, read under its old name where the run predates the rename."""
    if not telemetry:
        return None
    return telemetry.get(name, telemetry.get(OLD_TELEMETRY_NAMES.get(name, name)))


def plot_depth_profile(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("hidden_rms", "hidden-state RMS at layer boundary (L = final-norm input)", "boundary", True),
              ("grad_norm_layers", "gradient norm per layer", "layer", True),
              ("mlp_contribution", "MLP contribution ||m_l|| / ||input||", "layer", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for ax, (key, title, xlabel, log) in zip(axes, panels):
        for name, summaries in runs.items():
            series = telemetry_series(summaries[0]["telemetry"], key)
            if series:
                ax.plot(range(len(series)), series, marker="o", ms=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out: Path, runs: dict[str, list[dict]], params: dict[str, int], header: str = "") -> dict:
    rows = aggregate(runs, params)
    table = markdown_table(rows)
    legend = ("Final val loss: mean ± std over seeds. vs baseline: difference from the first preset listed, mean ± "
              "std over seeds of the per-seed differences (a seed's runs see the same batches); beyond seed spread: "
              "the two presets' mean ± std intervals are disjoint.")
    (out / "comparison.md").write_text(f"# Comparison\n\n{header}\n\n{table}\n\n{legend}\n\n"
                                       "![loss curves](loss_curves.png)\n\n![depth profile](depth_profile.png)\n")
    payload = {"rows": rows, "runs": {k: [{x: s[x] for x in ("run", "final_val_loss", "best_val_loss",
                                                             "tokens_per_s", "telemetry")} for s in v]
                                      for k, v in runs.items()}}
    (out / "comparison.json").write_text(json.dumps(payload, indent=1))
    plot_loss_curves(runs, out / "loss_curves.png")
    plot_depth_profile(runs, out / "depth_profile.png")
    return {"rows": rows, "table": table, "files": [out / n for n in ("comparison.md", "comparison.json",
                                                                         "loss_curves.png", "depth_profile.png")]}
