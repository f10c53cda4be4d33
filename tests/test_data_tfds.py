"""tfds path through the real tfds loader on a tiny builder prepared into a tmp data_dir."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dit_jax.data import tfds as data_tfds
from dit_jax.data import DataError, make_source
from dit_jax.data.preprocess import flip_mask, preprocess

N = 20


def tiny_image(i):  # (H, W, 3) uint8, a different size per example
    r = np.random.default_rng(i)
    return r.integers(0, 256, (24 + i % 5, 30 - i % 3, 3), dtype=np.uint8)


class DitTinyImages(tfds.core.GeneratorBasedBuilder):
    """20 small RGB images in 3 classes; registered with tfds as 'dit_tiny_images'."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                                 "label": tfds.features.ClassLabel(num_classes=3),
                                                 "idx": tfds.features.Scalar(np.int64)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N):
            yield i, {"image": tiny_image(i), "label": i % 3, "idx": i}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{file format: data_dir} with dit_tiny_images prepared in array_record and in tfrecord."""
    out = {}
    for fmt in ("array_record", "tfrecord"):
        d = str(tmp_path_factory.mktemp(fmt))
        data_tfds.prepare("dit_tiny_images", d, file_format=fmt)
        out[fmt] = d
    return out


def cfg(data_dir, **kw):
    return {"name": "tfds", "tfds_name": "dit_tiny_images", "data_dir": data_dir, "split": "train",
            "image_size": 16, "num_workers": 2, "prefetch": 1, **kw}


def test_array_record_random_access(prepared):
    raw = data_tfds.TfdsReader(tfds.builder("dit_tiny_images", data_dir=prepared["array_record"]), "train", 16)
    gen_id = [int(raw.source[i]["idx"]) for i in range(N)]  # tfds shuffles the stored order at preparation
    assert sorted(gen_id) == list(range(N))
    with make_source(cfg(prepared["array_record"]), global_batch_size=4, seed=3) as src:
        assert src.num_examples == N
        for step in (0, 1, 7):
            batch = src.batch(step)
            assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
            assert batch["y"].dtype == np.int32
            flips = flip_mask(3, step, 4)
            for k, i in enumerate(src.order.local_indices(step)):
                # tfds stores PNG (lossless): the example decodes to the generated array
                want = preprocess(tiny_image(gen_id[i]), 16)
                np.testing.assert_array_equal(batch["image"][k], want[:, ::-1] if flips[k] else want)
                assert batch["y"][k] == gen_id[i] % 3


def test_array_record_two_processes_cover_epoch(prepared):
    srcs = [make_source(cfg(prepared["array_record"], prefetch=0), global_batch_size=4, process_index=p,
                        process_count=2, seed=0) for p in range(2)]
    seen = [[], []]
    for s in range(N // 4):
        for p in range(2):
            b = srcs[p].batch(s)
            assert b["image"].shape[0] == 2
            seen[p].extend(srcs[p].order.local_indices(s).tolist())
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(N))
    for s in srcs:
        s.close()


def test_tfrecord_is_refused_for_training_with_the_fix(prepared):
    """No random access in tfrecord: resuming would re-read every earlier record, so training refuses it."""
    with pytest.raises(DataError, match=r"'dit_tiny_images' in .* is stored as tfrecord, which has no random "
                                        r"access.*prepare_tfds dit_tiny_images --data_dir NEW_DIR.*convert_format"):
        make_source(cfg(prepared["tfrecord"]), global_batch_size=4)


def test_array_record_resume_reads_only_the_step(prepared, monkeypatch):
    """A source created at step k reads the examples of step k (and the prefetched next ones), nothing before."""
    read = []
    original = data_tfds.TfdsReader.read
    monkeypatch.setattr(data_tfds.TfdsReader, "read", lambda self, i: read.append(int(i)) or original(self, i))
    with make_source(cfg(prepared["array_record"], prefetch=0), global_batch_size=4, seed=3) as src:
        read.clear()  # the reader's open-time probe
        src.batch(40)  # epoch 8
        assert read == src.order.local_indices(40).tolist()


def test_tfrecord_chunk_reader_for_extraction(prepared):
    """The sequential reader dit-jax-extract-latents uses on tfrecord data sets (split slicing)."""
    b = tfds.builder("dit_tiny_images", data_dir=prepared["tfrecord"])
    r = data_tfds.TfdsChunkReader(b, "train", 16, chunk=6, keep=2)
    ids = []
    for i in list(range(N)) + [3, 19, 0]:  # in order, then jumps back and forth
        gen = int(r._raw(i)["idx"])
        ex = r.read(i)
        np.testing.assert_array_equal(ex["pixels"], preprocess(tiny_image(gen), 16))
        assert ex["y"] == gen % 3
        ids.append(gen)
    assert sorted(ids[:N]) == list(range(N)) and ids[N:] == [ids[3], ids[19], ids[0]]


def test_not_prepared_and_unknown(tmp_path):
    with pytest.raises(DataError, match=r"'dit_tiny_images' is not prepared in .*" + tmp_path.name):
        make_source(cfg(str(tmp_path)), global_batch_size=2)
    with pytest.raises(DataError, match=r"'no_such_dataset_xyz' is unknown"):
        make_source(cfg(str(tmp_path), tfds_name="no_such_dataset_xyz"), global_batch_size=2)
    with pytest.raises(DataError, match="before a multi-process run"):
        make_source(cfg(str(tmp_path), manual_dir=str(tmp_path)), global_batch_size=2, process_count=2)
