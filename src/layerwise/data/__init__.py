"""The data layer: corpus sources, tokenizers, token shards, corpus building and opening data for training."""

from .build import TokenData, build_corpus, open_token_data
from .shards import read_shard, write_llmc_shard, write_shard
from .sources import LARGE_CORPUS, SOURCES, get_source
from .tokenizer import encode_documents, load_tokenizer, train_bpe

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
