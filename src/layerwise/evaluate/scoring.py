"""Loglikelihood of continuations given a context, for any in-memory causal LM (Hugging Face or layerwise),
computed the way lm-evaluation-harness scores its `loglikelihood` requests so that numbers compare.

A prompt's continuations (HellaSwag's four endings, LAMBADA's one last word) always share a forward batch,
and several prompts are packed into one batch up to `batch_size` sequences."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..numerics import at_least_float32  # log-softmax in bf16 would cost ~0.01 nats per token

Progress = Callable[[int, int], None]  # (done, total) in the task's own unit: prompts or windows


@dataclass(frozen=True)
class Prompt:
    """A context and the continuations scored after it (one for LAMBADA, four endings for HellaSwag)."""

    context: str
    continuations: tuple[str, ...]


@dataclass(frozen=True)
class Score:
    """One continuation's score."""

    loglikelihood: float  # sum over its tokens of log p(token | all tokens before it), in nats
    greedy: bool  # the argmax at every continuation position is the continuation's own token
    n_tokens: int


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() (no dropout) and no autograd for the duration; the caller's train/eval mode comes back after,
    since callers evaluate a model they are in the middle of modifying or training."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_max_length(model: torch.nn.Module) -> int | None:
    """Longest sequence the model's position scheme covers (HF configs and layerwise's ModelConfig all map
    `max_position_embeddings` onto their own field), or None when the config does not say."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def encode_prompt(tokenizer, prompt: Prompt) -> tuple[list[int], list[list[int]]]:
    """(context ids, ids of each continuation), split as lm-eval's `_encode_pair` does.

    The whole text context + continuation is tokenized at once and cut at the context's token count, so the
    continuation is scored in the tokens the model would actually see (BPE merges across the boundary are
    the continuation's). Trailing spaces of the context move to the continuation: "... about" + " signs",
    never "... about " + "signs". No special tokens are added (lm-eval's default for causal models); an empty
    context becomes the BOS (else EOS) token so the first continuation token has something to condition on."""
    context, continuations = prompt.context, list(prompt.continuations)
    stripped = context.rstrip()
    if stripped != context:
        continuations = [context[len(stripped):] + c for c in continuations]
        context = stripped
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on; this tokenizer has neither")
        ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
        return [prefix], [list(x) for x in ids]
    context_ids, *wholes = tokenizer([context] + [context + c for c in continuations],
                                     add_special_tokens=False)["input_ids"]
    cut = len(context_ids)
    return list(context_ids), [list(whole[cut:]) for whole in wholes]


def score_prompts(model, tokenizer, prompts: Sequence[Prompt], batch_size: int = 32,
                  progress: Progress | None = None) -> list[list[Score]]:
    """Scores of every continuation of every prompt, in the prompts' order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use 1 or more sequences per forward")
    max_length = model_max_length(model)
    rows_of = []  # per prompt: (token row, continuation length) for each continuation
    for prompt in prompts:
        if not prompt.continuations:
            raise ValueError(f"prompt {prompt.context[:40]!r}... has no continuations to score; give at least one")
        context_ids, continuation_ids = encode_prompt(tokenizer, prompt)
        rows_of.append([_fit_row(context_ids + ids, len(ids), max_length) for ids in continuation_ids])
    scores: list[list[Score] | None] = [None] * len(prompts)
    done = 0
    with evaluation_mode(model):
        for batch in _pack(rows_of, batch_size):
            rows = [row for i in batch for row in rows_of[i]]
            flat = iter(_score_rows(model, rows))
            for i in batch:
                scores[i] = [next(flat) for _ in rows_of[i]]
            done += len(batch)
            if progress is not None:
                progress(done, len(prompts))
    return scores


def _fit_row(tokens: list[int], n_continuation: int, max_length: int | None) -> tuple[list[int], int]:
    """Left-truncate a row that is longer than the model's window (lm-eval keeps the last max_length + 1
    tokens, since the final token is only a target, never an input)."""
    if n_continuation < 1:
        raise ValueError("a continuation tokenized to no tokens; every continuation must be non-empty")
    if max_length is not None:
        if n_continuation > max_length:
            raise ValueError(f"a continuation of {n_continuation} tokens exceeds the model's "
                             f"max_position_embeddings={max_length}")
        tokens = tokens[-(max_length + 1):]
    return tokens, n_continuation


def _pack(rows_of: list[list[tuple[list[int], int]]], batch_size: int) -> Iterator[list[int]]:
    """Prompt indices per batch: longest prompts first (so padding stays small and an out-of-memory shows in
    the first batch), each prompt whole, up to batch_size rows unless one prompt alone has more."""
    order = sorted(range(len(rows_of)), key=lambda i: -max(len(tokens) for tokens, _ in rows_of[i]))
    batch, n_rows = [], 0
    for i in order:
        if batch and n_rows + len(rows_of[i]) > batch_size:
            yield batch
            batch, n_rows = [], 0
        batch.append(i)
        n_rows += len(rows_of[i])
    if batch:
        yield batch


def _score_rows(model, rows: list[tuple[list[int], int]]) -> list[Score]:
    """One forward over right-padded rows. Right padding needs no attention mask: under the causal mask a pad
    never reaches a real token, so every model (whatever it does with masks) scores a row as it would alone."""
    device = model_device(model)
    lengths = [len(tokens) - 1 for tokens, _ in rows]  # the last token is only a target
    width = max(lengths)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (tokens, _) in enumerate(rows):
        inputs[r, : lengths[r]] = torch.tensor(tokens[:-1])
    # Logits at input position j predict token j + 1; a continuation of n tokens is predicted from positions
    # length - n .. length - 1. Only positions from the earliest such start onward need the LM head.
    starts = [length - n for length, (_, n) in zip(lengths, rows)]
    keep = width - min(starts)
    logits = _forward_logits(model, inputs.to(device), keep)
    n_max = max(n for _, n in rows)
    positions = torch.zeros(len(rows), n_max, dtype=torch.long)
    targets = torch.zeros(len(rows), n_max, dtype=torch.long)
    valid = torch.zeros(len(rows), n_max, dtype=torch.bool)
    for r, ((tokens, n), start) in enumerate(zip(rows, starts)):
        positions[r, :n] = torch.arange(start, start + n) - (width - keep)
        targets[r, :n] = torch.tensor(tokens[-n:])
        valid[r, :n] = True
    positions, targets, valid = positions.to(device), targets.to(device), valid.to(device)
    picked = at_least_float32(logits[torch.arange(len(rows), device=device)[:, None], positions])
    token_logprobs = F.log_softmax(picked, dim=-1).gather(-1, targets[..., None])[..., 0]
    loglikelihood = torch.where(valid, token_logprobs, 0.0).sum(-1)  # where, not *: a masked-out -inf stays out
    greedy = ((picked.argmax(-1) == targets) | ~valid).all(-1)
    return [Score(float(ll), bool(g), n) for ll, g, (_, n) in zip(loglikelihood.tolist(), greedy.tolist(), rows)]


def _forward_logits(model, inputs: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions. HF models and layerwise take `logits_to_keep`, which skips the
    LM head (a fifth of SmolLM2's compute, and B x T x vocab of memory) where no continuation is scored;
    no KV cache is built since nothing is generated."""
    options = {name: value for name, value in (("use_cache", False), ("logits_to_keep", keep))
               if _accepts(model, name)}
    logits = model(input_ids=inputs, **options).logits
    return logits[:, -keep:]


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an introspectable signature
        return False
