"""Scoring from a shared context (one cached forward over a prompt's context, its continuations from copies of
the cache) gives every continuation the loglikelihood and greedy flag of scoring it as its own row, on every
Hugging Face family and on layerwise models with their own residual schemes and layer programs; prompts that
cannot share fall back to the per-row path."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import HF_FAMILIES, SLIDING_WINDOWS, hf_model, tiny_model

from layerwise.data.tokenizer import EOT
from layerwise.evaluate import Prompt, encode_prompt, score_prompts

# Gemma's RMSNorms compute in float32 whatever the model's dtype, so a float64 Gemma agrees with itself across
# batch shapes only to float32 rounding of the normed activations.
FLOAT32_NORM_FAMILIES = {"gemma", "gemma2", "gemma3_text"}

PROMPTS = [
    Prompt("Now is the winter of our discontent made glorious summer by this sun of",
           (" York", " Lancaster and all the clouds that lour'd upon our house", " a", " the house of")),
    Prompt("my kin", ("g of France", "gdom for a horse", "smen")),  # "kin" + "g" merge: the cut takes the "g"
    Prompt("The quality of mercy is not", (" strained", " known", " twice blest")),
    Prompt("To be, or not to be, that is the", (" question",)),  # one continuation: never shared
    Prompt("All the world's a stage, and all the men and women merely ", ("players", "actors")),  # trailing space
    Prompt("The quality of mercy was not", (" strained", " a droppeth as the gentle rain")),  # same length as 3rd
    Prompt("The quantity of mercy is not", (" strained", " known", " twice blest")),  # rows batched with the 3rd's
    Prompt("Friends, Romans, countrymen,", (" lend me your ears", " go", " I come to bury Caesar, not to praise")),
]


class WrappedTokenizer:
    """The session corpus's BPE with ids folded into a smaller model's vocabulary (the models are random, so
    only the BPE's splits matter), the tokenizer `score_prompts` sees for models of vocab < 512."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.bos_token_id, self.eos_token_id = None, tokenizer.eos_token_id % vocab_size

    def __call__(self, texts, add_special_tokens=False):
        ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [[token % self.vocab_size for token in row] for row in ids]}


@pytest.fixture(scope="module")
def bpe(corpus):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"), eos_token=EOT)


def assert_shared_equals_unshared(model, tokenizer, batch_sizes=(1, 3, 16), abs_tol=1e-9):
    reference = score_prompts(model, tokenizer, PROMPTS, batch_size=4, shared_context=False)
    for batch_size in batch_sizes:
        shared = score_prompts(model, tokenizer, PROMPTS, batch_size=batch_size)
        for prompt, ours, theirs in zip(PROMPTS, shared, reference):
            assert [s.loglikelihood for s in ours] == pytest.approx([s.loglikelihood for s in theirs], abs=abs_tol), (
                prompt, batch_size)
            assert [s.greedy for s in ours] == [s.greedy for s in theirs]
            assert [s.n_tokens for s in ours] == [s.n_tokens for s in theirs]


def test_the_prompts_cover_a_bpe_merge_across_the_cut_and_contexts_of_one_and_of_different_lengths(bpe):
    context, continuations = encode_prompt(bpe, PROMPTS[1])
    whole = bpe(["my king of France"], add_special_tokens=False)["input_ids"][0]
    assert whole[: len(context)] != context  # the merged token is not the context's last token
    assert context + continuations[0] != whole
    lengths = [len(encode_prompt(bpe, p)[0]) for p in PROMPTS]
    assert lengths[2] == lengths[5] == lengths[6] and len(set(lengths)) >= 5


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_shared_context_scores_equal_per_row_scores_on_every_hf_family(family, bpe):
    model = hf_model(family).double()
    tolerance = 1e-6 if family in FLOAT32_NORM_FAMILIES else 1e-9
    assert_shared_equals_unshared(model, WrappedTokenizer(bpe, model.config.vocab_size), abs_tol=tolerance)


@pytest.mark.parametrize("family", sorted(SLIDING_WINDOWS))
def test_shared_context_is_exact_when_sliding_windows_are_shorter_than_the_context(family, bpe):
    # The cache of a sliding layer keeps only its window: the continuations must still see what a full
    # forward shows them.
    model = hf_model(family, **SLIDING_WINDOWS[family]).double()
    tolerance = 1e-6 if family in FLOAT32_NORM_FAMILIES else 1e-9
    assert_shared_equals_unshared(model, WrappedTokenizer(bpe, model.config.vocab_size), abs_tol=tolerance)


