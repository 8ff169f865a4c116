"""Loglikelihood of continuations given a context, for any in-memory causal LM (Hugging Face or layerwise),
computed the way lm-evaluation-harness scores its `loglikelihood` requests so that numbers compare.

A prompt with several continuations (HellaSwag's four endings) is scored from a shared context by default: one
forward over the context with the KV cache, then the continuations from copies of that cache, so the context
runs once instead of once per continuation. Everything else (one continuation, as LAMBADA's last word; a row
left-truncated to the model's window; a model whose forward takes no `past_key_values`, returns no cache or
cannot continue one (`continues_from_cache`); `shared_context=False`)
runs each context + continuation as its own row, several prompts packed into one batch up to `batch_size`
sequences. Both give each continuation the loglikelihood of a plain forward over context + continuation."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
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
                  progress: Progress | None = None, shared_context: bool = True) -> list[list[Score]]:
    """Scores of every continuation of every prompt, in the prompts' order. `shared_context=False` scores every
    continuation as its own row even where the context could be shared (the reference the shared path is
    tested against)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use 1 or more sequences per forward")
    max_length = model_max_length(model)
    # A layerwise model mid-LayerNorm-removal cannot continue a cache (`continues_from_cache`); HF models can.
    share = shared_context and _accepts(model, "past_key_values") and getattr(model, "continues_from_cache", True)
    rows_of = {}  # prompt index -> (token row, continuation length) for each continuation, scored unshared
    shared = {}  # prompt index -> (context ids, continuation ids), scored from one context forward
    for i, prompt in enumerate(prompts):
        if not prompt.continuations:
            raise ValueError(f"prompt {prompt.context[:40]!r}... has no continuations to score; give at least one")
        context_ids, continuation_ids = encode_prompt(tokenizer, prompt)
        rows = [_fit_row(context_ids + ids, len(ids), max_length) for ids in continuation_ids]
        untruncated = all(len(tokens) == len(context_ids) + n for (tokens, n) in rows)
        if share and len(rows) > 1 and untruncated:
            shared[i] = (context_ids, continuation_ids)
        else:
            rows_of[i] = rows
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
        for batch in _contexts(shared, batch_size):
            try:
                shared_scores = _score_shared_contexts(model, [shared[i] for i in batch], batch_size)
            except _NoCache:  # a forward that takes a cache but returns none: every prompt as rows after all
                return score_prompts(model, tokenizer, prompts, batch_size, progress, shared_context=False)
            for i, choices in zip(batch, shared_scores):
                scores[i] = choices
            done += len(batch)
            if progress is not None:
                progress(done, len(prompts))
    return scores


class _NoCache(Exception):
    """The model returned no KV cache to continue a context from."""


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


def _pack(rows_of: dict[int, list[tuple[list[int], int]]], batch_size: int) -> Iterator[list[int]]:
    """Prompt indices per batch: longest prompts first (so padding stays small and an out-of-memory shows in
    the first batch), each prompt whole, up to batch_size rows unless one prompt alone has more."""
    order = sorted(rows_of, key=lambda i: -max(len(tokens) for tokens, _ in rows_of[i]))
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
    picked = logits[torch.arange(len(rows), device=device)[:, None], positions]
    return _scores(picked, targets, valid)


