"""`layerwise report`: a self-contained HTML page and report.json from a diagnosis."""

import json
import re

import pytest
import torch
import typer
from conftest import tiny_model
from typer.testing import CliRunner

from layerwise.diagnose import diagnose
from layerwise.report.cli import report_command
from layerwise.report.diagnosis import LAYER_MEASURES, SPAN_MEASURES, write_report

IMG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def tiny_diagnosis() -> dict:
    model = tiny_model()
    return diagnose(model, [torch.randint(0, model.config.vocab_size, (2, 32))], n_span=2).to_json()


def synthetic(L: int = 8, n: int = 3) -> dict:
    """A diagnosis where layer 3 is clearly the cheapest to remove and layers 4..6 barely turn the stream."""
    removal = [0.9, 0.5, 0.3, 0.01, 0.05, 0.08, 0.06, 2.0]
    angular = [0.40, 0.30, 0.25, 0.10, 0.05, 0.06, 0.04, 0.50]
    skip = [[None if l <= s else 0.1 * (l - s) for l in range(L)] for s in range(L)]
    return {"family": "synthetic", "model": "toy/model", "n_layers": L, "n_span": n, "tokens": 4096,
            "metrics": {"removal_delta_loss": removal, "angular_distance": angular,
                        "block_influence": [a / 2 for a in angular], "hidden_rms": [1.0 + i for i in range(L + 1)],
                        "span_removal_delta_loss": [1.0, 0.8, 0.6, 0.2, 0.15, 2.5][: L - n + 1],
                        "span_angular_distance_last": [0.5, 0.4, 0.3, 0.2, 0.1, 0.6][: L - n + 1],
                        "loss": [3.0], "skip_effect": skip, "attention_entropy": [1.0] * L,
                        "brand_new_metric": [float(i) for i in range(L)], "odd_shape": [1.0, 2.0]},
            "rank_correlation": {"angular_distance": 0.81, "block_influence": 0.79}}


def charted(diagnosis: dict) -> int:
    """Metrics that deserve a chart: every list except single numbers and unplaceable shapes."""
    return sum(1 for k, v in diagnosis["metrics"].items() if len(v) > 1 and k != "odd_shape")


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    assert "href=" not in lowered
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert len(re.findall(r"\ssrc=", page)) == page.count(IMG)


def assert_rankings_sorted(rankings: dict) -> None:
    for name, ranked in rankings.items():
        values = [r["value"] for r in ranked]
        assert values == sorted(values), name


def test_report_of_a_real_tiny_model_diagnosis_is_self_contained_and_charts_every_metric(tmp_path, tiny_diagnosis):
    (tmp_path / "diagnosis.json").write_text(json.dumps(tiny_diagnosis))
    page_path = write_report(tmp_path, tmp_path)            # the folder form of `source`
    assert page_path == tmp_path / "report.html"
    page = page_path.read_text()
    assert page.count(IMG) == charted(tiny_diagnosis)
    assert_self_contained(page)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["rankings"]) == set(LAYER_MEASURES) | set(SPAN_MEASURES)
    assert_rankings_sorted(report["rankings"])
    assert sorted(r["layer"] for r in report["rankings"]["removal_delta_loss"]) == list(range(4))
    assert report["rankings"]["span_removal_delta_loss"][0]["span"].count("..") == 1
    assert report["summary"] and report["key_numbers"]["loss"] == pytest.approx(tiny_diagnosis["metrics"]["loss"][0])


def test_synthetic_diagnosis_names_layer_3_cheapest_and_the_low_angular_run(tmp_path):
    diagnosis = synthetic()
    (tmp_path / "eval.json").write_text(json.dumps({"model": "m.gguf", "tasks": {  # as `layerwise eval` writes it
        "lambada": {"metrics": {"acc": 0.41, "ppl": 22.5}, "n": 500}}}))
    page = write_report(diagnosis, tmp_path).read_text()   # a dict: eval.json is looked up in out_dir
    report = json.loads((tmp_path / "report.json").read_text())
    summary = " ".join(report["summary"])

    assert report["rankings"]["removal_delta_loss"][0] == {"layer": 3, "value": 0.01}
    assert "cheapest single layer to remove is 3 (+0.01" in summary
    assert "cost less than 0.1 nats/token" in summary and report["key_numbers"]["cheap_layers"] == [3, 4, 5, 6]
    assert "Layers 3..6 each change" in summary     # angular <= median 0.175, the longest contiguous run
    assert "cheapest 3-layer span to remove is 4..6" in summary and "0-based, inclusive" in summary
    assert report["rankings"]["span_angular_distance_last"][0]["span"] == "4..6"
    assert "grows from 1 at the embedding (h_0) to 9" in summary and "x9" in summary
    assert "angular_distance +0.81" in summary and "strongly" in summary
    assert_rankings_sorted(report["rankings"])

    assert page.count(IMG) == charted(diagnosis)   # includes the skip_effect heatmap and unknown 1-D metrics
    assert "skip_effect" in report["charts"] and "brand_new_metric" in report["charts"]
    assert report["not_shown"] == ["odd_shape"]
    assert "lambada" in page and "22.5" in page and report["eval"]["lambada"]["n"] == 500
    assert_self_contained(page)


