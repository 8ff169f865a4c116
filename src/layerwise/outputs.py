"""Where commands write: output folders checked before any work starts, and model folders written whole.

A model folder (a pruned model now, every transform's result later) is written into a temporary sibling and
renamed into place, as checkpoints are, so a crash or a full disk never leaves a folder holding half of a new
model, or new weights beside an old model's files. An existing non-empty folder is replaced only on request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse an output path that is an existing file (or sits below one) before a command does its work."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            where = "is a file" if candidate == path else f"lies inside {candidate}, which is a file"
            raise UserError(f"{option} {path} {where}, not a folder; pass a folder path")
        if candidate.is_dir():
            break
    return path


def check_model_destination(path: str | Path, overwrite: bool, option: str = "--out",
                            source: str | Path | None = None) -> Path:
    """Refuse, before loading anything, a destination that `write_model_folder` would refuse.

    `overwrite` replaces (and so deletes) only a model folder: one with a config.json that neither is nor holds
    the model being read. Any other non-empty folder (a parent of many models, a home folder, a package) is
    refused whatever the flag, so a typo in --out cannot delete what the user never meant to replace."""
    path = check_output_folder(path, option)
    if source is not None:
        where, src = path.resolve(), Path(source).resolve()
        if src == where or where in src.parents:
            raise UserError(f"{option} {path} is or contains the model being read ({source}); write the new model "
                            "to another folder")
    if not (path.is_dir() and any(path.iterdir())):
        return path
    if not overwrite:
        raise UserError(f"{option} {path}: folder is not empty (another model or run is there); choose a new "
                        "folder, or pass --overwrite to replace it")
    if not (path / "config.json").is_file():
        raise UserError(f"{option} {path}: --overwrite replaces only a model folder (one with a config.json), and "
                        "this folder holds none; choose a new or empty folder")
    return path


def write_model_folder(path: str | Path, save: Callable[[Path], object], overwrite: bool = False,
                       option: str = "--out") -> Path:
    """Call `save(folder)` on an empty temporary folder beside `path`, then rename that folder to `path`.

    An existing empty folder is taken over; a non-empty one needs `overwrite=True`, and is then renamed aside
    before the new folder moves in and deleted only after, so at every moment one complete model exists.
    On any failure the temporary folder is removed and `path` is as it was.
    """
    path = check_model_destination(path, overwrite, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        save(staging)
        for written in staging.rglob("*"):  # on disk before the rename makes them the model
            if written.is_file():
                with open(written, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.is_dir() and any(path.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
        old.rmdir()  # only its unique name is wanted: rename needs the target absent
        path.rename(old)
    elif path.is_dir():
        path.rmdir()
    staging.rename(path)
    fsync_folder(path.parent)
    if old is not None:
        shutil.rmtree(old)
    return path


def fsync_folder(path: Path) -> None:
    """Make a rename inside `path` durable (the folder entry itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
