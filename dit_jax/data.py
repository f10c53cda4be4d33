"""make_source: the data source named by config.data ("tfds", "folder" or "latents"); see docs/data.md.

Contract with dit_jax/train.py: source.batch(step) returns THIS process's slice of the global batch of
`step` as NumPy arrays, a function of (seed, step) only; source.num_examples; source.close().
  folder / tfds, encode_on_the_fly=True  -> {"image": (n, S, S, 3) float32 in [-1, 1], "y": int32 (n,)}
  folder / tfds, encode_on_the_fly=False -> {"x": ... same pixels (a pixel-space model), "y"}
  latents                                -> {"latent_mean", "latent_std": (n, S/8, S/8, 4) float32, "y"}
"""
from __future__ import annotations

from dit_jax.data_source import DataError, IndexedSource

__all__ = ["DataError", "make_source", "image_reader"]


def _get(cfg, name, default):
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def image_reader(cfg, process_count: int = 1):
    """A random-access image reader (read(i), describe(i), len) for data.name "folder" or "tfds"."""
    name = _get(cfg, "name", "tfds")
    size = int(_get(cfg, "image_size", 256))
    if name == "folder":
        from dit_jax.data_folder import FolderReader
        return FolderReader(_get(cfg, "folder", ""), size)
    if name == "tfds":
        from dit_jax import data_tfds  # lazy: pulls in tensorflow
        builder = data_tfds.load_builder(_get(cfg, "tfds_name", "imagenet2012"), _get(cfg, "data_dir", ""),
                                         _get(cfg, "manual_dir", ""), process_count)
        split = _get(cfg, "split", "train")
        if data_tfds.file_format(builder) == "array_record":
            return data_tfds.TfdsReader(builder, split, size)
        return data_tfds.TfdsChunkReader(builder, split, size)
    raise ValueError(f"data.name={name!r} has no image reader; expected 'folder' or 'tfds'")


def make_source(cfg, *, global_batch_size: int, process_index: int = 0, process_count: int = 1, seed: int = 0):
    """The data source of config.data for this process (see the module docstring)."""
    name = _get(cfg, "name", "tfds")
    shuffle_seed = int(_get(cfg, "shuffle_seed", 0)) or int(seed)
    common = dict(global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
                  seed=shuffle_seed, random_flip=bool(_get(cfg, "random_flip", True)),
                  num_workers=int(_get(cfg, "num_workers", 8)))
    image_key = "image" if _get(cfg, "encode_on_the_fly", True) else "x"
    if name == "latents":
        from dit_jax.data_latents import LatentsReader
        r = LatentsReader(_get(cfg, "latents_dir", ""))
        return IndexedSource(r.read, len(r), r.describe, kind="latent", prefetch=int(_get(cfg, "prefetch", 2)),
                             **common)
    if name == "tfds":
        from dit_jax import data_tfds
        builder = data_tfds.load_builder(_get(cfg, "tfds_name", "imagenet2012"), _get(cfg, "data_dir", ""),
                                         _get(cfg, "manual_dir", ""), process_count)
        split = _get(cfg, "split", "train")
        if data_tfds.file_format(builder) != "array_record":  # tfrecord: no random access, stream it
            return data_tfds.TfdsStreamSource(builder, split, int(_get(cfg, "image_size", 256)),
                                              image_key_out=image_key, **common)
        r = data_tfds.TfdsReader(builder, split, int(_get(cfg, "image_size", 256)))
    elif name == "folder":
        r = image_reader(cfg)
    else:
        raise ValueError(f"data.name={name!r} is not handled by dit_jax.data; expected 'tfds', 'folder' or "
                         f"'latents' ('digits' lives in dit_jax.data_digits)")
    return IndexedSource(r.read, len(r), r.describe, kind="image", image_key=image_key,
                         prefetch=int(_get(cfg, "prefetch", 2)), **common)
