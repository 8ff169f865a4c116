"""`train --init-from`: continued training (healing) of a saved HF model or a layerwise run, with the data
tokenized by the model's own tokenizer, exact resume, and the refusals (vocabulary, model settings, another
init model behind a resume)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import HF_SMALL
from layerwise.cli import app
from layerwise.data.build import build_from_documents
from layerwise.data.corpus import shakespeare_text
from layerwise.errors import UserError
from layerwise.train.checkpoint import list_checkpoints
from layerwise.train.config import TrainConfig
from layerwise.train.trainer import train


def save_llama(folder: Path, tokenizer_file: Path, seed: int = 0, **overrides) -> Path:
    """A random 4-layer width-32 HF Llama saved with the corpus's BPE as its tokenizer."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**HF_SMALL, "vocab_size": 512, **overrides})
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file)).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _one_thread():
    """Width-32 matmuls gain nothing from a second thread, and on a loaded machine lose 20x to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_dir(corpus, tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "model", corpus / "tokenizer.json")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """200 kB of the embedded text as a plain file (faster to tokenize than all of it)."""
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text(shakespeare_text()[:200_000])
    return path


def heal(init_from, out, **overrides) -> TrainConfig:
    base = dict(init_from=str(init_from), out=str(out), max_tokens=16 * 8 * 32, batch_size=8, seq_len=32,
                lr=3e-3, warmup=2, eval_every=8, eval_batches=2, telemetry_every=8, ckpt_every=8, log_every=1,
                tensorboard=False)
    return TrainConfig(**{**base, **overrides})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


def test_an_hf_llama_heals_on_the_embedded_text_tokenized_with_its_own_tokenizer(llama_dir, corpus, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default corpus is cached under ~/.cache
    result = train(heal(llama_dir, tmp_path / "run"))
    run = tmp_path / "run"
    vals = losses(run, "val_loss")
    assert sorted(vals) == [0, 8, 16] and vals[16] < vals[8] < vals[0] - 0.25, vals
    assert result["steps"] == 16
    # The embedded text through the model's tokenizer is the corpus fixture's tokens (the same BPE).
    cached = next((tmp_path / "home" / ".cache" / "layerwise").glob("shakespeare-tokenizer-*"))
    assert (cached / "train.bin").read_bytes() == (corpus / "train.bin").read_bytes()
    assert json.loads((run / "tokenizer.json").read_text())["model"] == json.loads(
        (corpus / "tokenizer.json").read_text())["model"]
    # An HF model has no hook points: per-layer gradient norms only.
    telemetry = [r["telemetry"] for r in records(run) if "telemetry" in r]
    assert len(telemetry) == 2 and set(telemetry[-1]) == {"grad_norm_layers"}
    assert len(telemetry[-1]["grad_norm_layers"]) == 4 and all(g > 0 for g in telemetry[-1]["grad_norm_layers"])
    # Where it started: the path and the sha256 of the config and weights it loaded.
    record = json.loads((run / "init_from.json").read_text())
    assert record["path"] == str(llama_dir.resolve())
    assert set(record["sha256"]) == {"config.json", "model.safetensors"}
    # The checkpoint is the HF model itself, trained: it reloads with its own class and changed weights.
    last = list_checkpoints(run)[-1]
    healed = transformers.AutoModelForCausalLM.from_pretrained(last)
    assert type(healed) is transformers.LlamaForCausalLM
    before = load_file(llama_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(healed.model.layers[0].mlp.up_proj.weight, before)


def test_the_step_0_loss_is_the_loaded_models_loss_on_the_validation_windows(llama_dir, text_file, tmp_path):
    """Nothing is re-initialised: the run's first evaluation scores the saved model as it is."""
    train(heal(llama_dir, tmp_path / "run", data=str(text_file), max_tokens=8 * 32, eval_every=100))
    from layerwise.data.build import open_token_data

    data = open_token_data(text_file, tokenizer_path=llama_dir / "tokenizer.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    windows = torch.from_numpy(data.val[: 2 * 8 * 32 + 1].astype("int64"))
    x = torch.stack([windows[i * 32: i * 32 + 32] for i in range(16)])
    y = torch.stack([windows[i * 32 + 1: i * 32 + 33] for i in range(16)])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert losses(tmp_path / "run", "val_loss")[0] == pytest.approx(expected, rel=1e-6)


def test_an_interrupted_hf_run_resumed_equals_the_uninterrupted_one_bit_for_bit(llama_dir, text_file, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(heal(llama_dir, reference, data=str(text_file)))
    train(heal(llama_dir, resumed, data=str(text_file)))
    shutil.rmtree(list_checkpoints(resumed)[-1])  # killed after the step-8 checkpoint
    train(heal(llama_dir, resumed, data=str(text_file), resume="auto"))
    assert losses(resumed, "train_loss") == losses(reference, "train_loss")
    assert len(losses(reference, "train_loss")) == 16
    final = [load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (reference, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_a_tied_head_survives_the_checkpoint_round_trip(corpus, text_file, tmp_path):
    """save_pretrained writes GPT-2's tied head once (as transformer.wte); the resume must tie it back under
    the family's own names."""
    torch.manual_seed(0)
    tied = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tied)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json")).save_pretrained(tied)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(heal(tied, reference, data=str(text_file)))
    train(heal(tied, resumed, data=str(text_file)))
    shutil.rmtree(list_checkpoints(resumed)[-1])
    train(heal(tied, resumed, data=str(text_file), resume="auto"))
    assert losses(resumed, "train_loss") == losses(reference, "train_loss")
    healed = transformers.AutoModelForCausalLM.from_pretrained(list_checkpoints(resumed)[-1])
    assert healed.lm_head.weight is healed.transformer.wte.weight
    telemetry = [r["telemetry"] for r in records(resumed) if "telemetry" in r][-1]
    assert len(telemetry["grad_norm_layers"]) == 2  # GPT-2's layers found by its adapter


def test_a_layerwise_run_folder_continues_from_its_last_checkpoint(corpus, tmp_path):
    source = tmp_path / "source"
    common = dict(data=str(corpus), max_tokens=8 * 8 * 32, batch_size=8, seq_len=32, lr=3e-3, warmup=2,
                  eval_every=100, eval_batches=2, telemetry_every=8, ckpt_every=8, log_every=1, tensorboard=False)
    train(TrainConfig(model=dict(preset="pre-ln", size="tiny", n_layers=2), out=str(source), **common))
    healed = tmp_path / "healed"
    train(TrainConfig(init_from=str(source), out=str(healed), **common))
    # The same windows scored by the same weights: the new run starts where the old one ended.
    assert losses(healed, "val_loss")[0] == losses(source, "val_loss")[8]
    vals = losses(healed, "val_loss")
    assert vals[8] < vals[0]
    # A layerwise model keeps its full depth telemetry.
    telemetry = [r["telemetry"] for r in records(healed) if "telemetry" in r][-1]
    assert len(telemetry["hidden_rms"]) == 3 and len(telemetry["grad_norm_layers"]) == 2
    assert json.loads((healed / "init_from.json").read_text())["loaded_from"] == str(
        list_checkpoints(source)[-1].resolve())


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_both_sizes(corpus, tmp_path):
    small = save_llama(tmp_path / "small", corpus / "tokenizer.json", vocab_size=128)
    with pytest.raises(UserError, match="tokenizer has 512 tokens but its embedding has 128 rows"):
        train(heal(small, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_data_tokenized_with_another_tokenizer_is_refused_naming_both_sizes(llama_dir, tmp_path):
    other = build_from_documents({"text": [("a", shakespeare_text()[:20_000])]}, tmp_path / "other", vocab_size=300)
    with pytest.raises(UserError, match=r"vocabulary of 300 tokens but the init_from model's tokenizer has 512"):
        train(heal(llama_dir, tmp_path / "run", data=str(other)))


def test_model_settings_cannot_be_combined_with_init_from(llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"TrainConfig.model=\{'preset': 'lns'\} cannot be combined with init_from"):
        TrainConfig(init_from=str(llama_dir), model={"preset": "lns"})
    runner = CliRunner()
    for extra in (["--preset", "lns"], ["--size", "124m"], ["--set", "model.n_layers=2"]):
        result = runner.invoke(app, ["train", "--init-from", str(llama_dir), "--out", str(tmp_path / "run"), *extra])
        assert isinstance(result.exception, UserError), result.output
        assert "TrainConfig.model=" in str(result.exception) and "cannot be combined with init_from" in str(
            result.exception)
    assert not (tmp_path / "run").exists()


def test_a_resume_refuses_another_model_at_the_init_path(corpus, text_file, tmp_path):
    model = save_llama(tmp_path / "model", corpus / "tokenizer.json")
    run = tmp_path / "run"
    train(heal(model, run, data=str(text_file), max_tokens=8 * 8 * 32, ckpt_every=4))
    shutil.rmtree(list_checkpoints(run)[-1])
    save_llama(model, corpus / "tokenizer.json", seed=1)  # other weights, same path
    with pytest.raises(UserError, match="init_from: .* in the checkpoint, .* now"):
        train(heal(model, run, data=str(text_file), max_tokens=8 * 8 * 32, ckpt_every=4, resume="auto"))


def test_lora_needs_init_from():
    with pytest.raises(UserError, match="TrainConfig.lora_rank=4 needs init_from"):
        TrainConfig(lora_rank=4)


def test_lora_heals_only_the_linears_and_saves_them_merged_and_resumes_bit_for_bit(llama_dir, text_file, tmp_path):
    pytest.importorskip("peft")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(heal(llama_dir, reference, data=str(text_file), lora_rank=4, lr=1e-2))
    vals = losses(reference, "val_loss")
    assert vals[16] < vals[0], vals
    base = load_file(llama_dir / "model.safetensors")
    saved = load_file(list_checkpoints(reference)[-1] / "model.safetensors")
    assert saved.keys() == base.keys()  # a plain Llama: the adapters are merged in, no peft names
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    linears = {k for k in base if k.endswith("proj.weight")}
    assert changed == linears  # embeddings, norms and the head stay as loaded
    healed = transformers.AutoModelForCausalLM.from_pretrained(list_checkpoints(reference)[-1])
    assert type(healed) is transformers.LlamaForCausalLM

    train(heal(llama_dir, resumed, data=str(text_file), lora_rank=4, lr=1e-2))
    shutil.rmtree(list_checkpoints(resumed)[-1])
    train(heal(llama_dir, resumed, data=str(text_file), lora_rank=4, lr=1e-2, resume="auto"))
    assert losses(resumed, "train_loss") == losses(reference, "train_loss")
    final = [load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (reference, resumed)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_the_cli_heals_and_its_dry_run_shows_the_loaded_model(llama_dir, text_file, tmp_path):
    runner = CliRunner()
    dry = runner.invoke(app, ["train", "--init-from", str(llama_dir), "--dry-run"])
    assert dry.exit_code == 0, dry.output + repr(dry.exception)
    assert "model_type: llama" in dry.output and "init_from:" in dry.output
    result = runner.invoke(app, ["train", "--init-from", str(llama_dir), "--data", str(text_file), "--out",
                                 str(tmp_path / "run"), "--max-tokens", "512", "--batch-size", "8", "--seq-len", "32",
                                 "--set", "eval_batches=1", "--set", "tensorboard=false"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert [r["step"] for r in records(tmp_path / "run") if "val_loss" in r] == [0, 2]


def test_compare_refuses_an_init_model_in_one_line(tmp_path):
    from layerwise.compare import compare
    from layerwise.errors import UserError
    from layerwise.train.config import TrainConfig

    base = TrainConfig(init_from=str(tmp_path / "model"), out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="compare trains presets from scratch"):
        compare(["pre-ln"], [0], base, tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