def test_missing_optional_metrics_and_nulls_do_not_crash(tmp_path):
    diagnosis = {"family": "bare", "n_layers": 3, "metrics": {"angular_distance": [0.2, None, 0.1]}}
    page = write_report(diagnosis, tmp_path).read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    assert page.count(IMG) == 1 and report["n_span"] is None
    assert report["rankings"] == {"angular_distance": [{"layer": 2, "value": 0.1}, {"layer": 0, "value": 0.2}]}
    assert report["summary"][0].startswith("bare with 3 layers")

    with pytest.raises(ValueError, match="n_layers"):
        write_report({"metrics": {}}, tmp_path)
    with pytest.raises(FileNotFoundError, match="diagnosis.json"):
        write_report(tmp_path / "nowhere", tmp_path)


def test_cli_writes_the_report_beside_the_diagnosis_and_says_where(tmp_path):
    app = typer.Typer()
    app.command()(report_command)
    (tmp_path / "diagnosis.json").write_text(json.dumps(synthetic()))
    runner = CliRunner()

    result = runner.invoke(app, [str(tmp_path / "diagnosis.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").exists() and "report.html" in result.output
    assert "cheapest single layer to remove is 3" in result.output

    result = runner.invoke(app, [str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "report.json").exists()

    assert runner.invoke(app, [str(tmp_path / "missing")]).exit_code != 0
    assert "Example:" in runner.invoke(app, ["--help"]).output


HOSTILE = '<img src=x onerror="alert(1)">'


def hostile_keys(value, tag: str):
    """`value` with every string, dict key included, replaced by a distinct hostile string."""
    if isinstance(value, str):
        return f"{HOSTILE}{tag}"
    if isinstance(value, dict):
        return {f"{HOSTILE}{tag}.{i}": hostile_keys(v, f"{tag}.{i}") for i, v in enumerate(value.values())}
    if isinstance(value, list):
        return [hostile_keys(v, f"{tag}.{i}") for i, v in enumerate(value)]
    return value


def test_hostile_strings_in_diagnosis_and_eval_json_reach_the_page_only_escaped(tmp_path):
    diagnosis = synthetic()
    diagnosis = {**diagnosis, "family": HOSTILE + "family", "model": HOSTILE + "model", "apply": [HOSTILE + "step"],
                 # Metric and correlation names are strings too; their values stay numbers so they are charted.
                 "metrics": {HOSTILE + name: values for name, values in diagnosis["metrics"].items()},
                 "rank_correlation": {HOSTILE + name: rho for name, rho in diagnosis["rank_correlation"].items()}}
    evals = {"model": HOSTILE + "eval-model",
             "tasks": {HOSTILE + "task": {"metrics": {HOSTILE + "metric": 0.5, "acc": HOSTILE + "value"},
                                          "n": HOSTILE + "n", "stderr": {}, "ci95": {}}}}
    (tmp_path / "diagnosis.json").write_text(json.dumps(diagnosis))
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    page = write_report(tmp_path / "diagnosis.json").read_text()
    assert "<img src=x" not in page and "onerror=\"" not in page
    assert page.count("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;family") >= 2  # title line and summary
    for shown in ("model", "step", "task", "metric", "value", "n"):
        assert f"&lt;img src=x onerror=&quot;alert(1)&quot;&gt;{shown}" in page, shown
    assert page.count("<img") == page.count(IMG) > 0  # the only tags are the charts

    # Anything else a hand-made file carries (every string and key, nested) is escaped as well.
    anything = {field: hostile_keys(value, field) for field, value in synthetic().items()}
    assert "<img src=x" not in write_report(anything, tmp_path).read_text()
