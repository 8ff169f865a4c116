"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load any local tokenizer.json / HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents in the token stream


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE (every byte is a base token, so nothing is ever unknown)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a folder containing one (as HF model folders do)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (pass a tokenizer.json or an HF folder holding one)")
    return Tokenizer.from_file(str(file))


def eot_id(tokenizer: Tokenizer) -> int | None:
    for name in (EOT, "</s>", "<|end_of_text|>", "<eos>"):
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    return None


def line_chunks(text: str, size: int = 1 << 14) -> list[str]:
    """Pieces of about `size` characters cut after a line break: `encode_batch` parallelises over pieces,
    and a few huge documents would otherwise keep all but one core idle."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size)
        cut = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:cut])
        start = cut
    return pieces


def encode_documents(tokenizer: Tokenizer, docs: list[str], batch: int = 512) -> np.ndarray:
    """Token ids of all documents, each followed by the end-of-text id."""
    separator = eot_id(tokenizer)
    pieces, owner = [], []
    for index, doc in enumerate(docs):
        chunks = line_chunks(doc)
        pieces += chunks
        owner += [index] * len(chunks)
    out = []
    for i in range(0, len(pieces), batch):
        for j, encoding in enumerate(tokenizer.encode_batch(pieces[i:i + batch], add_special_tokens=False)):
            out.append(np.asarray(encoding.ids, dtype=np.uint32))
            k = i + j
            if separator is not None and (k + 1 == len(pieces) or owner[k + 1] != owner[k]):
                out.append(np.asarray([separator], dtype=np.uint32))
    return np.concatenate(out) if out else np.empty(0, dtype=np.uint32)
