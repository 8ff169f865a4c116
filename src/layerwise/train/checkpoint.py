"""Checkpoints that survive a kill at any moment and never need unpickling.

A checkpoint is a folder `checkpoints/step_XXXXXXX/` holding
  model.safetensors + config.json   the model, loadable by AutoModelForCausalLM.from_pretrained
  adapter.safetensors               LoRA runs only: the adapters, which model.safetensors holds merged in
  optimizer.safetensors             AdamW moments and step counts, keyed by parameter name
  rng.safetensors                   torch RNG states
  trainer_state.json                step, tokens, counters, optimizer hyperparameters, the train config
  README.md                         the model card: base model, recipe, data, tokens, held-out loss if measured
  MANIFEST.json                     sha256 and size of every file above, written last
It is written into a temporary folder and renamed into place, so a folder with a valid MANIFEST is complete.
A failed write (a full disk) removes its temporary folder and leaves the earlier checkpoints as they were.
Corrupt checkpoints are never deleted and never counted as kept: they move to `checkpoints/corrupt/`.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..outputs import fsync_folder
from ..runs import (MANIFEST, PREFIX, CorruptCheckpoint, latest_valid_checkpoint, list_checkpoints, sha256_of,
                    verify_checkpoint)

__all__ = ["CorruptCheckpoint", "latest_valid_checkpoint", "list_checkpoints", "load_checkpoint", "move_aside",
           "save_checkpoint", "verify_checkpoint"]
CORRUPT = "corrupt"
ADAPTER = "adapter.safetensors"
LORA_MARK = ".lora_"  # in the name of every LoRA adapter tensor peft adds


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model, optimizer) -> tuple[dict, dict, list]:
    """Full (unsharded) model weights, optimizer tensors keyed "<param name>/<key>" and JSON-able param
    groups, via torch.distributed.checkpoint's state-dict API, which handles plain, DDP and FSDP2 models
    alike. Under FSDP2 every process must call this (it gathers shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_state_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    if "state" not in optim_state:  # with cpu_offload only rank 0 receives the full state
        return weights, {}, []
    tensors = {}
    for name, entry in optim_state["state"].items():
        for key, value in entry.items():
            tensors[f"{name}/{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return weights, tensors, optim_state["param_groups"]


def restore_state(model, optimizer, weights: dict, tensors: dict, groups: list) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # A LoRA model restores its adapters alone: its frozen base is the init model, loaded and verified anew.
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 strict=not is_lora(model)))
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=_full_state_options())


def save_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, keep: int,
                    is_main: bool = True, card: str | None = None) -> Path | None:
    """Write checkpoint `step` atomically under root/checkpoints and keep it plus the newest keep-1 valid others;
    `card` is its README.md (`layerwise.train.card`). Every process calls it; only the main process writes."""
    weights, opt_tensors, groups = gather_state(model, optimizer)
    if not is_main:
        return None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to write a checkpoint with non-finite values in {name}")
    ckpt_dir = root / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, step, model, weights, opt_tensors, groups, trainer_state, card)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full writing checkpoint {final.name} in {ckpt_dir}; the earlier "
                                        "checkpoints are intact: free space, then rerun with --resume auto") from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_folder(ckpt_dir)
    _retain(root, final, keep)
    return final


def _write_files(tmp: Path, step: int, model, weights, opt_tensors, groups, trainer_state, card) -> None:
    tmp.mkdir()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per checkpoint would drown the training progress
    if is_lora(model):
        # The saved model is the healed model users load: the base with the adapters merged in. The adapters
        # themselves are kept apart, for a resume.
        save_file({k: v.contiguous() for k, v in weights.items() if LORA_MARK in k}, tmp / ADAPTER)
        model = copy.deepcopy(model).merge_and_unload()
        weights = model.state_dict()
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in opt_tensors.items()}, tmp / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "optimizer_groups": groups}, indent=1))
    if card is not None:  # before the manifest, which then covers it like the weights
        (tmp / "README.md").write_text(card)
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())


def _retain(root: Path, written: Path, keep: int) -> None:
    """Keep `written` and the newest keep-1 other checkpoints that verify; delete older valid ones.
    Candidates are verified newest first, so a corrupt one is set aside instead of taking a kept slot."""
    kept = 1
    for path in reversed(list_checkpoints(root)):
        if path == written:
            continue
        if kept < keep:
            try:
                verify_checkpoint(path)
                kept += 1
            except CorruptCheckpoint as err:
                move_aside(path, err)
        else:
            shutil.rmtree(path, ignore_errors=True)


def move_aside(path: Path, why: Exception) -> Path:
    """Move a corrupt checkpoint to checkpoints/corrupt/ (kept for inspection, out of every listing)."""
    target_dir = path.parent / CORRUPT
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / path.name, 1
    while target.exists():
        target, n = target_dir / f"{path.name}-{n}", n + 1
    os.rename(path, target)
    warnings.warn(f"corrupt checkpoint moved to {target}: {why}", stacklevel=2)
    return target


def is_lora(model) -> bool:
    return hasattr(model, "merge_and_unload")  # a peft model


def _fill_tied(model, weights: dict) -> None:
    """save_pretrained writes one of each group of tied tensors (e.g. the head tied to the embedding, under
    any family's names); the model's state dict names them all."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    for names in names_of.values():
        present = next((n for n in names if n in weights), None)
        if present is not None:
            for name in names:
                weights.setdefault(name, weights[present])


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from a verified checkpoint; returns the trainer state."""
    verify_checkpoint(path)
    if is_lora(model):
        weights = load_file(path / ADAPTER)
        expected = {name for name in model.state_dict() if LORA_MARK in name}
    else:
        weights = load_file(path / "model.safetensors")
        _fill_tied(model, weights)
        expected = set(model.state_dict())
    if set(weights) != expected:
        raise CorruptCheckpoint(f"{path}: weights do not match the model (missing {sorted(expected - set(weights))}, "
                                f"unexpected {sorted(set(weights) - expected)})")
    state = json.loads((path / "trainer_state.json").read_text())
    restore_state(model, optimizer, weights, load_file(path / "optimizer.safetensors"), state["optimizer_groups"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