def _scores(picked: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> list[Score]:
    """Scores of rows from the logits that predict each of their tokens ([rows, n_max, vocab]), the tokens
    ([rows, n_max]) and which of the n_max slots are real ([rows, n_max]; a row's real slots come first)."""
    picked = at_least_float32(picked)
    token_logprobs = F.log_softmax(picked, dim=-1).gather(-1, targets[..., None])[..., 0]
    loglikelihood = torch.where(valid, token_logprobs, 0.0).sum(-1)  # where, not *: a masked-out -inf stays out
    greedy = ((picked.argmax(-1) == targets) | ~valid).all(-1)
    n_tokens = valid.sum(-1)
    return [Score(float(ll), bool(g), int(n))
            for ll, g, n in zip(loglikelihood.tolist(), greedy.tolist(), n_tokens.tolist())]


def _contexts(shared: dict[int, tuple[list[int], list[list[int]]]], batch_size: int) -> Iterator[list[int]]:
    """Prompt indices per context forward: longest contexts first (little padding), up to batch_size."""
    order = sorted(shared, key=lambda i: -len(shared[i][0]))
    for first in range(0, len(order), batch_size):
        yield order[first: first + batch_size]


# A continuation batch may hold this many times its real tokens in right padding before it is split in two.
# Each batch copies the context cache and costs a forward's fixed overhead, but padding costs compute in full:
# on CPU, HellaSwag's endings (1 to 50+ tokens) padded to a common width would cost more than the shared
# context saves.
PADDING_ALLOWANCE = 1.25


def _score_shared_contexts(model, prompts: list[tuple[list[int], list[list[int]]]],
                           batch_size: int) -> list[list[Score]]:
    """`_score_shared` over contexts of different lengths, left-padded into one forward: on CPU the weights are
    read once per forward, so a forward per context length was ~1.6x slower in all than one per batch. A model
    whose padding turns scores into NaN (Gemma-2 with its eager, soft-capped attention does: a pad query has
    every key masked, and its NaN reaches real tokens through their zero attention weights) is rescored one
    context length at a time, which needs no padding."""
    scores = _score_shared(model, prompts, batch_size)
    if len({len(context) for context, _ in prompts}) == 1 or not any(
            math.isnan(s.loglikelihood) for choices in scores for s in choices):
        return scores
    by_length: dict[int, list[int]] = {}
    for p, (context, _) in enumerate(prompts):
        by_length.setdefault(len(context), []).append(p)
    for group in by_length.values():
        for p, choices in zip(group, _score_shared(model, [prompts[p] for p in group], batch_size)):
            scores[p] = choices
    return scores


def _score_shared(model, prompts: list[tuple[list[int], list[list[int]]]], batch_size: int) -> list[list[Score]]:
    """Scores of prompts from their contexts, left-padded (attention mask and position ids count real tokens
    only): one forward over the contexts builds the KV cache and predicts every continuation's first token from
    the context's last position; the continuations' other tokens come from forwards over the continuations after a copy of the cache, each continuation row reading
    its own prompt's cache row. Continuations are right-padded (under the causal mask a pad only follows real
    tokens), batched longest first while the padding stays within PADDING_ALLOWANCE."""
    device = model_device(model)
    lengths = torch.tensor([len(context) for context, _ in prompts], device=device)
    width = int(lengths.max())
    inputs = torch.zeros(len(prompts), width, dtype=torch.long)
    for p, (context, _) in enumerate(prompts):
        inputs[p, width - len(context):] = torch.tensor(context)
    # Left padding: every context ends at the last column, which predicts its continuations' first tokens.
    mask = (torch.arange(width, device=device)[None] >= (width - lengths)[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    options = {"use_cache": True, **({"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {})}
    out = model(input_ids=inputs.to(device), attention_mask=mask, position_ids=positions, **options)
    if out.past_key_values is None:
        raise _NoCache
    first_logits = out.logits[:, -1]  # [prompts, vocab]: predicts each continuation's first token
    rows = [(p, ids) for p, (_, continuations) in enumerate(prompts) for ids in continuations]
    scores: list[Score | None] = [None] * len(rows)
    for chunk in _continuation_batches(rows, batch_size):
        owners = torch.tensor([rows[r][0] for r in chunk], device=device)
        n_max = max(len(rows[r][1]) for r in chunk)
        targets = torch.zeros(len(chunk), n_max, dtype=torch.long)
        valid = torch.zeros(len(chunk), n_max, dtype=torch.bool)
        for k, r in enumerate(chunk):
            ids = rows[r][1]
            targets[k, : len(ids)] = torch.tensor(ids)
            valid[k, : len(ids)] = True
        picked = first_logits[owners][:, None]
        if n_max > 1:  # input j of a continuation (its token j) predicts its token j + 1
            cache = copy.deepcopy(out.past_key_values)
            cache.batch_select_indices(owners)
            steps = torch.arange(n_max - 1, device=device)
            later = model(input_ids=targets[:, :-1].to(device), past_key_values=cache, use_cache=True,
                          attention_mask=torch.cat([mask[owners], torch.ones(len(chunk), n_max - 1, dtype=torch.long,
                                                                                 device=device)], 1),
                          position_ids=lengths[owners][:, None] + steps).logits
            picked = torch.cat([picked, later], dim=1)
        for r, score in zip(chunk, _scores(picked, targets.to(device), valid.to(device))):
            scores[r] = score
    flat = iter(scores)
    return [[next(flat) for _ in continuations] for _, continuations in prompts]


def _continuation_batches(rows: list[tuple[int, list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Row indices per continuation forward: longest first, up to batch_size rows, a new batch once right
    padding to the batch's longest row would exceed PADDING_ALLOWANCE times the batch's real input tokens."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    chunk, real = [], 0
    for r in order:
        inputs = len(rows[r][1]) - 1  # the last token is only a target
        if chunk:
            width = len(rows[chunk[0]][1]) - 1
            if len(chunk) >= batch_size or (len(chunk) + 1) * width > PADDING_ALLOWANCE * (real + inputs):
                yield chunk
                chunk, real = [], 0
        chunk.append(r)
        real += inputs
    if chunk:
        yield chunk


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
