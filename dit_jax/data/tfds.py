"""tensorflow-datasets input: any prepared tfds image data set, or imagenet2012 prepared from manual_dir.

array_record data sets are read with random access (tfds data sources) through the same IndexedSource as a
folder: batches depend only on (seed, step), and a run resumed at step k reads step k's examples directly.
tfrecord data sets (the tfds default) have no random access, so training refuses them with the command that
prepares an array_record copy (`require_random_access`); the latent extraction, which reads in data set
order, still takes them (TfdsChunkReader).
tensorflow and tfds are imported here only, and dit_jax.data imports this module only for tfds sources.
Preparing a data set: `python -m dit_jax.cli.prepare_tfds NAME --data_dir DIR [--manual_dir DIR]`.
"""
from __future__ import annotations

import collections
import logging
import threading

import tensorflow_datasets as tfds

from dit_jax.data.preprocess import preprocess
from dit_jax.utils.errors import DataError

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


def require_random_access(builder, data_dir: str) -> None:
    """Training reads examples by index (O(1) resume at any step): a tfrecord data set is refused with how to
    get an array_record one."""
    fmt = file_format(builder)
    if fmt == "array_record":
        return
    where = data_dir or "the default tfds data_dir"
    raise DataError(
        f"tfds data set {builder.name!r} in {where} is stored as {fmt}, which has no random access: a run "
        f"resumed at step k would re-read every record before it. Prepare it as array_record once "
        f"({PREPARE} {builder.name} --data_dir NEW_DIR [--manual_dir DIR], or convert this copy with "
        f"`tfds convert_format --dataset_version_dir {builder.data_dir} --out_file_format array_record`, which "
        f"needs apache-beam), or extract latents from it (dit-jax-extract-latents --tfds {builder.name}) and "
        f"train on those")


class TfdsReader:
    """Random access to an array_record tfds split: read(i) -> {"pixels": uint8 (S, S, 3), "y"}."""

    def __init__(self, builder, split: str, image_size: int):
        self.name, self.split, self.image_size = builder.name, split, int(image_size)
        self.image_key, self.label_key = feature_keys(builder)
        # Raw bytes out of tfds; PIL decodes them so the crop is exactly the folder path's.
        self.source = builder.as_data_source(split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})
        try:
            if len(self.source):
                self.source[0]
        except Exception as e:  # noqa: BLE001 - ArrayRecord raises bare runtime errors on unreadable files
            raise DataError(f"tfds data set {self.name!r} ({builder.data_dir}) cannot be read by index: "
                            f"{type(e).__name__}: {e}. ArrayRecord opens files through the local file "
                            f"system: for a bucket, mount it (gcsfuse) and set data.data_dir to the mount, or "
                            f"train on extracted latents (docs/data.md)") from e

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
