"""Image conversions and PNG output: the one home of the [-1, 1] <-> uint8 mapping and of image grids.

The functions take NumPy or JAX arrays and return the same kind, so they work inside jitted code too.
"""
from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dit_jax.utils import paths
from dit_jax.utils.atomic import write_bytes


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def to_model_range(pixels):
    """uint8 (..., H, W, C) -> float32 in [-1, 1] (the release's ToTensor + Normalize(0.5, 0.5))."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def to_uint8(images):
    """float images in [-1, 1] -> uint8 [0, 255], clamped and rounded like torchvision's save_image
    (`clamp(127.5 * x + 128, 0, 255)` truncated)."""
    xp = _xp(images)
    return xp.clip(127.5 * images + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int = 4, padding: int = 2, pad_value: int = 0,
              upscale: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*(H'+p)+p, cols*(W'+p)+p, C) image with `nrow` images per row
    (torchvision's layout); each image is first enlarged `upscale` times by pixel repetition (H' = upscale*H),
    cells are separated by `padding` pixels of `pad_value`."""
    images = np.asarray(images, np.uint8)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} -> PNG bytes."""
    arr = np.asarray(image, np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: paths.PathLike) -> None:
    """Writes a uint8 (H, W, C) PNG atomically to a local path or a bucket URL (dit_jax.utils.atomic)."""
    write_bytes(path, png_bytes(image))
