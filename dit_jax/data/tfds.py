"""tensorflow-datasets input: any prepared tfds image data set, or imagenet2012 prepared from manual_dir.

array_record data sets are read with random access (tfds data sources) through the same IndexedSource as a
folder: batches depend only on (seed, step). tfrecord data sets (the tfds default) are streamed with tf.data
(TfdsStreamSource): each process reads an even split of its own, deterministic for a fixed process count.
tensorflow and tfds are imported here only, and dit_jax.data imports this module only for tfds sources.
Preparing a data set: `python -m dit_jax.cli.prepare_tfds NAME --data_dir DIR [--manual_dir DIR]`.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dit_jax.data.preprocess import flip_mask, preprocess
from dit_jax.utils.errors import DataError
from dit_jax.utils.images import to_model_range

log = logging.getLogger(__name__)
PREPARE = "python -m dit_jax.cli.prepare_tfds"


def load_builder(name: str, data_dir: str = "", manual_dir: str = "", process_count: int = 1):
    """A prepared tfds builder for `name`; prepares it from manual_dir when given (single process only)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"tfds data set {name!r} is unknown to tensorflow-datasets ({type(e).__name__}: {e}); "
                        f"check data.tfds_name, or use data.name='folder' for a directory of images") from e
    if builder.is_prepared():
        return builder
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    if not manual_dir:
        raise DataError(
            f"tfds data set {name!r} is not prepared in {where}. Prepare it once (see docs/data.md), e.g. "
            f"{PREPARE} {name} --data_dir DIR [--manual_dir DIR_WITH_DOWNLOADED_TARS], "
            f"then set data.data_dir (and data.manual_dir for imagenet2012)")
    if process_count > 1:
        raise DataError(f"tfds data set {name!r} is not prepared in {where}; prepare it once before a "
                        f"multi-process run ({PREPARE} {name} --data_dir ... --manual_dir "
                        f"{manual_dir}) rather than on every host")
    return prepare(name, data_dir, manual_dir)


