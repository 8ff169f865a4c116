"""The one model loader and the model/output writers: what they refuse, and that a refusal is one clean line.

Command-line cases run `python -m layerwise.cli` as a user would and expect exit 2 with no traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from layerwise.data.shards import write_shard
from layerwise.errors import UserError
from layerwise.loading import load_model
from layerwise.transform import drop_layers, save_pruned

VOCAB = 64


def tiny_llama(**config) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, **config)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    tiny_llama(tie_word_embeddings=False).save_pretrained(root / "llama")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    )).save_pretrained(root / "bert")
    transformers.T5Config(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8
                          ).save_pretrained(root / "t5")
    (root / "headless").mkdir()
    (root / "headless" / "config.json").write_text((root / "llama" / "config.json").read_text())
    weights = load_file(root / "llama" / "model.safetensors")
    del weights["lm_head.weight"]  # untied, so the checkpoint genuinely lacks the head
    save_file(weights, root / "headless" / "model.safetensors", metadata={"format": "pt"})
    write_shard(root / "val.bin", np.arange(256) % VOCAB, vocab_size=VOCAB)
    return root


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerwise.cli", *map(str, args)], capture_output=True, text=True)


def assert_refused(proc: subprocess.CompletedProcess, message: str) -> str:
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode == 2, said
    assert "Traceback" not in proc.stdout + proc.stderr
    assert message in said, said
    return said


def eval_args(model, out) -> list:
    return ["eval", model, "--tasks", "perplexity", "--data", "VAL", "--seq-len", 32, "--out", out]


# ---- the loader refuses what it cannot score --------------------------------------------------------------

def test_eval_of_a_saved_bert_model_is_refused_instead_of_scoring_a_random_head(models, tmp_path):
    args = [models / "val.bin" if a == "VAL" else a for a in eval_args(models / "bert", tmp_path / "out")]
    assert_refused(cli(*args), "architectures ['BertModel'] is not a causal LM")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_weights_is_refused_naming_them(models):
    with pytest.raises(UserError, match=r"lacks 1 weight\(s\) the model needs \(lm_head.weight\)"):
        load_model(models / "headless")
    model, _ = load_model(models / "llama")  # the complete checkpoint loads
    assert model.config.num_hidden_layers == 3


def test_an_unsupported_architecture_names_the_supported_families_briefly(models):
    said = assert_refused(cli("diagnose", models / "t5", "--data", models / "val.bin", "--seq-len", 32,
                              "--out", models / "t5-out"), "unsupported architecture model_type='t5'")
    assert "llama" in said and "qwen2" in said and "Config" not in said and len(said) < 600


def test_a_truncated_gguf_is_refused_as_truncated(tmp_path):
    from layerwise.loading import smollm2_gguf

    try:
        whole = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    with open(whole, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1_000_000))  # a download cut off inside the metadata
    assert_refused(cli("prune", tmp_path / "cut.gguf", "--drop", "1", "--out", tmp_path / "out"),
                   "cut.gguf: not a readable GGUF file")


def test_gguf_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(UserError, match=r"needs the gguf extra; run `pip install 'layerwise\[gguf\]'`"):
        load_model(tmp_path / "model.gguf")


# ---- arguments checked before any work ----------------------------------------------------------------------

@pytest.mark.parametrize("option, message", [("--seq-len", "--seq-len 0: use 2 or more"),
                                             ("--batch-size", "--batch-size 0: use 1 or more")])
def test_diagnose_refuses_zero_windows_before_loading(tmp_path, option, message):
    # The model does not exist: reaching the message proves the check runs before the load.
    assert_refused(cli("diagnose", tmp_path / "no-model", option, 0, "--out", tmp_path / "out"), message)


@pytest.mark.parametrize("command", ["diagnose", "eval", "prune"])
def test_out_that_is_a_file_is_refused_before_loading(tmp_path, command):
    (tmp_path / "taken").write_text("a file")
    extra = ["--drop", "1"] if command == "prune" else []
    assert_refused(cli(command, tmp_path / "no-model", *extra, "--out", tmp_path / "taken"),
                   "taken is a file, not a folder; pass a folder path")
    assert (tmp_path / "taken").read_text() == "a file"


# ---- a model folder is written whole, and only into an empty place unless --overwrite ----------------------

def old_run(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    for name, content in (("config.json", b"{}"), ("model.safetensors", b"old weights"),
                          ("optimizer.safetensors", b"old optimizer"), ("MANIFEST.json", b"{}")):
        (folder / name).write_bytes(content)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_prune_into_a_non_empty_folder_is_refused_and_leaves_it_untouched(models, tmp_path):
    before = old_run(tmp_path / "out")
    assert_refused(cli("prune", models / "llama", "--drop", "1", "--out", tmp_path / "out"),
                   "folder is not empty")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_prune_overwrite_replaces_the_folder_with_only_the_new_model(models, tmp_path):
    old_run(tmp_path / "out")
    proc = cli("prune", models / "llama", "--drop", "1", "--out", tmp_path / "out", "--overwrite")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not {"optimizer.safetensors", "MANIFEST.json"} & {p.name for p in (tmp_path / "out").iterdir()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_origin"] == [0, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or set-aside folder left


def test_overwrite_never_replaces_a_folder_that_is_not_a_model(models, tmp_path):
    """--overwrite deletes the folder it replaces, so it only takes a model folder: a typo such as --out runs
    (the parent of many runs) or --out ~ must not cost the user anything."""
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "notes.txt").write_text("mine")
    old_run(parent / "run1")
    before = sorted((p.relative_to(parent), p.read_bytes() if p.is_file() else None) for p in parent.rglob("*"))
    assert_refused(cli("prune", models / "llama", "--drop", "1", "--out", parent, "--overwrite"),
                   "replaces only a model folder")
    assert sorted((p.relative_to(parent), p.read_bytes() if p.is_file() else None) for p in parent.rglob("*")) == before


def test_out_that_is_or_holds_the_model_being_read_is_refused_even_with_overwrite(models, tmp_path):
    source = tmp_path / "models" / "llama"
    shutil.copytree(models / "llama", source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (source, source.parent):
        assert_refused(cli("prune", source, "--drop", "1", "--out", out, "--overwrite"),
                       "is or contains the model being read")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_a_save_that_fails_midway_leaves_the_old_folder_and_no_temporary_one(models, tmp_path, monkeypatch):
    before = old_run(tmp_path / "out")
    model, _ = load_model(models / "llama")
    drop_layers(model, [1])

    def disk_full(folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(model, None, tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
