"""A folder of class sub-folders (the release's ImageFolder input): DIR/<class>/<image>, local or in a bucket."""
from __future__ import annotations

import os

import fsspec
import numpy as np

from dit_jax.data.preprocess import IMAGE_EXTENSIONS, preprocess
from dit_jax.utils import paths
from dit_jax.utils.errors import DataError


def _walk(root: str):
    """[(folder, file names)] below root, sorted by folder like the release's `sorted(os.walk(...))`."""
    if not paths.is_url(root):
        return [(d, files) for d, _, files in sorted(os.walk(root, followlinks=True))]
    fs, path = fsspec.core.url_to_fs(root)
    scheme = root.split("://", 1)[0]
    return sorted((f"{scheme}://{d}", files) for d, _, files in fs.walk(path))  # fsspec drops the scheme


def list_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels int32 (N,), class names), in the release's order; root may be a local path or a URL.

    Classes are the sorted sub-folder names (label = position); files are walked recursively in sorted
    order and kept when their extension (any case) is an image extension.
    """
    if not root:
        raise DataError("data.folder is empty: set it to a directory of class sub-folders (DIR/<class>/<image>)")
    base = paths.as_path(root)
    root = os.fspath(base) if paths.is_url(root) else os.fspath(root)
    if not base.is_dir():
        raise DataError(f"image folder {root!r} does not exist or is not a directory; expected "
                        f"{root}/<class name>/<image files>")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root!r} has no class sub-folders; put the images in "
                        f"{root}/<class name>/ (one sub-folder per class, labels follow their sorted names)")
    paths_out, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for dirpath, files in _walk(f"{root}/{name}" if paths.is_url(root) else os.path.join(root, name)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths_out.append(f"{dirpath}/{f}" if paths.is_url(root) else os.path.join(dirpath, f))
                    labels.append(label)
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        raise DataError(f"image folder {root!r}: class sub-folder(s) {empty[:5]} contain no image files "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove them or add images")
    return paths_out, np.asarray(labels, np.int32), classes


class FolderReader:
    """Random access to a class folder: read(i) -> {"pixels": uint8 (S, S, 3), "y"}."""

    def __init__(self, root: str, image_size: int):
        self.root, self.image_size = root, int(image_size)
        self.paths, self.labels, self.classes = list_folder(root)
        self.url = paths.is_url(root)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> dict:
        p = self.paths[i]
        data = paths.as_path(p).read_bytes() if self.url else p  # a bucket object is fetched whole, then decoded
        return {"pixels": preprocess(data, self.image_size), "y": int(self.labels[i])}

    def describe(self, i: int) -> str:
        return self.paths[i]
