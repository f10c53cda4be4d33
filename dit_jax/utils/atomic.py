"""Atomic writes: readers (and a rerun after a kill) see either nothing at the target or a complete file/folder.

Local disk: temporary names sit beside the target (same folder, so the final rename is atomic) and carry
the writer's pid: `.NAME.<pid>-<random>.tmp`. A writer killed with SIGKILL cannot remove its temporary, so
the next write to the same target removes leftovers whose process is gone.

Bucket URL (gs://...): an object appears only when its upload is complete, so a file is written to a local
temporary and uploaded as one object. A folder is a name prefix and cannot be renamed, so it is written in
place, marked: the object `OUT/.dit_jax-incomplete` is written first and deleted last. A folder that still
holds the marker was interrupted (a killed writer cannot delete it); readers refuse it (`check_complete`) and
a new write asks for --overwrite. On a bucket --overwrite deletes the old folder before writing the new one.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
import time
import uuid
from typing import Iterator

from etils import epath

from dit_jax.utils import paths
from dit_jax.utils.errors import DitJaxError

INCOMPLETE_MARKER = ".dit_jax-incomplete"


class IncompleteOutputError(DitJaxError, ValueError):
    """A bucket folder whose write was interrupted (it still holds INCOMPLETE_MARKER)."""


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


def remove_stale_temps(path: paths.PathLike) -> list:
    """Delete `.NAME.<pid>-*.tmp` leftovers of a local `path` whose writer process no longer exists; -> removed
    paths (none for a URL: bucket writes leave no temporaries beside the target)."""
    if paths.is_url(path):
        return []
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*-*.tmp")):
        pid = os.path.basename(tmp)[len(base) + 2:].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
        removed.append(tmp)
    return removed


def is_incomplete(folder: paths.PathLike) -> bool:
    """True for a bucket folder whose write did not finish (local folders appear by rename: never)."""
    return paths.is_url(folder) and (paths.as_path(folder) / INCOMPLETE_MARKER).exists()


def check_complete(folder: paths.PathLike) -> None:
    """Refuse a folder output whose write was interrupted (see the module docstring)."""
    if is_incomplete(folder):
        raise IncompleteOutputError(f"{paths.display(folder)}: incomplete, its write was interrupted "
                                    f"({INCOMPLETE_MARKER} is still there); write it again with --overwrite")


def check_target(out: paths.PathLike, overwrite: bool) -> None:
    """Refuse (before any work) an existing `out` unless overwrite, and a missing local parent folder."""
    target = paths.as_path(out)
    shown = paths.display(out)
    if (os.path.lexists(target) if not paths.is_url(target) else target.exists()) and not overwrite:
        why = " (an interrupted write)" if is_incomplete(target) else ""
        raise FileExistsError(f"{shown} already exists{why}; remove it or pass --overwrite (overwrite=True)")
    if not paths.is_url(target):  # bucket folders are name prefixes: they need no parent
        parent = os.path.dirname(os.fspath(target))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{shown}: the parent directory {parent} does not exist")


@contextlib.contextmanager
def atomic_path(path: paths.PathLike) -> Iterator[str]:
    """Yields a local temporary file name; it becomes `path` (a local path or a bucket URL) only if the block
    succeeds and is removed otherwise. A local folder is created if needed; the caller opens the name (normal
    permissions, unlike mkstemp)."""
    target = paths.as_path(path)
    if paths.is_url(target):
        with tempfile.TemporaryDirectory(prefix="dit_jax-upload-") as d:
            tmp = os.path.join(d, target.name)
            yield tmp
            paths.upload(tmp, target)
        return
    path = os.fspath(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: paths.PathLike, data: bytes) -> None:
    """`data` at `path` (local or bucket) atomically."""
    target = paths.as_path(path)
    if paths.is_url(target):
        paths.write_object(target, data)
        return
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: paths.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(out: paths.PathLike, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields the folder to write into; `out` holds its content only if the block succeeds.

    Local: a new temporary folder beside `out` that replaces `out` at the end. Bucket: `out` itself, marked
    incomplete while the block runs (module docstring); on an error the partial folder is deleted."""
    check_target(out, overwrite)
    target = paths.as_path(out)
    if paths.is_url(target):
        if target.exists():  # overwrite: folders cannot be swapped on a bucket
            target.rmtree()
        paths.write_object(target / INCOMPLETE_MARKER,
                           f"written by {socket.gethostname()} pid {os.getpid()} at {time.time():.0f}\n".encode())
        try:
            yield target
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: what stays is still marked incomplete
                target.rmtree()
            raise
        (target / INCOMPLETE_MARKER).unlink()
        return
    out = os.fspath(target)
    remove_stale_temps(out)
    tmp = _temp_name(out)
    os.makedirs(tmp)
    try:
        yield epath.Path(tmp)
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
