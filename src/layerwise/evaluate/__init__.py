"""Evaluate an in-memory causal LM (Hugging Face or layerwise): held-out token perplexity on a token shard,
LAMBADA-OpenAI and HellaSwag, scored as lm-evaluation-harness scores them, from local data files only.

    from layerwise.evaluate import evaluate
    results = evaluate(model, tokenizer, ["lambada", "hellaswag"], limit=200)
    results["hellaswag"].metrics["acc_norm"], results["hellaswag"].ci95["acc_norm"]
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "evaluate_hellaswag": ".hellaswag", "hellaswag_items": ".hellaswag", "preprocess": ".hellaswag",
    "evaluate_lambada": ".lambada", "lambada_prompts": ".lambada", "shard_perplexity": ".perplexity",
    "token_perplexity": ".perplexity", "EvalResult": ".result", "binomial_stderr": ".result",
    "wilson_interval": ".result", "Prompt": ".scoring", "Score": ".scoring", "encode_prompt": ".scoring",
    "score_prompts": ".scoring", "TASKS": ".suite", "evaluate": ".suite", "parse_tasks": ".suite",
}

__all__ = [
    "EvalResult", "Prompt", "Score", "TASKS", "binomial_stderr", "encode_prompt", "evaluate", "evaluate_hellaswag",
    "evaluate_lambada", "hellaswag_items", "lambada_prompts", "parse_tasks", "preprocess", "score_prompts",
    "shard_perplexity", "token_perplexity", "wilson_interval",
]


# Imported on first use: `layerwise --help` must not import torch.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
