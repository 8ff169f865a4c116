"""The model card (README.md) in every model folder layerwise writes: a training checkpoint, a transformed,
pruned or quantized model, a remove-norms export. One renderer for all of them; each writer gathers its own
facts (base model, recipe or steps, data and tokens) and, when it knows them at write time, evaluation figures.

A card is written once, with the folder. Nothing rewrites it afterwards: `layerwise eval` on a folder writes
its eval.json to its own --out and leaves the model folder (and its card) as the user has it, so a card's
evaluation table holds exactly the figures its writer measured (a training run's held-out loss at that step,
a prune plan's calibration loss), never ones added later.

Text that comes from files, configs or the command line (paths, preset names, data folders) is escaped, so a
name holding `*`, `|`, `<` or a newline shows as written and cannot restructure the card.
"""

from __future__ import annotations

import datetime
import math
import re

# The punctuation that means something inside a line (emphasis, code, links, HTML, entities, table cells,
# headings); escaped text never starts a line, so list markers ("-", "1.") need no escape.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]<>#&|~])")


def escaped(text: object) -> str:
    """`text` as literal Markdown: punctuation backslash-escaped, line breaks as spaces."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).splitlines()))


def code(text: object) -> str:
    """`text` as an inline code span: a path or step shows verbatim (a fence longer than any run of backticks
    inside it, so none closes it early; line breaks as spaces)."""
    text = " ".join(str(text).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _figure(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if math.isnan(value) or abs(value) < 1e4 else f"{value:.4g}"


def render_card(title: str, facts: list[tuple[str, str]], evaluation: dict[str, float] | None = None,
                evaluation_note: str = "", loading: list[str] = ()) -> str:
    """The card's Markdown. `title` and `facts` ((label, value) pairs, one bullet each) are Markdown already
    (use `escaped` / `code` on what came from outside); `evaluation` ({measure: number}) becomes a table under
    `evaluation_note` (what was measured on which data), and `loading` the lines of the "Loading" section."""
    lines = [f"# {title}", ""]
    lines += [f"- {label}: {value}" for label, value in facts]
    lines.append(f"- written: {datetime.date.today().isoformat()}")
    if evaluation:
        lines += ["", "## Evaluation", ""]
        if evaluation_note:
            lines += [evaluation_note, ""]
        lines += ["| measure | value |", "|---|---:|"]
        lines += [f"| {escaped(name)} | {_figure(value)} |" for name, value in evaluation.items()]
    if loading:
        lines += ["", "## Loading", "", *loading]
    return "\n".join(lines) + "\n"


def hf_loading(family: str) -> list[str]:
    """The "Loading" lines of a float model folder (model.safetensors + config.json)."""
    load = "from transformers import AutoModelForCausalLM"
    if family == "layerwise":
        load = "import layerwise  # registers model_type \"layerwise\" with the Auto classes\n" + load
    return ["```python", load, "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")", "```", "",
            "`layerwise eval` and `layerwise diagnose` score and inspect this folder like any other model."]
