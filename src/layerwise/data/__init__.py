"""The data layer: corpus sources, tokenizers, token shards, corpus building and opening data for training."""

import importlib

_EXPORTS = {
    "TokenData": ".build", "build_corpus": ".build", "open_token_data": ".build", "read_shard": ".shards",
    "write_llmc_shard": ".shards", "write_shard": ".shards", "LARGE_CORPUS": ".sources", "SOURCES": ".sources",
    "get_source": ".sources", "encode_documents": ".tokenizer", "load_tokenizer": ".tokenizer",
    "train_bpe": ".tokenizer",
}

__all__ = [
           "LARGE_CORPUS",
           "SOURCES",
           "TokenData",
           "build_corpus",
           "encode_documents",
           "get_source",
           "load_tokenizer",
           "open_token_data",
           "read_shard",
           "train_bpe",
           "write_llmc_shard",
           "write_shard",
]


def __getattr__(name):  # imported on first use: `layerwise --help` must not import torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
