"""bench/throughput.py must keep running (CPU smoke configuration); its numbers live in docs/benchmarks.md."""

import importlib.util
from pathlib import Path


def test_throughput_benchmark_runs_reference_and_presets_side_by_side(tmp_path):
    path = Path(__file__).parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--size", "tiny", "--batch", "2", "--seq", "64", "--warmup", "1", "--steps", "2",
                          "--presets", "pre-ln,block-attnres", "--out", str(tmp_path / "t.json")])
    names = [row["model"] for row in result["rows"]]
    assert names == ["nanoGPT-style reference", "pre-ln", "block-attnres"]
    assert all(row["tokens_per_s"] > 0 and row["ratio"] > 0 for row in result["rows"])
    assert result["rows"][0]["ratio"] == 1.0 and (tmp_path / "t.json").exists()


def test_trainer_benchmark_reports_data_share_and_ratio_to_the_bare_step():
    path = Path(__file__).parents[1] / "bench" / "trainer.py"
    spec = importlib.util.spec_from_file_location("trainer_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--size", "tiny", "--batch", "4", "--seq", "64", "--steps", "30"])
    assert result["trainer_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0
    assert 0 <= result["data_fraction"] < 0.5 and result["trainer_vs_bare"] > 0
