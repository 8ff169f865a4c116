"""Held-out token perplexity on a token shard.

The convention of GPTQ/AWQ-style "WikiText-2 PPL": the tokens are cut into non-overlapping windows of seq_len
(the tail shorter than a window is dropped), each window is one forward from a fresh context, and the mean
NLL is over every predicted token (seq_len - 1 per window). It is a per-*token* perplexity, so it depends on
the tokenizer and is not lm-eval's word or byte perplexity."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.shards import read_shard
from ..numerics import at_least_float32
from .result import EvalResult, perplexity_of
from .scoring import Progress, evaluation_mode, model_device, model_max_length

DEFAULT_SEQ_LEN = 2048


def token_perplexity(model, tokens: np.ndarray, seq_len: int | None = None, batch_size: int = 1,
                     limit: int | None = None, progress: Progress | None = None) -> EvalResult:
    """Mean token NLL (nats) and its exp over the first `limit` windows (all by default) of `tokens`.
    seq_len defaults to 2048, or the model's window if shorter."""
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use 1 or more windows per forward")
    seq_len = _window(model, seq_len)
    n_windows = len(tokens) // seq_len if limit is None else min(limit, len(tokens) // seq_len)
    if n_windows < 1:
        raise ValueError(f"{len(tokens):,} tokens make no window of seq_len={seq_len}; "
                         f"use a larger shard or a smaller --seq-len")
    used = np.asarray(tokens[: n_windows * seq_len]).astype(np.int64)
    _check_vocabulary(model, used)
    windows = torch.from_numpy(used).view(n_windows, seq_len)
    window_nll = []  # mean NLL of each window, for the stderr across windows
    device = model_device(model)
    with evaluation_mode(model):
        for first in range(0, n_windows, batch_size):
            batch = windows[first: first + batch_size].to(device)
            logits = at_least_float32(model(input_ids=batch).logits[:, :-1])
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(-1)
            window_nll += nll.tolist()
            if progress is not None:
                progress(len(window_nll), n_windows)
    mean_nll = sum(window_nll) / n_windows  # every window predicts seq_len - 1 tokens, so this is per token
    stderr = {"token_nll": statistics.stdev(window_nll) / math.sqrt(n_windows)} if n_windows > 1 else {}
    return EvalResult(task="perplexity", metrics={"token_nll": mean_nll, "token_perplexity": perplexity_of(mean_nll)},
                      n=n_windows, stderr=stderr, seconds=time.perf_counter() - start,
                      info={"seq_len": seq_len, "tokens_scored": n_windows * (seq_len - 1),
                            "of_windows": len(tokens) // seq_len})


def shard_perplexity(model, path: str | Path, seq_len: int | None = None, batch_size: int = 1,
                     limit: int | None = None, progress: Progress | None = None) -> EvalResult:
    """token_perplexity on a token shard (`layerwise data build` val shard or llm.c shard). The shard must
    have been made with the model's tokenizer; only a vocabulary mismatch can be detected."""
    tokens, vocab = read_shard(path)
    model_vocab = _model_vocabulary(model)
    if vocab is not None and model_vocab is not None and vocab > model_vocab:
        raise ValueError(f"{path}: shard vocabulary {vocab:,} exceeds the model's {model_vocab:,}; "
                         "tokenize the text with this model's tokenizer")
    result = token_perplexity(model, tokens, seq_len, batch_size, limit, progress)
    result.info["data"] = str(path)
    return result


def _window(model, seq_len: int | None) -> int:
    max_length = model_max_length(model)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, max_length) if max_length else DEFAULT_SEQ_LEN
    if seq_len < 2 or (max_length is not None and seq_len > max_length):
        raise ValueError(f"seq_len={seq_len}; use 2..{max_length or 'any'} (the model's max_position_embeddings)")
    return seq_len


def _model_vocabulary(model) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_vocabulary(model, tokens: np.ndarray) -> None:
    vocab = _model_vocabulary(model)
    if vocab is not None and tokens.size and int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab:,}; the data "
                         "was tokenized with another tokenizer")
