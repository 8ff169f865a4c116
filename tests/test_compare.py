"""`layerwise compare`: identical budgets, a table and plots."""

import json

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
