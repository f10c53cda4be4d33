"""The latents format (dit_jax/data/latents.py) locally and in a bucket (GCS emulator): exact rows, O(1) resume
(a resumed reader fetches the rows of its step and nothing else), the older v1 layout, clear errors."""
import json
import os

import numpy as np
import pytest

from dit_jax.data import DataError, make_source
from dit_jax.data import latents as dl
from dit_jax.utils import paths

N, SHARD, H = 22, 8, 2  # 3 shards (8, 8, 6), latents (2, 2, 4)


def synthetic(n=N, dtype=np.float32):
    """(latents (n, 2, 2, H, H, 4), labels): every value encodes (example, flip, mean/std) so rows are traceable."""
    r = np.random.default_rng(0)
    lat = r.standard_normal((n, 2, 2, H, H, 4)).astype(dtype)
    lat[:, :, 0, 0, 0, 0] = np.arange(n)[:, None] + 0.5 * np.arange(2)  # mean[0,0,0] = i + flip / 2
    return lat, (np.arange(n) * 7 % 5).astype(np.int32)


def write(root, lat, y, fmt="v2"):
    n = len(lat)
    shards = -(-n // SHARD)
    settings = {"num_examples": n, "shard_size": SHARD, "num_shards": shards, "latent_shape": [H, H, 4],
                "dtype": np.dtype(lat.dtype).name}
    if fmt == "v2":
        dl.write_index(root, settings)
        for s in range(shards):
            dl.write_shard(root, s, lat[s * SHARD:(s + 1) * SHARD], y[s * SHARD:(s + 1) * SHARD])
        return
    # the older layout as the previous dit-jax-extract-latents wrote it (np.save of mean, std, y per shard)
    base = paths.as_path(root)
    base.mkdir(parents=True, exist_ok=True)
    (base / dl.INDEX).write_text(json.dumps({"format": dl.FORMAT_V1, **settings}))
    for s in range(shards):
        (base / dl.shard_name(s)).mkdir(exist_ok=True)
        for name, arr in (("mean", lat[:, :, 0]), ("std", lat[:, :, 1]), ("y", y)):
            with (base / dl.shard_name(s) / f"{name}.npy").open("wb") as f:
                np.save(f, arr[s * SHARD:(s + 1) * SHARD])


def cfg(root, **kw):
    return {"name": "latents", "latents_dir": str(root), "random_flip": True, "prefetch": 0, **kw}


def expected(lat, y, src, step):
    idx, flips = src.order.local_indices(step), src.flips(step)
    return {"latent_mean": lat[idx, flips.astype(int), 0], "latent_std": lat[idx, flips.astype(int), 1],
            "y": y[idx]}


@pytest.mark.parametrize("fmt", ["v2", "v1"])
@pytest.mark.parametrize("where", ["local", "bucket"])
def test_rows_and_o1_resume(where, fmt, tmp_path, request):
    root = str(tmp_path / "lat") if where == "local" else request.getfixturevalue("gcs_dir")
    lat, y = synthetic()
    write(root, lat, y, fmt)
    batch, procs, k = 6, 2, 5  # step 5 is in epoch 2 (22 examples, 6 per step)
    for p in range(procs):
        with make_source(cfg(root), global_batch_size=batch, process_index=p, process_count=procs, seed=4) as run:
            seen = [run.batch(s) for s in range(k + 1)]  # an uninterrupted run, steps 0..k
            for s in range(k + 1):
                want = expected(lat, y, run, s)
                for key in want:
                    np.testing.assert_array_equal(seen[s][key], want[key], err_msg=f"{where} {fmt} step {s} {key}")
            assert 0 < run.flips(k).sum() or 0 < sum(run.flips(s).sum() for s in range(k))
        with make_source(cfg(root), global_batch_size=batch, process_index=p, process_count=procs, seed=4) as resumed:
            before = resumed.reader.stats.snapshot()
            got = resumed.batch(k)  # a run resumed at step k: no loop over steps 0..k-1
            cost = {key: v - before[key] for key, v in resumed.reader.stats.snapshot().items()}
        for key in got:
            np.testing.assert_array_equal(got[key], seen[k][key])
        rows = batch // procs
        per_row = 2 if fmt == "v1" else 1  # v1 keeps mean and std in two files
        record = H * H * 4 * 4 * (1 if fmt == "v1" else 2)
        assert cost == {"requests": rows * per_row, "bytes": rows * per_row * record}, cost


def test_open_costs_one_request_per_shard_plus_a_header(tmp_path):
    lat, y = synthetic()
    write(tmp_path, lat, y)
    r = dl.LatentsReader(str(tmp_path))
    assert r.stats.snapshot()["requests"] == 3 + 1  # 3 label files, the header of shard 0
    np.testing.assert_array_equal(r.labels, y)
    ex = r.read(13)
    np.testing.assert_array_equal(ex["mean"], lat[13, :, 0])
    np.testing.assert_array_equal(ex["std"], lat[13, :, 1])
    r.close()


def test_float16_storage_reads_back_as_float32(tmp_path):
    lat, y = synthetic(dtype=np.float16)
    write(tmp_path, lat, y)
    with make_source(cfg(tmp_path), global_batch_size=4, seed=1) as src:
        b = src.batch(2)
        assert b["latent_mean"].dtype == np.float32
        np.testing.assert_array_equal(b["latent_mean"], expected(lat, y, src, 2)["latent_mean"].astype(np.float32))


def test_incomplete_and_damaged_are_refused(gcs_dir, tmp_path):
    lat, y = synthetic()
    write(gcs_dir, lat, y)
    paths.as_path(gcs_dir, ).joinpath(dl.DONE, dl.shard_name(1)).unlink()  # as if shard 1 never finished
    with pytest.raises(DataError, match=r"incomplete: 1 of 3 shards missing \(first: shard-00001\).*rerun"):
        make_source(cfg(gcs_dir), global_batch_size=2)
    write(tmp_path, lat, y)
    index = json.loads((tmp_path / dl.INDEX).read_text())
    (tmp_path / dl.INDEX).write_text(json.dumps({**index, "latent_shape": [H, H, 3]}))  # disagrees with the files
    with pytest.raises(DataError, match=r"shard-00000/latents.npy does not hold float32 \(8, 2, 2, 2, 2, 3\)"):
        make_source(cfg(tmp_path), global_batch_size=2)
    with pytest.raises(DataError, match="has no index.json"):
        make_source(cfg(gcs_dir + "/nothing-here"), global_batch_size=2)


def test_npy_header_is_what_numpy_writes(tmp_path):
    for shape, dtype in (((8, 2, 2, 32, 32, 4), np.float32), ((1000, 2, 64, 64, 4), np.float16), ((7,), np.int32)):
        np.save(tmp_path / "a.npy", np.zeros(shape, dtype))
        head = dl.npy_header(shape, dtype)
        assert (tmp_path / "a.npy").read_bytes()[:len(head)] == head
        assert os.path.getsize(tmp_path / "a.npy") == len(head) + np.prod(shape) * np.dtype(dtype).itemsize
