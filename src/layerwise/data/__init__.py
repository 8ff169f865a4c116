"""The data layer: corpus sources, tokenizers, token shards, corpus building and opening data for training."""

from ..lazy import lazy_exports

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


# Imported on first use: `layerwise --help` must not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
