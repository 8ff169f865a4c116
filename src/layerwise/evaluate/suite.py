"""Run several evaluation tasks on one in-memory model: what `layerwise eval` does, callable from Python on
a model that was just modified (layers dropped, re-normed, quantized...)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .hellaswag import evaluate_hellaswag
from .lambada import evaluate_lambada
from .perplexity import shard_perplexity
from .result import EvalResult
from .scoring import Progress

TASKS = ("perplexity", "lambada", "hellaswag")


def parse_tasks(text: str) -> list[str]:
    """"lambada, hellaswag" -> ["lambada", "hellaswag"], each name checked."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks {text!r}: unknown task {', '.join(unknown) or '(none given)'}; "
                         f"valid tasks: {', '.join(TASKS)}")
    return names


def evaluate(model, tokenizer, tasks: Sequence[str] = ("lambada", "hellaswag"), *, limit: int | None = None,
             batch_size: int = 32, data: str | Path | None = None, seq_len: int | None = None,
             windows_per_batch: int = 1,
             progress: Callable[[str], Progress | None] | None = None) -> dict[str, EvalResult]:
    """task name -> EvalResult. `limit` takes the first N items of each task (N windows for perplexity);
    `batch_size` is sequences per forward for LAMBADA/HellaSwag; `data` is the token shard for perplexity;
    `progress(task)` may return a (done, total) callback for that task."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}; valid tasks: {', '.join(TASKS)}")
    if "perplexity" in tasks and data is None:
        raise ValueError("the perplexity task needs a token shard (--data) made with this model's tokenizer")
    if tokenizer is None and any(t != "perplexity" for t in tasks):
        raise ValueError("lambada and hellaswag need the model's tokenizer, and none was found next to the model")
    results = {}
    for task in tasks:
        report = progress(task) if progress is not None else None
        if task == "perplexity":
            results[task] = shard_perplexity(model, data, seq_len, windows_per_batch, limit, report)
        elif task == "lambada":
            results[task] = evaluate_lambada(model, tokenizer, limit, batch_size, report)
        else:
            results[task] = evaluate_hellaswag(model, tokenizer, limit, batch_size, report)
    return results
