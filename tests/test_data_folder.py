"""Folder source: order, per-process shards, flips, corrupt files and bad directories."""
import logging
import os

import numpy as np
import pytest

from conftest import write_folder
from dit_jax.data import DataError, make_source
from dit_jax.data.folder import list_folder
from dit_jax.data.preprocess import flip_mask, preprocess
from dit_jax.utils import paths as upaths


def cfg(folder, **kw):
    return {"name": "folder", "folder": str(folder), "image_size": 16, "random_flip": True, "num_workers": 2,
            "prefetch": 2, **kw}


def test_listing_follows_imagefolder_order(tmp_path, rng):
    root = write_folder(tmp_path / "d", rng)
    paths, labels, classes = list_folder(str(root))
    assert classes == ["class_0", "class_1", "class_2"] and len(paths) == 12
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 4 + [2] * 3)
    assert paths[0].endswith(os.path.join("class_0", "img1.jpg"))  # walk order: the class dir before nested/
    assert not any(p.endswith(".txt") for p in paths)


def test_batches_deterministic_and_correct(tmp_path, rng):
    root = write_folder(tmp_path / "d", rng)
    paths, labels, _ = list_folder(str(root))
    with make_source(cfg(root), global_batch_size=4, seed=7) as a, make_source(cfg(root), global_batch_size=4, seed=7) as b:
        assert a.num_examples == 12
        batches = [a.batch(s) for s in range(5)]
        # a jump (resume at step 3) gives the batch an uninterrupted run saw
        np.testing.assert_array_equal(b.batch(3)["image"], batches[3]["image"])
        for s, batch in enumerate(batches):
            assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8  # scaled in the step
            assert batch["y"].dtype == np.int32
            idx = a.order.local_indices(s)
            flips = flip_mask(7, s, 4)
            for k, i in enumerate(idx):
                want = preprocess(paths[i], 16)
                want = want[:, ::-1] if flips[k] else want
                np.testing.assert_array_equal(batch["image"][k], want)
                assert batch["y"][k] == labels[i]
    with make_source(cfg(root), global_batch_size=4, seed=8) as c:
        assert not np.array_equal(c.batch(0)["y"], batches[0]["y"]) or \
            not np.array_equal(c.batch(0)["image"], batches[0]["image"])


@pytest.mark.parametrize("num_examples,batch", [(12, 4), (12, 6)])
def test_two_processes_disjoint_and_cover_each_epoch(tmp_path, rng, num_examples, batch):
    root = write_folder(tmp_path / "d", rng)
    srcs = [make_source(cfg(root, prefetch=0), global_batch_size=batch, process_index=p, process_count=2, seed=1)
            for p in range(2)]
    single = make_source(cfg(root, prefetch=0), global_batch_size=batch, seed=1)
    steps_per_epoch = num_examples // batch
    for epoch in range(2):
        seen = [[], []]
        for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            for p in range(2):
                seen[p].extend(srcs[p].order.local_indices(s).tolist())
            # the two slices are the single-process global batch, in order
            glob = np.concatenate([srcs[0].batch(s)["image"], srcs[1].batch(s)["image"]])
            np.testing.assert_array_equal(glob, single.batch(s)["image"])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(num_examples))
    for s in srcs + [single]:
        s.close()


def test_corrupt_image_is_skipped_warned_counted(tmp_path, rng, caplog):
    root = write_folder(tmp_path / "d", rng)
    paths, _, _ = list_folder(str(root))
    with open(paths[3], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    with open(paths[7], "rb") as f:  # a truncated image
        data = f.read()
    with open(paths[7], "wb") as f:
        f.write(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING), make_source(cfg(root), global_batch_size=12, seed=0) as src:
        batch = src.batch(0)  # one full epoch
        assert src.num_skipped == 2
        idx = src.order.local_indices(0)
        for k, i in enumerate(idx):  # each bad example replaced by the next readable one
            if i in (3, 7):
                flips = flip_mask(0, 0, 12)
                want = preprocess(paths[i + 1], 16)
                want = want[:, ::-1] if flips[k] else want
                np.testing.assert_array_equal(batch["image"][k], want)
        src.batch(1)
        assert src.num_skipped == 2  # known bad files are not re-warned or re-counted
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warned) == 2 and any(paths[3] in m for m in warned)


def test_bad_directories(tmp_path, rng):
    with pytest.raises(DataError, match="does not exist"):
        make_source(cfg(tmp_path / "missing"), global_batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        make_source(cfg(tmp_path / "empty"), global_batch_size=2)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"\['cat'\] contain no image files"):
        make_source(cfg(tmp_path / "noimg"), global_batch_size=2)
    with pytest.raises(DataError, match="data.folder is empty"):
        make_source(cfg(""), global_batch_size=2)


def test_all_unreadable_is_a_clear_error(tmp_path):
    d = tmp_path / "bad" / "cls"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"garbage")
    with make_source(cfg(tmp_path / "bad"), global_batch_size=2) as src:
        with pytest.raises(DataError, match=r"no readable example among 3 .*cls/[012]\.png: UnidentifiedImageError"):
            src.batch(0)


def test_folder_in_a_bucket_reads_like_the_local_folder(tmp_path, rng, gcs_dir):
    root = write_folder(tmp_path / "d", rng)
    bucket = upaths.as_path(gcs_dir) / "train"
    for f in sorted(root.rglob("*")):
        if f.is_file():
            (bucket / f.relative_to(root).as_posix()).write_bytes(f.read_bytes())
    local_paths, labels, classes = list_folder(str(root))
    url_paths, url_labels, url_classes = list_folder(str(bucket))
    assert url_classes == classes and url_labels.tolist() == labels.tolist()
    assert [p[len(str(bucket)):] for p in url_paths] == [p[len(str(root)):] for p in local_paths]  # same order
    with make_source(cfg(root), global_batch_size=6, seed=2) as a, make_source(cfg(bucket), global_batch_size=6,
                                                                                seed=2) as b:
        for s in (0, 3):
            for key in ("image", "y"):
                np.testing.assert_array_equal(b.batch(s)[key], a.batch(s)[key])
