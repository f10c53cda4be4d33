"""scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16) as a training source.

No download. Pixels map to [-1, 1] (x / 8 - 1); `image_size` 16 upsamples 2x by pixel repetition.
Follows the data contract of dit_jax.data: `batch(step)` is this process's slice of the global batch of
training step `step`, a pure function of (seed, step), so resumed and multi-process runs see the same data.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def load_digits_nhwc(image_size: int = 8):
    """-> (images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32)."""
    from sklearn.datasets import load_digits  # local: sklearn is a data-stack dependency

    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0  # (N, 8, 8)
    if image_size % 8:
        raise ValueError(f"digits: data.image_size must be a multiple of 8, got {image_size}")
    r = image_size // 8
    x = np.repeat(np.repeat(x, r, axis=1), r, axis=2)
    return x[..., None], d.target.astype(np.int32)


class DigitsSource:
    """Epoch-wise shuffled digits; position p of the data stream is permutation_{p // N}[p % N]."""

    def __init__(self, data_cfg, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 seed: int = 0):
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        self.images, self.labels = load_digits_nhwc(int(data_cfg.image_size))
        self.num_examples = len(self.labels)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = int(seed)
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows of the global batch of `step`."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        pos = start + np.arange(self.local_batch_size)
        n = self.num_examples
        return np.array([self._perm(int(p // n))[p % n] for p in pos], dtype=np.int64)

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        idx = self.indices(step)
        return {"x": self.images[idx], "y": self.labels[idx]}  # (n, S, S, 1) float32, (n,) int32

    def close(self) -> None:
        pass
