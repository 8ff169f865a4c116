"""`train --init-from MODEL`: continue training a model that exists (an HF folder, a .gguf file, a layerwise
run or checkpoint; whatever `layerwise.loading.load_model` opens) instead of a new one.

The run records what it started from by a fingerprint of the files loaded: the sha256 of the config and of
every weights file, by name. A resume compares fingerprints, not paths, so it refuses another model put at
the same path and accepts the same model named by another path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UserError
from ..runs import latest_valid_checkpoint, sha256_of

# What `from_pretrained` reads as weights in a model folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class InitModel:
    model: nn.Module
    tokenizer: object | None  # a `tokenizers.Tokenizer` (the model's fast tokenizer), or None if it has none
    fingerprint: dict

    @property
    def embedding_rows(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]


def loaded_files(path: Path) -> list[Path]:
    """The files `load_model(path)` reads the model from: the .gguf file, or the config and weights of the
    folder (a run folder's newest valid checkpoint)."""
    if path.suffix == ".gguf":
        return [path]
    if (path / "checkpoints").is_dir():
        path = latest_valid_checkpoint(path) or path
    return sorted(p for p in path.iterdir()
                  if p.is_file() and (p.name == "config.json" or p.name in WEIGHT_INDEXES
                                      or p.suffix in WEIGHT_SUFFIXES))


def fingerprint(path: Path) -> dict:
    files = loaded_files(path)
    return {"path": str(path.resolve()), "loaded_from": str(files[0].parent.resolve()) if files else None,
            "sha256": {f.name: sha256_of(f) for f in files}}


def same_model(a: dict | None, b: dict | None) -> bool:
    """Whether two fingerprints (None: a model trained from scratch) name the same model."""
    return (a or {}).get("sha256") == (b or {}).get("sha256")


def described(record: dict | None) -> str:
    if record is None:
        return "a new model"
    files = ", ".join(f"{name} {digest[:12]}" for name, digest in record["sha256"].items())
    return f"{record['path']} ({files})"


def open_init_model(path: str | Path) -> InitModel:
    """The model at `path` in float32 and in training mode, its tokenizer and its fingerprint."""
    import torch

    from ..loading import forget_dequantized_gguf, load_model

    path = Path(path)
    try:
        model, tokenizer = load_model(path, dtype=torch.float32)
    except FileNotFoundError as err:
        raise UserError(f"TrainConfig.init_from={str(path)!r}: {err}") from None
    if getattr(model.config, "layerwise_quantization", None) is not None:
        raise UserError(f"TrainConfig.init_from={str(path)!r} is a quantized model (config.json "
                        "layerwise_quantization): its packed linears cannot train; train the float model and "
                        "quantize after")
    model.train()  # from_pretrained returns eval mode, which would switch dropout off while training
    if getattr(model, "hf_quantizer", None) is not None:
        forget_dequantized_gguf(model, f"TrainConfig.init_from={str(path)!r}")
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer is not None else None
    if tokenizer is not None and backend is None:
        raise UserError(f"TrainConfig.init_from={str(path)!r}: its tokenizer ({type(tokenizer).__name__}) has no "
                        "tokenizer.json form; save the model with a fast tokenizer (tokenizer.json) next to it")
    return InitModel(model, backend, fingerprint(path))


def check_vocabulary(init: InitModel, data_vocab: int | None = None, data: str = "") -> None:
    """The data must be in the model's tokens: tokenized by its tokenizer, with every id a row of its
    embedding. An embedding with more rows than the tokenizer has tokens is padding and is accepted.
    Without `data_vocab`, the tokenizer alone is checked against the embedding (before any tokenizing)."""
    rows = init.embedding_rows
    tokens = init.tokenizer.get_vocab_size() if init.tokenizer is not None else None
    if tokens is not None and tokens > rows:
        raise UserError(f"the init_from model's tokenizer has {tokens} tokens but its embedding has {rows} rows; "
                        "save the model with the tokenizer it was trained with")
    if data_vocab is None:
        return
    if tokens is not None and data_vocab != tokens:
        raise UserError(f"the data ({data}) has a vocabulary of {data_vocab} tokens but the init_from model's "
                        f"tokenizer has {tokens}: it was tokenized with another tokenizer; pass text (a .txt file "
                        "or folder) so it is tokenized with the model's tokenizer")
    if data_vocab > rows:
        raise UserError(f"the data ({data}) has a vocabulary of {data_vocab} tokens but the init_from model's "
                        f"embedding has {rows} rows; pass data tokenized for this model")


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """`model` with rank-`rank` LoRA adapters (alpha = rank, so the update is B A unscaled) on every linear
    but the head; only the adapters train. Checkpoints merge them into the weights (see checkpoint.py)."""
    try:
        import peft
    except ImportError:
        raise UserError("TrainConfig.lora_rank needs peft; run `pip install 'layerwise[lora]'`") from None
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def write_record(run_dir: Path, init: InitModel) -> None:
    (run_dir / "init_from.json").write_text(json.dumps(init.fingerprint, indent=1))
