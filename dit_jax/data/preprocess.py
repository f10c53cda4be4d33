"""Image preprocessing of the DiT release (ADM centre crop, horizontal flip, [-1, 1]) and deterministic flips.

Only NumPy and PIL here: the GPU box (no tensorflow) can import this module.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The file extensions the release's ImageFolder accepts (torchvision's IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop as in the DiT release: uint8 (image_size, image_size, C).

    Halve with a box filter while the short side is at least twice the target (better than one big
    bicubic step), then bicubic-resize so the short side equals the target, then cut the centre.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    ratio = image_size / min(image.size)
    new_size = (round(image.size[0] * ratio), round(image.size[1] * ratio))
    image = image.resize(new_size, resample=Image.BICUBIC)
    pixels = np.asarray(image)  # (H, W, C) uint8
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return pixels[top:top + image_size, left:left + image_size]


def open_rgb(source) -> Image.Image:
    """Decode a path, bytes or (H, W[, C]) uint8 array into a fully loaded RGB PIL image.

    Raises whatever PIL raises on a corrupt file (the readers catch it and skip the example).
    """
    if isinstance(source, np.ndarray):
        arr = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        return Image.fromarray(arr).convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im.load()  # force the full decode now so a truncated file fails here, not later
        return im.convert("RGB")


def preprocess(source, image_size: int) -> np.ndarray:
    """Decode + centre crop: uint8 (image_size, image_size, 3). Flip and scaling are applied per batch."""
    return center_crop(open_rgb(source), image_size)


def flip_mask(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """bool (global_batch_size,): which examples of the global batch of `step` are mirrored.

    A function of (seed, step, position in the global batch) only, so it does not depend on the number
    of processes, and the image and the pre-extracted latent sources flip the same examples.
    """
    rng = np.random.default_rng([int(seed), int(step), 0xF11B])
    return rng.random(global_batch_size) < 0.5
