"""Reader throughput per host: examples/s of the training sources and of the storage formats considered for
latents (docs/data.md, "Throughput").

    python -m benchmarks.data_readers [--examples 4096] [--batch 8] [--steps 200] [--emulator]

Latents at 256 px (record: (mean, std) of one flip, (2, 32, 32, 4) float32 = 32 KiB read per example),
random order, `--batch` examples per step (8 = global batch 256 over the 32 hosts of a v5e-256):
  latents-v2   dit_jax's "latents" source (one ranged read per example; prefetch batches in flight)
  npy-mmap     the previous reader: memory-mapped .npy shards, one example at a time (local only)
  arrayrecord  array_record's reader, one record per (example, flip), read(indices) (local files only)
  zarr3-ts     tensorstore zarr3, sharded, one inner chunk per (example, flip), vindex reads
  folder-jpeg  the folder image source (decode + ADM crop to 256 px in threads, uint8 batches), local JPEGs
With --emulator, latents-v2 and zarr3-ts also run against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).
Local numbers are from the page cache (the files were just written). The emulator is a Python HTTP server
that copies the whole object for every ranged GET, so it runs with small shards (--emulator-shard) and its
numbers are a floor set by the emulator, not a bucket's throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from dit_jax.data import latents as dl
from dit_jax.data import make_source

H = 32  # 256 px latents
SHARD = 1024


def write_latents(root: str, n: int, shard: int = SHARD) -> np.ndarray:
    lat = np.random.default_rng(0).standard_normal((n, 2, 2, H, H, 4)).astype(np.float32)
    y = (np.arange(n) % 1000).astype(np.int32)
    shards = -(-n // shard)
    dl.write_index(root, {"num_examples": n, "shard_size": shard, "num_shards": shards,
                          "latent_shape": [H, H, 4], "dtype": "float32"})
    for s in range(shards):
        dl.write_shard(root, s, lat[s * shard:(s + 1) * shard], y[s * shard:(s + 1) * shard])
    return lat


def time_source(root: str, batch: int, steps: int, prefetch: int) -> float:
    """examples/s of make_source(latents).batch(step) over `steps` consecutive steps (after one warm step)."""
    with make_source({"name": "latents", "latents_dir": root, "prefetch": prefetch}, global_batch_size=batch,
                     seed=1) as src:
        src.batch(0)
        t = time.perf_counter()
        for s in range(1, steps + 1):
            src.batch(s)
        return steps * batch / (time.perf_counter() - t)


def time_npy_mmap(root: str, n: int, batch: int, steps: int) -> float:
    shards = [np.load(os.path.join(root, f"{dl.shard_name(s)}/latents.npy"), mmap_mode="r")
              for s in range(-(-n // SHARD))]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(steps):
        idx, flips = rng.integers(0, n, batch), rng.integers(0, 2, batch)
        np.stack([np.asarray(shards[i // SHARD][i % SHARD, f], np.float32) for i, f in zip(idx, flips)])
    return steps * batch / (time.perf_counter() - t)


def time_arrayrecord(root: str, lat: np.ndarray, batch: int, steps: int) -> float:
    from array_record.python import array_record_module as ar

    path = os.path.join(root, "latents.array_record")
    w = ar.ArrayRecordWriter(path, "group_size:1")  # one record per chunk: random access without over-read
    for row in lat.reshape(len(lat) * 2, -1):  # record 2 * i + f
        w.write(row.tobytes())
    w.close()
    r = ar.ArrayRecordReader(path, "readahead_buffer_size:0")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(steps):
        idx = 2 * rng.integers(0, len(lat), batch) + rng.integers(0, 2, batch)
        np.frombuffer(b"".join(r.read(idx.tolist())), np.float32)
    rate = steps * batch / (time.perf_counter() - t)
    r.close()
    return rate


def zarr_spec(root: str, n: int) -> dict:
    if root.startswith("gs://"):
        bucket, path = root[5:].split("/", 1)
        kv = {"driver": "gcs", "bucket": bucket, "path": path + "/z/"}
    else:
        kv = {"driver": "file", "path": os.path.join(root, "z")}
    inner = {"chunk_shape": [1, 1, 2, H, H, 4], "index_location": "start",
             "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
             "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}
    return {"driver": "zarr3", "kvstore": kv,
            "metadata": {"shape": [n, 2, 2, H, H, 4], "data_type": "float32",
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD, 2, 2, H, H, 4]}},
                         "codecs": [{"name": "sharding_indexed", "configuration": inner}]}}


def time_zarr(root: str, lat: np.ndarray, batch: int, steps: int) -> float:
    import tensorstore as ts

    arr = ts.open(zarr_spec(root, len(lat)), create=True, delete_existing=True).result()
    for s in range(0, len(lat), SHARD):
        arr[s:min(s + SHARD, len(lat))].write(lat[s:s + SHARD]).result()
    arr = ts.open(zarr_spec(root, len(lat)), open=True,
                  context=ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})).result()
    rng = np.random.default_rng(0)
    arr.vindex[np.array([0]), np.array([0])].read().result()
    t = time.perf_counter()
    for _ in range(steps):
        arr.vindex[rng.integers(0, len(lat), batch), rng.integers(0, 2, batch)].read().result()
    return steps * batch / (time.perf_counter() - t)


def time_folder_images(root: str, batch: int, steps: int, workers: int, prefetch: int) -> float:
    """examples/s of the folder source on 500x375 JPEGs (ImageNet's typical size), 256 px crops, uint8 out."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for c in range(4):
        os.makedirs(os.path.join(root, "imgs", f"c{c}"), exist_ok=True)
    for i in range(64):  # smooth colour fields plus noise: JPEG sizes like photos (~60-100 KB)
        base = np.stack([np.sin(xx / (20 + i) + k) * np.cos(yy / (30 + k * i % 7 + 5)) for k in range(3)], -1)
        img = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, "imgs", f"c{i % 4}", f"{i}.jpg"), quality=90)
    cfg = {"name": "folder", "folder": os.path.join(root, "imgs"), "image_size": 256, "num_workers": workers,
           "prefetch": prefetch}
    with make_source(cfg, global_batch_size=batch, seed=1) as src:
        src.batch(0)
        t = time.perf_counter()
        for s in range(1, steps + 1):
            src.batch(s)
        return steps * batch / (time.perf_counter() - t)


