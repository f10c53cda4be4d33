"""Byte-range reads of many files at once, from local disk or a bucket, with a count of what was fetched.

`open_files(root)` gives `LocalFiles` for a local folder (os.pread on cached descriptors) or `UrlFiles` for a
URL (fsspec's `cat_ranges`: gcsfs issues the ranged GETs of one call concurrently on its event loop). Both
count requests and bytes in `stats`, which is how the tests assert what a resumed reader fetches.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Sequence

import fsspec

from dit_jax.utils import paths


class Stats:
    """Requests and bytes fetched so far (thread-safe counters)."""

    def __init__(self):
        self.requests = self.bytes = 0
        self._lock = threading.Lock()

    def add(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes}


class LocalFiles:
    """Ranges of files under a local folder; descriptors stay open (one per file) until close()."""

    def __init__(self, root: str):
        self.root, self.stats = root, Stats()
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, rel: str) -> int:
        with self._lock:
            if rel not in self._fds:
                self._fds[rel] = os.open(os.path.join(self.root, rel), os.O_RDONLY)
            return self._fds[rel]

    def read_ranges(self, rels: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> List[bytes]:
        out = []
        for rel, a, b in zip(rels, starts, ends):
            data = os.pread(self._fd(rel), b - a, a)
            if len(data) != b - a:
                raise OSError(f"{os.path.join(self.root, rel)}: short read ({len(data)} of {b - a} bytes at {a}); "
                              f"the file is truncated")
            out.append(data)
        self.stats.add(len(out), sum(map(len, out)))
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class UrlFiles:
    """Ranges of objects under a bucket URL through fsspec (gcsfs for gs://): one concurrent call per batch."""

    def __init__(self, root: str):
        self.root, self.stats = root.rstrip("/"), Stats()
        self.fs, _ = fsspec.core.url_to_fs(self.root)

    def read_ranges(self, rels: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> List[bytes]:
        urls = [f"{self.root}/{rel}" for rel in rels]
        out = self.fs.cat_ranges(urls, list(starts), list(ends), on_error="raise")
        for u, a, b, data in zip(urls, starts, ends, out):
            if len(data) != b - a:
                raise OSError(f"{u}: short read ({len(data)} of {b - a} bytes at {a}); the object is truncated")
        self.stats.add(len(out), sum(map(len, out)))
        return out

    def close(self) -> None:
        pass


def open_files(root: paths.PathLike):
    """LocalFiles or UrlFiles for the folder or URL `root`."""
    text = os.fspath(paths.as_path(root))
    return UrlFiles(text) if paths.is_url(text) else LocalFiles(text)
