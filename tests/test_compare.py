"""`layerwise compare`: identical budgets, a table and plots."""

import json

import pytest

from layerwise.compare import compare
from layerwise.train.config import TrainConfig


def test_compare_trains_each_preset_on_identical_batches_and_writes_table_and_plots(corpus, tmp_path):
    base = TrainConfig(model={"size": "tiny"}, data=str(corpus), max_tokens=10 * 8 * 64, batch_size=8, seq_len=64,
                       lr=3e-3, eval_every=5, eval_batches=2, telemetry_every=5, ckpt_every=10, tensorboard=False)
    report = compare(["pre-ln", "lns"], [0, 1], base, tmp_path / "cmp")
    out = tmp_path / "cmp"
    for name in ("comparison.md", "comparison.json", "loss_curves.png", "depth_profile.png"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert {r["preset"] for r in rows} == {"pre-ln", "lns"} and all(r["seeds"] == 2 for r in rows)
    assert rows[0]["final_val_loss"] <= rows[1]["final_val_loss"]
    assert all(r["final_val_loss_std"] > 0 for r in rows)  # two seeds differ
    assert "| pre-ln |" in report["table"] and "| lns |" in report["table"]
    assert (out / "pre-ln-seed1" / "metrics.jsonl").exists()
    again = compare(["pre-ln", "lns"], [0, 1], base, tmp_path / "cmp")  # finished runs are reused, not retrained
    assert again["rows"] == report["rows"]


def _summaries(losses):
    return [dict(final_val_loss=x, best_val_loss=x, tokens_per_s=1.0, tokens=100) for x in losses]


def test_each_row_says_how_far_it_is_from_the_first_preset_and_whether_that_exceeds_the_seed_spread():
    from layerwise.report.comparison import aggregate, markdown_table

    runs = {"base": _summaries([3.0, 3.1, 3.2]),      # mean 3.1, std 0.1
            "close": _summaries([3.05, 3.15, 3.25]),  # 0.05 worse: inside 0.1 + 0.1
            "far": _summaries([2.7, 2.8, 2.9])}       # 0.3 better: beyond 0.1 + 0.1
    rows = {r["preset"]: r for r in aggregate(runs, {k: 1 for k in runs})}
    assert rows["far"]["delta_vs_baseline"] == pytest.approx(-0.3)
    assert rows["close"]["delta_vs_baseline"] == pytest.approx(0.05)
    assert (rows["base"]["beyond_seed_spread"], rows["close"]["beyond_seed_spread"],
            rows["far"]["beyond_seed_spread"]) == (None, False, True)
    table = markdown_table(list(rows.values()))
    assert "vs base" in table.splitlines()[0]
    assert "| far | 0.00M | 2.8000 ± 0.1000 | -0.3000 ± 0.0000 | yes |" in table  # every seed 0.3 better
    assert "| close | 0.00M | 3.1500 ± 0.1000 | +0.0500 ± 0.0000 | no |" in table
    shuffled = aggregate({"base": _summaries([3.0, 3.1, 3.2]), "other": _summaries([3.2, 3.1, 3.0])},
                         {"base": 1, "other": 1})
    # Per-seed differences +0.2, 0, -0.2: the same means, but paired by seed they spread.
    assert {r["preset"]: r["paired_delta_std"] for r in shuffled}["other"] == pytest.approx(0.2)
    one_seed = aggregate({"base": _summaries([3.0]), "far": _summaries([2.0])}, {"base": 1, "far": 1})
    assert [r["beyond_seed_spread"] for r in one_seed] == [None, None]  # no spread to exceed


def test_every_preset_a_script_or_the_readme_compares_is_registered():
    """A renamed preset must not leave a recorded comparison command that no longer runs."""
    import re
    from pathlib import Path

    from layerwise.presets import PRESETS

    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text() for p in sorted((root / "scripts").glob("*.sh"))] + [(root / "README.md").read_text()]
    named = {name for text in texts for group in re.findall(r"--presets[ =\\\n]+([\w,.-]+)", text)
             for name in group.split(",") if name}
    assert "prepbn" in named and "satformer-softmax-sigmoid" in named  # the pattern reads the scripts' lists
    assert named - set(PRESETS) == set()