def prepare(name: str, data_dir: str = "", manual_dir: str = "", file_format: str = "array_record"):
    """Build the tfds data set `name` into data_dir (array_record by default: random access)."""
    builder = tfds.builder(name, data_dir=data_dir or None, file_format=file_format)
    log.warning("preparing tfds data set %r into %s (manual_dir=%r); this can take hours for imagenet2012",
                name, builder.data_dir, manual_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as e:
        raise DataError(f"could not prepare tfds data set {name!r} from manual_dir={manual_dir!r}: "
                        f"{type(e).__name__}: {e}. For imagenet2012 put ILSVRC2012_img_train.tar and "
                        f"ILSVRC2012_img_val.tar in manual_dir (see docs/data.md)") from e
    return builder


def feature_keys(builder) -> tuple[str, str | None]:
    """(image key, label key or None) of a tfds image data set."""
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and isinstance(keys[0], str):
        return keys[0], keys[1]
    features = builder.info.features
    image = next((k for k in ("image", "img") if k in features), None)
    if image is None:
        raise DataError(f"tfds data set {builder.name!r} has no image feature (features: {list(features)})")
    return image, ("label" if "label" in features else None)


def file_format(builder) -> str:
    fmt = builder.info.file_format
    return getattr(fmt, "value", str(fmt))


class TfdsReader:
    """Random access to an array_record tfds split: read(i) -> {"pixels": uint8 (S, S, 3), "y"}."""

    def __init__(self, builder, split: str, image_size: int):
        self.name, self.split, self.image_size = builder.name, split, int(image_size)
        self.image_key, self.label_key = feature_keys(builder)
        # Raw bytes out of tfds; PIL decodes them so the crop is exactly the folder path's.
        self.source = builder.as_data_source(split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int) -> dict:
        ex = self.source[int(i)]
        y = int(ex[self.label_key]) if self.label_key else 0
        return {"pixels": preprocess(ex[self.image_key], self.image_size), "y": y}

    def describe(self, i: int) -> str:
        return f"{self.name}[{self.split}] example {i}"


class TfdsChunkReader:
    """Sequential-friendly access to a tfrecord tfds split (used by the latent extraction).

    read(i) loads the chunk of `chunk` examples holding i through tfds split slicing ("train[a:b]") and
    keeps the last few, so reading in data set order (a few threads around the same place) decodes each
    record about once.
    """

    def __init__(self, builder, split: str, image_size: int, chunk: int = 256, keep: int = 3):
        self.builder, self.name, self.split, self.image_size = builder, builder.name, split, int(image_size)
        self.image_key, self.label_key = feature_keys(builder)
        self.n, self.chunk, self.keep = builder.info.splits[split].num_examples, int(chunk), int(keep)
        self._chunks, self._lock = collections.OrderedDict(), threading.Lock()

    def __len__(self) -> int:
        return self.n

    def _raw(self, i: int) -> dict:
        start = (i // self.chunk) * self.chunk
        with self._lock:
            if start not in self._chunks:
                ds = self.builder.as_dataset(split=f"{self.split}[{start}:{min(start + self.chunk, self.n)}]",
                                             shuffle_files=False,
                                             decoders={self.image_key: tfds.decode.SkipDecoding()})
                self._chunks[start] = list(ds.as_numpy_iterator())
                while len(self._chunks) > self.keep:
                    self._chunks.popitem(last=False)
            self._chunks.move_to_end(start)
            return self._chunks[start][i - start]

    def read(self, i: int) -> dict:
        ex = self._raw(int(i))
        y = int(ex[self.label_key]) if self.label_key else 0
        return {"pixels": preprocess(ex[self.image_key], self.image_size), "y": y}

    def describe(self, i: int) -> str:
        return f"{self.name}[{self.split}] example {i}"


class TfdsStreamSource:
    """tfrecord tfds split streamed through tf.data; same batch(step) interface as IndexedSource.

    Process p reads tfds.even_splits(split, P)[p], shuffled with the seed, repeated; batch(step) re-seeks
    with skip() when the step is not the next one. A corrupt image is replaced by the next valid image of
    the same batch (cyclically), warned and counted.
    """

    def __init__(self, builder, split: str, image_size: int, *, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, random_flip: bool, image_key_out: str = "image",
                 num_workers: int = 8, shuffle_buffer: int = 10_000):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        self.builder, self.image_size, self.seed = builder, int(image_size), int(seed)
        self.global_batch, self.local_batch = global_batch_size, global_batch_size // process_count
        self.process_index, self.random_flip, self.out_key = process_index, random_flip, image_key_out
        self.image_key, self.label_key = feature_keys(builder)
        self.split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
        self.num_examples = builder.info.splits[split].num_examples
        self.shuffle_buffer, self.num_skipped = shuffle_buffer, 0
        self._pool = cf.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="dit-decode")
        self._it, self._next_step = None, None

    def _iterator(self, step: int):
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(shuffle_seed=self.seed, shuffle_reshuffle_each_iteration=True,
                                      options=options)
        ds = self.builder.as_dataset(split=self.split, shuffle_files=True, read_config=read_config,
                                     decoders={self.image_key: tfds.decode.SkipDecoding()})
        # shuffle within an epoch, then repeat: each epoch covers this process's split exactly once
        ds = ds.shuffle(self.shuffle_buffer, seed=self.seed, reshuffle_each_iteration=True).repeat()
        ds = ds.skip(step * self.local_batch).batch(self.local_batch).prefetch(2)
        return ds.as_numpy_iterator()

    def _decode(self, data: bytes):
        try:
            return preprocess(data, self.image_size)
        except Exception as e:  # noqa: BLE001
            return e

    def batch(self, step: int) -> dict:
        step = int(step)
        if self._it is None or step != self._next_step:
            self._it = self._iterator(step)
        raw = next(self._it)
        self._next_step = step + 1
        decoded = list(self._pool.map(self._decode, list(raw[self.image_key])))
        good = [i for i, d in enumerate(decoded) if not isinstance(d, Exception)]
        if not good:
            raise DataError(f"no readable image in batch {step} of {self.builder.name!r}: {decoded[0]}")
        for i, d in enumerate(decoded):
            if isinstance(d, Exception):
                self.num_skipped += 1
                log.warning("skipping unreadable image in %s batch %d (%s); %d skipped so far",
                            self.builder.name, step, d, self.num_skipped)
                decoded[i] = decoded[min(good, key=lambda g: (g - i) % len(decoded))]
        pixels = np.stack(decoded)  # (n, S, S, 3) uint8
        if self.random_flip:
            pos = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
            flips = flip_mask(self.seed, step, self.global_batch)[pos]
            pixels = np.where(flips[:, None, None, None], pixels[:, :, ::-1], pixels)
        y = (raw[self.label_key].astype(np.int32) if self.label_key
             else np.zeros(len(pixels), np.int32))
        return {self.out_key: to_model_range(pixels), "y": y}

    def close(self):
        self._it = None
        self._pool.shutdown(wait=True, cancel_futures=True)