def attempt(fn, *a):
    try:
        return round(fn(*a))
    except Exception as e:  # noqa: BLE001 - report why a candidate cannot run here
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--emulator", action="store_true")
    p.add_argument("--emulator-examples", type=int, default=1024)
    p.add_argument("--emulator-shard", type=int, default=16,
                   help="examples per shard on the emulator, which copies the whole object for each ranged GET")
    a = p.parse_args(argv)
    results = {}
    tmp = tempfile.mkdtemp(prefix="dit-readers-")
    try:
        lat = write_latents(tmp, a.examples)
        for prefetch in (0, 4, 16):
            results[f"latents-v2 local prefetch={prefetch}"] = attempt(time_source, tmp, a.batch, a.steps, prefetch)
        results["npy-mmap local"] = attempt(time_npy_mmap, tmp, a.examples, a.batch, a.steps)
        results["arrayrecord local"] = attempt(time_arrayrecord, tmp, lat, a.batch, a.steps)
        results["zarr3-ts local"] = attempt(time_zarr, tmp, lat, a.batch, a.steps)
        cores = os.cpu_count() or 1
        results[f"folder-jpeg local workers={cores} prefetch=2"] = attempt(
            time_folder_images, tmp, a.batch, max(10, a.steps // 10), cores, 2)
        if a.emulator:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
            from gcs_emulator import BUCKET, GcsEmulator

            emu = GcsEmulator()
            os.environ.update(emu.env)
            try:
                url = f"gs://{BUCKET}/bench"
                small = write_latents(url, a.emulator_examples, a.emulator_shard)
                for prefetch in (0, 4, 16):
                    results[f"latents-v2 emulator prefetch={prefetch}"] = attempt(
                        time_source, url, a.batch, max(20, a.steps // 4), prefetch)
                results["zarr3-ts emulator"] = attempt(time_zarr, url, small, a.batch, max(20, a.steps // 4))
            finally:
                emu.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"batch": a.batch, "examples_per_s": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
