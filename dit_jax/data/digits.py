"""scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16): the embedded default data set.

No download. Pixels map to [-1, 1] (x / 8 - 1); `image_size` 16 upsamples 2x by pixel repetition. The data
set is held in memory and served through dit_jax.data.source.IndexedSource like every other source (same
epoch order, same per-process slices), as {"x": (n, S, S, 1) float32, "y": int32}.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from dit_jax.utils.errors import DataError


def load_digits_nhwc(image_size: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """-> (images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32)."""
    from sklearn.datasets import load_digits  # data-stack extra (scikit-learn), absent on a sampling-only box

    if image_size < 8 or image_size % 8:
        raise DataError(f"digits: data.image_size must be a positive multiple of 8, got {image_size}")
    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0  # (N, 8, 8)
    r = image_size // 8
    x = np.repeat(np.repeat(x, r, axis=1), r, axis=2)
    return x[..., None], d.target.astype(np.int32)


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
