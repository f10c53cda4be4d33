"""Atomic file writes: readers (and a rerun after a kill) see either no file or a complete one."""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary name beside `path` (same folder, so the rename is atomic); it becomes `path` only if
    the block succeeds and is removed otherwise. The folder is created if needed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A unique name per call (processes and threads may write beside each other); opened by the caller
    # with normal permissions, unlike mkstemp's 0600.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
