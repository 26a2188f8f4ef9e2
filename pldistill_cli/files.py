"""Atomic writes: a reader (or a killed run) sees the old file or folder or the new one, never half of one.

Temporary names are hidden siblings (`.NAME.pldistill-tmp`), so a leftover of a killed run is
recognisably ours and is the only thing ever removed besides the folder being replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def temporary(path: Path) -> Path:
    """The hidden sibling a new version of `path` is written to first."""
    return path.with_name(f".{path.name}.pldistill-tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    """Sorted keys and a trailing newline: the same data always gives the same bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fresh_folder(folder: Path) -> Path:
    """An empty hidden sibling to build a new version of `folder` in (a leftover of ours is cleared)."""
    tmp = temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def usual_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_folder(tmp: Path, folder: Path) -> None:
    """Swap the finished `tmp` in for `folder` (the caller owns `folder`: it was written by this
    program, or does not exist). The old version is moved aside first, then removed. Safetensors files
    get the user's usual mode first: safetensors >= 0.8 writes them 0600 whatever the umask
    (huggingface/safetensors#782)."""
    for file in tmp.rglob("*.safetensors"):
        file.chmod(usual_mode())
    old = folder.with_name(f".{folder.name}.pldistill-old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock while a stage writes what it owns; a second run stops at once, saying so,
    instead of racing the first (the lock is released when the process ends, however it ends)."""
    from filelock import FileLock, Timeout

    from .errors import PldistillError

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PldistillError(f"another {what} is running (it holds {lock.lock_file}); wait for it to finish, "
                             "then re-run") from None
    try:
        yield
    finally:
        lock.release()
