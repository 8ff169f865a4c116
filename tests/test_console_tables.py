"""The console tables of compare, diagnose and eval fit an 80-column terminal with every header, name and
value whole (none truncated to "...", none wrapped); the Markdown files keep the full tables."""

from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from layerwise.diagnose.cli import SUMMARY_COLUMNS, summary_table
from layerwise.evaluate.cli import _table as eval_table
from layerwise.evaluate.result import EvalResult
from layerwise.report.comparison import console_table, markdown_table


def rendered(table) -> list[str]:
    console = Console(width=80, record=True, color_system=None)
    console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not any("…" in line for line in lines), "\n".join(lines)
    return lines


def cells(lines: list[str]) -> list[list[str]]:
    """Each line's words, split on the table's rules and runs of spaces (a wrapped cell would split too)."""
    return [[word for part in line.replace("│", "┃").split("┃") for word in part.split("  ") if word.strip()]
            for line in lines]


def row_with(lines: list[str], first: str) -> list[str]:
    (row,) = [[word.strip() for word in words] for words in cells(lines) if words and words[0].strip() == first]
    return row


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_compare_table_fits_80_columns_with_the_longest_preset_and_every_figure_whole(seeds):
    rows = [dict(preset=name, seeds=seeds, params=123_456_789, final_val_loss=10.1234, final_val_loss_std=0.0123,
                 best_val_loss=10.0123, val_ppl=1.7e13, tokens=2_000_000_000, tokens_per_s=1_234_567.0)
            for name in ("delta-block-attnres", "block-attnres", "pre-ln")]
    lines = rendered(console_table(rows))
    spread = "±0.0123" if seeds > 1 else ""
    for name in ("delta-block-attnres", "block-attnres", "pre-ln"):
        assert row_with(lines, name) == [name, "123.46M", f"10.1234{spread}", "10.0123", "1.7e+13", "1,234,567"]
    assert row_with(lines, "preset") == ["preset", "params", "final", "best", "ppl", "tok/s"]
    assert "2,000,000,000" in lines[0]
    assert "| delta-block-attnres | 123.46M |" in markdown_table(rows)  # the file's table keeps every column


def test_the_diagnose_table_fits_80_columns_and_its_legend_names_each_metric_once():
    n = 30
    metrics = {name: torch.full((n,), -12.3456) for name in SUMMARY_COLUMNS.values()}
    metrics["loss"] = torch.tensor([3.0])
    result = SimpleNamespace(family="llama", n_layers=n, tokens=16384, metrics=lambda: metrics)
    lines = rendered(summary_table(result, removal=True))
    headers = row_with(lines, "layer")
    assert headers == ["layer", *SUMMARY_COLUMNS] and len(set(headers)) == len(headers)
    assert row_with(lines, "29") == ["29", *["-12.3456"] * len(SUMMARY_COLUMNS)]
    legend = " ".join(" ".join(lines).split())
    for header, name in SUMMARY_COLUMNS.items():
        assert f"{header} = {name}" in legend
    assert "skip Δloss" not in " ".join(rendered(summary_table(result, removal=False)))


def test_the_eval_table_fits_80_columns_with_long_task_names_and_an_untrained_models_perplexity():
    results = {
        "arc_challenge": EvalResult("arc_challenge", {"acc": 0.25, "acc_norm": 0.2612}, 1172,
                                    {"acc": 0.0126, "acc_norm": 0.0128},
                                    {"acc": (0.226, 0.276), "acc_norm": (0.237, 0.287)}),
        "lambada": EvalResult("lambada", {"acc": 0.296, "perplexity": 1.234e13}, 5153, {"acc": 0.0064},
                              {"acc": (0.284, 0.309), "perplexity": (1.1e13, 1.4e13)}),
        "perplexity": EvalResult("perplexity", {"perplexity": 55.0788}, 50, {},
                                 {"perplexity": (53.412, 56.804)}),
    }
    lines = rendered(eval_table(results, "/a/rather/long/path/to/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    rows = [[word.strip() for word in row] for row in cells(lines) if len(row) >= 4]
    assert rows == [["task", "metric", "value", "± stderr", "95% CI", "n"],  # an empty stderr leaves no word
                    ["arc_challenge", "acc", "0.2500", "0.0126", "0.226-0.276", "1172"],
                    ["arc_challenge", "acc_norm", "0.2612", "0.0128", "0.237-0.287", "1172"],
                    ["lambada", "acc", "0.2960", "0.0064", "0.284-0.309", "5153"],
                    ["lambada", "perplexity", "1.234e+13", "1.1e+13-1.4e+13", "5153"],
                    ["perplexity", "perplexity", "55.0788", "53.412-56.804", "50"]]
