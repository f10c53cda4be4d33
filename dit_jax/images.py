"""Image grids for sample previews (dit-jax-sample, training sample grids)."""
from __future__ import annotations

import math

import numpy as np


def make_grid(images: np.ndarray, nrow: int = 4, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+p)+p, cols*(W+p)+p, C) image with `nrow` images per row
    (torchvision's layout); cells are separated by `padding` pixels of `pad_value`."""
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid
