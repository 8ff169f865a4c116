"""Evaluate an in-memory causal LM (Hugging Face or layerwise): held-out token perplexity on a token shard,
LAMBADA-OpenAI and HellaSwag, scored as lm-evaluation-harness scores them, from local data files only.

    from layerwise.evaluate import evaluate
    results = evaluate(model, tokenizer, ["lambada", "hellaswag"], limit=200)
    results["hellaswag"].metrics["acc_norm"], results["hellaswag"].ci95["acc_norm"]
"""

from .hellaswag import evaluate_hellaswag, hellaswag_items, preprocess
from .lambada import evaluate_lambada, lambada_prompts
from .perplexity import shard_perplexity, token_perplexity
from .result import EvalResult, binomial_stderr, wilson_interval
from .scoring import Prompt, Score, encode_prompt, score_prompts
from .suite import TASKS, evaluate, parse_tasks

__all__ = [
    "EvalResult", "Prompt", "Score", "TASKS", "binomial_stderr", "encode_prompt", "evaluate", "evaluate_hellaswag",
    "evaluate_lambada", "hellaswag_items", "lambada_prompts", "parse_tasks", "preprocess", "score_prompts",
    "shard_perplexity", "token_perplexity", "wilson_interval",
]
