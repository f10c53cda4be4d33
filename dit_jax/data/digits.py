"""scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16): the embedded default data set.

No download. Pixels map to [-1, 1] (x / 8 - 1); `image_size` 16 upsamples 2x by pixel repetition. The data
set is held in memory and served through dit_jax.data.source.IndexedSource like every other source (same
epoch order, same per-process slices), as {"x": (n, S, S, 1) float32, "y": int32}.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Dict, Tuple

import numpy as np

from dit_jax.utils.errors import DataError


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float64 0..16, labels (N,)) of scikit-learn's bundled digits, read from its 57 KB
    digits.csv.gz without importing scikit-learn: the import (SciPy with it) cost every training start ~0.8
    CPU seconds. load_digits reads the same file (rows of 64 pixels and the label); it is the fallback where
    the file is not there, and raises the usual ImportError without scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as f:
                rows = np.loadtxt(f, delimiter=",")  # (N, 65)
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    from sklearn.datasets import load_digits  # data-stack extra (scikit-learn), absent on a sampling-only box

    d = load_digits()
    return d.images, d.target


def load_digits_nhwc(image_size: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """-> (images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32)."""
    if image_size < 8 or image_size % 8:
        raise DataError(f"digits: data.image_size must be a positive multiple of 8, got {image_size}")
    images, labels = _sklearn_digits()
    x = images.astype(np.float32) / 8.0 - 1.0  # (N, 8, 8)
    r = image_size // 8
    x = np.repeat(np.repeat(x, r, axis=1), r, axis=2)
    return x[..., None], labels.astype(np.int32)


class DigitsReader:
    """Random access to the in-memory digits: read(i) -> {"x": (S, S, 1) float32, "y": int}."""

    num_classes = 10

    def __init__(self, image_size: int = 8):
        self.images, self.labels = load_digits_nhwc(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> Dict[str, object]:
        return {"x": self.images[i], "y": int(self.labels[i])}

    def describe(self, i: int) -> str:
        return f"digits example {i}"
