"""Training data: `make_source(config.data, ...)` builds the source named by config.data.name; see docs/data.md.

The source contract (what dit_jax.train relies on): `source.batch(step)` returns THIS process's slice of the
global batch of `step` as NumPy arrays, a function of (seed, step) only, so a resumed or re-sharded run sees
the same data; `source.num_examples`; `source.close()`. Batches are one of
  digits                                  -> {"x": (n, S, S, 1) float32 in [-1, 1], "y": int32 (n,)}
  folder / tfds, encode_on_the_fly=True   -> {"image": (n, S, S, 3) uint8, "y"} (the step scales to [-1, 1])
  folder / tfds, encode_on_the_fly=False  -> {"x": the same uint8 pixels (a pixel-space model), "y"}
  latents                                 -> {"latent_mean", "latent_std": (n, S/8, S/8, 4) float32, "y"}

Every path (data.folder, data.data_dir, data.latents_dir) may be a local path or a URL (gs://...).
Modules: source (the shared random-access sources: order, flips, prefetch, skipping corrupt files), digits,
folder, latents (+ byte_ranges: ranged reads), tfds (the only one that imports tensorflow, and only when
asked for), preprocess (decode, crop).
"""
from __future__ import annotations

from typing import Any

from dit_jax.data.digits import DigitsReader
from dit_jax.data.folder import FolderReader
from dit_jax.data.latents import LatentsReader
from dit_jax.data.source import IndexedSource, LatentSource
from dit_jax.utils.errors import DataError

__all__ = ["DataError", "SOURCES", "make_source", "image_reader"]

SOURCES = ("digits", "tfds", "folder", "latents")


def _get(cfg: Any, name: str, default: Any) -> Any:
    """A field of a ConfigDict or a plain dict; None (an unset placeholder) means the default."""
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def _tfds_module():
    from dit_jax.data import tfds  # heavy: imports tensorflow, which only tfds sources need

    return tfds


def image_reader(cfg: Any, process_count: int = 1):
    """A random-access image reader (read(i), describe(i), len) for data.name "folder" or "tfds"."""
    name = _get(cfg, "name", "tfds")
    size = int(_get(cfg, "image_size", 256))
    if name == "folder":
        return FolderReader(_get(cfg, "folder", ""), size)
    if name == "tfds":
        tfds = _tfds_module()
        builder = tfds.load_builder(_get(cfg, "tfds_name", "imagenet2012"), _get(cfg, "data_dir", ""),
                                    _get(cfg, "manual_dir", ""), process_count)
        split = _get(cfg, "split", "train")
        if tfds.file_format(builder) == "array_record":
            return tfds.TfdsReader(builder, split, size)
        return tfds.TfdsChunkReader(builder, split, size)
    raise DataError(f"data.name={name!r} has no image reader; expected 'folder' or 'tfds'")


def make_source(cfg: Any, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                seed: int = 0):
    """The data source of config.data for this process (see the module docstring)."""
    name = _get(cfg, "name", "tfds")
    shuffle_seed = int(_get(cfg, "shuffle_seed", 0)) or int(seed)
    common = dict(global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
                  seed=shuffle_seed, num_workers=int(_get(cfg, "num_workers", 8)),
                  prefetch=int(_get(cfg, "prefetch", 2)))
    image_key = "image" if _get(cfg, "encode_on_the_fly", True) else "x"
    flip = bool(_get(cfg, "random_flip", True))
    if name == "digits":
        r = DigitsReader(int(_get(cfg, "image_size", 8)))
        return IndexedSource(r.read, len(r), r.describe, kind="pixels", random_flip=flip, **common)
    if name == "latents":
        common.pop("num_workers")  # one ranged read per batch; its requests run concurrently
        return LatentSource(LatentsReader(_get(cfg, "latents_dir", "")), random_flip=flip, **common)
    if name == "tfds":
        tfds = _tfds_module()
        builder = tfds.load_builder(_get(cfg, "tfds_name", "imagenet2012"), _get(cfg, "data_dir", ""),
                                    _get(cfg, "manual_dir", ""), process_count)
        tfds.require_random_access(builder, _get(cfg, "data_dir", ""))
        r = tfds.TfdsReader(builder, _get(cfg, "split", "train"), int(_get(cfg, "image_size", 256)))
    elif name == "folder":
        r = FolderReader(_get(cfg, "folder", ""), int(_get(cfg, "image_size", 256)))
    else:
        raise DataError(f"data.name={name!r} is not a data source; expected one of {SOURCES}")
    return IndexedSource(r.read, len(r), r.describe, kind="image", image_key=image_key, random_flip=flip,
                         **common)
