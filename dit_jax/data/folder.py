"""A folder of class sub-folders (the release's ImageFolder input): DIR/<class>/<image>."""
from __future__ import annotations

import os

import numpy as np

from dit_jax.data.preprocess import IMAGE_EXTENSIONS, preprocess
from dit_jax.utils.errors import DataError


def list_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels int32 (N,), class names), in the release's order.

    Classes are the sorted sub-folder names (label = position); files are walked recursively in sorted
    order and kept when their extension (any case) is an image extension.
    """
    if not root:
        raise DataError("data.folder is empty: set it to a directory of class sub-folders (DIR/<class>/<image>)")
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory; expected "
                        f"{root}/<class name>/<image files>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"image folder {root!r} has no class sub-folders; put the images in "
                        f"{root}/<class name>/ (one sub-folder per class, labels follow their sorted names)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
                    found += 1
        if not found:
            empty.append(name)
    if empty:
        raise DataError(f"image folder {root!r}: class sub-folder(s) {empty[:5]} contain no image files "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove them or add images")
    return paths, np.asarray(labels, np.int32), classes


class FolderReader:
    """Random access to a class folder: read(i) -> {"pixels": uint8 (S, S, 3), "y"}."""

    def __init__(self, root: str, image_size: int):
        self.root, self.image_size = root, int(image_size)
        self.paths, self.labels, self.classes = list_folder(root)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> dict:
        return {"pixels": preprocess(self.paths[i], self.image_size), "y": int(self.labels[i])}

    def describe(self, i: int) -> str:
        return self.paths[i]