@pytest.mark.parametrize("preset, overrides", [
    ("pre-ln", {}),
    ("block-attnres", {}),
    ("attnres", {}),
    ("pre-rmsnorm", dict(n_layers=6, layer_order=[0, 1, 2, 1, 2, 3])),  # a layer program with a tied loop
    ("block-attnres", dict(n_layers=6, layer_order=[0, 1, 2, 1, 2, 3], attnres_blocks=3)),
])
def test_shared_context_scores_equal_per_row_scores_on_layerwise_models(preset, overrides, bpe):
    model = tiny_model(preset, dtype=torch.float64, random_queries=True, **overrides)
    assert_shared_equals_unshared(model, WrappedTokenizer(bpe, model.config.vocab_size))


def forward_inputs(model, run):
    """input_ids of every forward of the model during run(), and whether it passed a cache in."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["input_ids"].tolist(), kwargs.get("past_key_values") is not None))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_the_context_runs_once_and_the_continuations_after_its_cache(bpe):
    model = hf_model("llama").double()
    tokenizer = WrappedTokenizer(bpe, 128)
    prompt = Prompt("The quality of mercy is not", (" strained", " known", " twice blest", " a"))
    context, continuations = encode_prompt(tokenizer, prompt)
    seen = forward_inputs(model, lambda: score_prompts(model, tokenizer, [prompt], batch_size=8))
    assert seen[0] == ([context], False)
    assert len(seen) > 1 and all(cached for _, cached in seen[1:])
    # Each continuation of 2+ tokens is fed once after the cache, its inputs (all tokens but the last, which is
    # only a target) first, padded right; a one-token continuation is predicted by the context's last position.
    later = [row for inputs, _ in seen[1:] for row in inputs]
    expected = [ids[:-1] for ids in continuations if len(ids) > 1]
    for ids in expected:
        matches = [row for row in later if row[: len(ids)] == ids]
        assert matches, ids
        later.remove(matches[0])
    assert later == []
    unshared = forward_inputs(model, lambda: score_prompts(model, tokenizer, [prompt], batch_size=8,
                                                           shared_context=False))
    assert len(unshared) == 1 and len(unshared[0][0]) == len(continuations) and not unshared[0][1]


def test_one_continuation_and_truncated_rows_fall_back_to_per_row_scoring(bpe):
    model = hf_model("llama", max_position_embeddings=12).double()
    tokenizer = WrappedTokenizer(bpe, 128)
    long_context = Prompt("Now is the winter of our discontent made glorious", (" summer", " spring"))
    assert len(encode_prompt(tokenizer, long_context)[0]) > 12  # each row is left-truncated to the window
    prompts = [long_context, Prompt("To be, or not", (" to be",))]
    seen = forward_inputs(model, lambda: score_prompts(model, tokenizer, prompts))
    assert not any(cached for _, cached in seen)
    assert score_prompts(model, tokenizer, prompts) == score_prompts(model, tokenizer, prompts, shared_context=False)


class CachelessLM(torch.nn.Module):
    """A causal LM whose forward takes input ids only (no KV cache), as a plain torch model might."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, use_cache=False).logits)


def test_a_model_without_a_kv_cache_is_scored_per_row(bpe):
    inner = hf_model("llama").double()
    tokenizer = WrappedTokenizer(bpe, 128)
    expected = score_prompts(inner, tokenizer, PROMPTS, shared_context=False)
    assert score_prompts(CachelessLM(inner), tokenizer, PROMPTS) == expected


class CacheDroppingLM(CachelessLM):
    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits, past_key_values=None)


def test_a_model_that_returns_no_cache_is_scored_per_row_after_all(bpe):
    model, tokenizer = CacheDroppingLM(hf_model("llama").double()), WrappedTokenizer(bpe, 128)
    assert score_prompts(model, tokenizer, PROMPTS) == score_prompts(model, tokenizer, PROMPTS, shared_context=False)


def test_a_model_mid_layernorm_removal_is_scored_per_row_since_it_cannot_continue_a_cache(bpe):
    from layerwise.train.norm_removal import tracked_stds, with_fake_norms

    model = with_fake_norms(tiny_model("pre-ln", dtype=torch.float64))
    for scale in tracked_stds(model).values():
        scale.bos_special = True  # the first position still has its own std, as early in a removal
    assert not model.continues_from_cache
    tokenizer = WrappedTokenizer(bpe, model.config.vocab_size)
    prompt = Prompt("The quality of mercy is not", (" strained", " known"))
    seen = forward_inputs(model, lambda: score_prompts(model, tokenizer, [prompt], batch_size=8))
    assert [cached for _, cached in seen] == [False]  # one per-row forward, no cache
    assert tiny_model("pre-ln").continues_from_cache
