"""The bench/ scripts must keep running (CPU smoke configurations); their numbers live in docs/benchmarks.md."""

import importlib.util
import json
from pathlib import Path

import torch


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


def _bench(name):
    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_measures_both_attnres_kernels_with_shape_overrides_and_memory():
    result = _bench("throughput").main([
        "--size", "tiny", "--d-model", "64", "--layers", "2", "--heads", "2", "--vocab", "128", "--batch", "1",
        "--seq", "16", "--warmup", "1", "--steps", "1", "--repeats", "2", "--threads", "1", "--no-nanogpt",
        "--modes", "eager", "--presets", "pre-rmsnorm,block-attnres", "--attnres-kernel", "reference,fast"])
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == ["pre-rmsnorm", "block-attnres [reference]", "block-attnres [fast]"]
    assert rows["pre-rmsnorm"]["vs_baseline"] == 1.0 and rows["pre-rmsnorm"]["mem_vs_baseline"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["train_mem_gib"] > 0 for row in rows.values())
    assert "d=64, 2 layers" in result["header"]
    # The reference path saves a stacked copy of the sources per sublayer; the fast path saves references.
    assert rows["block-attnres [fast]"]["train_mem_gib"] < rows["block-attnres [reference]"]["train_mem_gib"]


def test_inference_benchmark_times_prefill_and_cached_decode_per_kernel():
    result = _bench("inference").main(["--d-model", "64", "--layers", "2", "--heads", "2", "--vocab", "128",
                                       "--batch", "1", "--prompt", "8", "--new-tokens", "2", "--repeats", "1",
                                       "--presets", "pre-rmsnorm,block-attnres", "--threads", "1"])
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == ["pre-rmsnorm", "block-attnres [reference]", "block-attnres [fast]", "block-attnres [auto]"]
    assert all(row["prefill_ms"] > 0 and row["decode_ms"] > 0 for row in rows.values())
    assert rows["pre-rmsnorm"]["decode_vs_baseline"] == 1.0


def test_attnres_kernel_benchmark_checks_ours_against_the_reference_and_names_the_cuda_packages():
    result = _bench("attnres_kernels").main(["--tokens", "32", "--d-model", "16", "--repeats", "1", "--no-compile",
                                             "--threads", "1"])
    rows = {row["kernel"]: row for row in result["rows"]}
    assert rows["ours"]["max_abs_diff"] < 1e-4 and rows["ours"]["train_ms"] > 0
    if not torch.cuda.is_available():
        assert len(result["notes"]) == 3 and all("need CUDA" in note for note in result["notes"])


def test_trainer_benchmark_reports_data_share_and_ratio_to_the_bare_step():
    path = Path(__file__).parents[1] / "bench" / "trainer.py"
    spec = importlib.util.spec_from_file_location("trainer_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--size", "tiny", "--batch", "4", "--seq", "64", "--steps", "30"])
    assert result["trainer_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0
    assert 0 <= result["data_fraction"] < 0.5 and result["trainer_vs_bare"] > 0


def test_diagnose_benchmark_measures_ours_and_naive_and_they_agree_on_removal(tmp_path):
    path = Path(__file__).parents[1] / "bench" / "diagnose.py"
    spec = importlib.util.spec_from_file_location("diagnose_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # In-process for speed; the CPU default (one subprocess per measurement) is the same `measure` per row.
    module.main(["--model", "tiny-random", "--tokens", "512", "--seq-len", "64", "--batch-size", "2",
                 "--n-span", "2", "--naive-removal-layers", "3", "--threads", "1", "--no-subprocess",
                 "--json", str(tmp_path / "d.json")])
    result = json.loads((tmp_path / "d.json").read_text())
    rows = result["measurements"]
    assert {row["method"] for row in rows.values()} == {"ours", "ours+removal", "naive-hidden-states", "naive-removal",
                                                        "before", "before+removal"}
    assert all(r["max_abs_diff"] < 1e-6 for r in result["before_after"])  # the frozen version agrees
    assert all(row["seconds"] > 0 for row in rows.values())
    ours, naive = rows["full"]["values"], rows["naive_b"]["values"]
    assert len(naive["layers"]) == 3 and result["naive_removal_extrapolated"]
    for s, delta in zip(naive["layers"], naive["removal_delta_loss"]):  # a skipped layer changes the loss ...
        assert abs(delta) > 1e-4 and abs(ours["removal_delta_loss"][s] - delta) < 1e-5  # ... by the same amount
    assert result["agreement"]["span_removal_delta_loss"] < 1e-5
    assert result["agreement"]["angular_distance_layers_0_to_L-2"] < 1e-5


def test_norm_conversion_benchmark_times_every_conversion_and_checks_they_agree():
    path = Path(__file__).parents[1] / "bench" / "norm_conversion.py"
    spec = importlib.util.spec_from_file_location("norm_conversion_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--layers", "2", "--d-model", "64", "--heads", "4", "--vocab", "256", "--batch", "1",
                          "--seq", "16", "--warmup", "1", "--steps", "2", "--threads", "1", "--no-compile"])
    rows = result["rows"]
    assert [row["model"] for row in rows] == ["pre-ln (original)", "fold-norms", "pre-rmsnorm", "pre-crmsnorm"]
    assert all(row["ms"] > 0 and row["max_rel_dlogit"] < 1e-4 for row in rows) and rows[0]["speedup"] == 1.0


def test_layer_program_cache_benchmark_shows_the_shared_slot_bug_and_its_fix():
    path = Path(__file__).parents[1] / "bench" / "layer_program_cache.py"
    spec = importlib.util.spec_from_file_location("layer_program_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--model", "tiny-random", "--new-tokens", "4"])
    assert rows["naive"] > 1e-2  # one cache slot for two occurrences: cached decoding reads the wrong keys
    assert max(rows["tied"], rows["materialised"], rows["original"]) < 1e-5
