"""Atomic writes: readers (and a rerun after a kill) see either nothing at the target or a complete file/folder.

Temporary names sit beside the target (same folder, so the final rename is atomic) and carry the writer's
pid: `.NAME.<pid>-<random>.tmp`. A writer killed with SIGKILL cannot remove its temporary, so the next
write to the same target removes leftovers whose process is gone.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from typing import Iterator


def _temp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: str) -> list:
    """Delete `.NAME.<pid>-*.tmp` leftovers of `path` whose writer process no longer exists; -> removed paths."""
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*-*.tmp")):
        pid = os.path.basename(tmp)[len(base) + 2:].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
        removed.append(tmp)
    return removed


def check_target(out: str, overwrite: bool) -> None:
    """Refuse (before any work) an existing `out` unless overwrite, and a missing parent folder."""
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or pass --overwrite (overwrite=True)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{out}: the parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary file name beside `path`; it becomes `path` only if the block succeeds and is removed
    otherwise. The folder is created if needed; the caller opens the name (normal permissions, unlike mkstemp)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a new temporary folder beside `out`; it replaces `out` only if the block succeeds."""
    check_target(out, overwrite)
    out = os.path.abspath(out)
    remove_stale_temps(out)
    tmp = _temp_name(out)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(out):  # overwrite: move the old one aside first, drop it after the swap
            old = _temp_name(out)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
        else:
            os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
