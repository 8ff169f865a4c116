"""Owning a run folder: one writer at a time, and no run overwritten without being asked.

The lock is an OS advisory lock (`fcntl.flock`) on `<run>/run.lock`: the kernel drops it when the holder
exits for any reason, SIGKILL included, so a stale lock never needs cleaning by hand. The file's text (pid,
host, start time) only tells the refused process who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..runs import LOCK, RUN_FILES


class RunFolderLock:
    """Exclusive ownership of `folder` until `release()` (or the process's death)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.moved_aside: Path | None = None  # where a previous run went, when claim_run_folder moved it
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        # O_CREAT without O_TRUNC: the holder's record must survive a refused process opening the file.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(self.fd, 4096, 0).decode(errors="replace"))
            os.close(self.fd)
            raise UserError(f"{self.folder} is in use by another layerwise process ({holder}); wait for it to "
                            "finish, stop it, or choose another --out") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record.encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _describe_holder(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown: it had not yet written its record"


def holds_a_run(folder: Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def check_out_path(out: Path) -> None:
    """Refuse an --out that cannot become a run folder, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder; choose a folder path")


def claim_run_folder(out: Path, fresh: bool, overwrite: bool) -> RunFolderLock:
    """Lock `out` for this process. A fresh run into a folder that holds a run refuses, unless `overwrite`
    moves the old run aside to `<out>.old-<time>` (never deleted)."""
    lock = RunFolderLock(out)
    if not (fresh and holds_a_run(out)):
        return lock
    if not overwrite:
        lock.release()
        raise UserError(f"{out} already holds a run; continue it with --resume auto, or start over with "
                        "--overwrite (moves the old run aside)")
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    # The old folder moves with its lock still held, and the new one is locked before that is let go, so no
    # other process can slip in between.
    os.rename(out, aside)
    new_lock = RunFolderLock(out)
    lock.release()
    (aside / LOCK).unlink(missing_ok=True)
    new_lock.moved_aside = aside
    return new_lock


def clean_temporary_checkpoints(out: Path) -> None:
    """Temporary checkpoint folders are left only by a crash mid-write; under the lock none is in progress."""
    for tmp in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
