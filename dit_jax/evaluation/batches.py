"""What an evaluation reads and writes: ADM `.npz` batches, image folders, and FID statistics files.

    batch = open_batch("samples.npz")      # or a folder of images; -> Batch(images, stats, name)
    batch.images                           # an ImageSource (len, read(start, stop) -> uint8 NHWC) or None
    batch.stats                            # Stats(mu, sigma, mu_s, sigma_s) stored in the file, or None
    save_stats("ref_stats.npz", stats)     # float64 mu, sigma, mu_s, sigma_s; written atomically

ADM's format: `arr_0` uint8 (N, H, W, 3) (what dit-jax-sample-many writes), optionally with the reference
statistics `mu`, `sigma` (pool_3, 2048) and `mu_s`, `sigma_s` (spatial, 2023), as in ADM's reference
batches (VIRTUAL_imagenet256_labeled.npz). arr_0 is streamed from the zip member in batches, so a 50,000-image
file is never in memory whole. A folder: every image file below it (recursively, sorted paths), RGB, all of
one size. Paths may be local or bucket URLs (gs://...). Every problem is an EvalInputError whose message names
the file and what was expected.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from dit_jax.data.preprocess import IMAGE_EXTENSIONS
from dit_jax.evaluation.inception import POOL_DIM, SPATIAL_DIM
from dit_jax.utils import paths
from dit_jax.utils.atomic import atomic_path
from dit_jax.utils.errors import DitJaxError

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STATS_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
                "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
ADM_FORMAT = "ADM's format: arr_0 uint8 (N, H, W, 3) images and/or mu, sigma, mu_s, sigma_s statistics"


class EvalInputError(DitJaxError, ValueError):
    """A batch, folder or statistics file that cannot be evaluated; the message names it and the problem."""


@dataclass
class Stats:
    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,)
    sigma_s: np.ndarray  # (2023, 2023)


@dataclass
class Batch:
    name: str
    images: Optional[object]  # ImageSource
    stats: Optional[Stats]

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)


def _check_image_shape(shape: tuple, dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8:
        raise EvalInputError(f"{where} has dtype {dtype}; expected uint8 images in [0, 255] ({ADM_FORMAT})")
    if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
        raise EvalInputError(f"{where} holds grayscale images of shape {shape}; the Inception network needs RGB "
                             f"(N, H, W, 3): convert them to 3 channels first")
    if len(shape) != 4 or shape[-1] != 3:
        raise EvalInputError(f"{where} has shape {shape}; expected (N, H, W, 3) RGB images ({ADM_FORMAT})")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise EvalInputError(f"{where} has shape {shape}: no images")


class NpzImages:
    """Streams `arr_0` of an .npz (stored or deflated) in batches; only the header is read up front."""

    def __init__(self, path: paths.PathLike):
        self.path = os.fspath(path)
        with paths.as_path(path).open("rb") as raw, zipfile.ZipFile(raw) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran:
            raise EvalInputError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
        _check_image_shape(tuple(shape), dtype, f"{path}: arr_0")
        self.shape, self.dtype = tuple(shape), dtype
        self.image_bytes = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        with paths.as_path(self.path).open("rb") as raw, zipfile.ZipFile(raw) as z, z.open("arr_0.npy") as f:
            f.seek(self.offset + start * self.image_bytes)
            want = (stop - start) * self.image_bytes
            data = f.read(want)
        if len(data) != want:
            raise EvalInputError(f"{self.path}: arr_0 is truncated (images {start}..{stop} missing)")
        return np.frombuffer(data, np.uint8).reshape((stop - start,) + self.shape[1:])


class FolderImages:
    """Every image file below a folder (sorted, recursive), read as RGB uint8; all must share one size."""

    def __init__(self, root: paths.PathLike):
        self.root = os.fspath(root)
        self.paths: List[str] = [os.fspath(p) for p in paths.files_below(root)
                                 if p.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.paths:
            raise EvalInputError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        self.size = self._load(0).shape

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            with paths.as_path(path).open("rb") as f, Image.open(f) as im:
                im.load()
                if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                    raise EvalInputError(f"{path}: grayscale image (mode {im.mode}); the Inception network needs RGB "
                                         f"images: convert the folder to RGB first")
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            if isinstance(e, EvalInputError):
                raise
            raise EvalInputError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
        if hasattr(self, "size") and arr.shape != self.size:
            raise EvalInputError(f"{path}: size {arr.shape[1]}x{arr.shape[0]}, but {self.paths[0]} is "
                                 f"{self.size[1]}x{self.size[0]}; every image of a folder must have one size")
        return arr

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._load(i) for i in range(start, min(stop, len(self)))])


def _stats_from(data: Dict[str, np.ndarray], where: str) -> Optional[Stats]:
    present = [k for k in STATS_KEYS if k in data]
    if not present:
        return None
    missing = [k for k in STATS_KEYS if k not in data]
    if missing:
        raise EvalInputError(f"{where}: has {', '.join(present)} but not {', '.join(missing)}; FID statistics need "
                             f"all of {', '.join(STATS_KEYS)}")
    out = {}
    for k in STATS_KEYS:
        a = np.asarray(data[k])
        if a.shape != STATS_SHAPES[k] or a.dtype.kind != "f":
            raise EvalInputError(f"{where}: {k} has shape {a.shape} and dtype {a.dtype}; expected floats of shape "
                                 f"{STATS_SHAPES[k]} (pool_3: 2048, spatial: 2023)")
        out[k] = a.astype(np.float64)
    return Stats(**out)


def open_batch(path: paths.PathLike) -> Batch:
    """An ADM .npz (images and/or statistics) or a folder of images; local or on a bucket."""
    where = paths.as_path(path)
    path = os.fspath(path)
    if where.is_dir():
        return Batch(path, FolderImages(path), None)
    if not where.exists():
        raise EvalInputError(f"{path}: no such file or folder (expected an ADM .npz batch or a folder of images)")
    try:
        with where.open("rb") as raw, zipfile.ZipFile(raw) as z:
            members = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise EvalInputError(f"{path}: not an .npz file ({e}); expected {ADM_FORMAT}") from None
    with where.open("rb") as raw, np.load(raw, allow_pickle=False) as data:
        stats = _stats_from({k: data[k] for k in STATS_KEYS if k in members}, path)
    images = NpzImages(path) if "arr_0" in members else None
    if images is None and stats is None:
        raise EvalInputError(f"{path}: no arr_0 (keys: {', '.join(members) or 'none'}); expected {ADM_FORMAT}")
    return Batch(path, images, stats)


def save_stats(path: paths.PathLike, stats: Stats) -> str:
    """mu, sigma, mu_s, sigma_s (float64) to an .npz, atomically (nothing is left at `path` on failure)."""
    data = {k: np.asarray(getattr(stats, k), np.float64) for k in STATS_KEYS}
    _stats_from(data, path)  # the shapes a later evaluation will expect
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **data)
    return path


def load_stats(path: paths.PathLike) -> Stats:
    batch = open_batch(path)
    if batch.stats is None:
        raise EvalInputError(f"{path}: no statistics (mu, sigma, mu_s, sigma_s)")
    return batch.stats
