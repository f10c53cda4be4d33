"""Encoding an image data set once into VAE latents (the fast-DiT approach); `dit-jax-extract-latents`
(dit_jax/cli/extract_latents.py) is its command line.

Each example is stored as the posterior mean and std of the image and of its mirror image (training picks
one per step and samples the latent), in the sharded layout of dit_jax/data/latents.py, on local disk or in
a bucket. Shards with a completion marker are skipped, so a killed run resumes. Process p of P encodes
shards s with s % P == p (disjoint files); within a process the batch is split over the local devices.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dit_jax.data import latents as dl
from dit_jax.data.source import SkipCorrupt
from dit_jax.utils.errors import ConfigError, DataError
from dit_jax.utils import xla_cpu
from dit_jax.utils.images import to_model_range
from dit_jax.vae import AutoencoderKL

log = logging.getLogger(__name__)


_ENCODERS: dict = {}  # (vae, batch_size, devices) -> compiled encoder: a resumed or repeated call reuses it


def make_encoder(vae, batch_size: int, devices=None):
    """jit: uint8 (B, S, S, 3) -> (mean, std), each (B, 2, h, w, 4) for [image, mirrored image].

    The batch axis is sharded over `devices` (the local ones by default); B must divide evenly.
    """
    devices = tuple(devices if devices is not None else jax.local_devices())
    key = (vae, batch_size, devices)
    if key in _ENCODERS:
        return _ENCODERS[key]
    if batch_size % len(devices):
        raise ConfigError(f"--batch_size {batch_size} must be a multiple of the {len(devices)} local devices")
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def encode(params, pixels):  # (B, S, S, 3) uint8
        x = to_model_range(pixels)  # (B, S, S, 3) float32 in [-1, 1]
        both = jnp.concatenate([x, x[:, :, ::-1]], axis=0)  # (2B, S, S, 3)
        mean, logvar = vae.apply({"params": params}, both, method=AutoencoderKL.encode)
        std = jnp.exp(0.5 * logvar)
        b = pixels.shape[0]
        return (jnp.stack([mean[:b], mean[b:]], axis=1),  # (B, 2, h, w, 4)
                jnp.stack([std[:b], std[b:]], axis=1))

    fn = jax.jit(encode, in_shardings=(replicated, batch_sharding), out_shardings=(batch_sharding, batch_sharding),
                 compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform))
    _ENCODERS[key] = fn, replicated
    return fn, replicated


def extract(reader, out_dir, vae, params, *, batch_size: int = 64, shard_size: int = 1024,
            process_index: int = 0, process_count: int = 1, dtype: str = "float32", settings: Optional[dict] = None,
            num_workers: int = 8, on_shard: Optional[Callable[[int], None]] = None, progress: bool = True,
            devices=None) -> dict:
    """Encode every example of `reader` (read(i) -> {"pixels", "y"}, describe(i), len) into out_dir, a local
    folder or a bucket URL. Returns {"num_shards", "written", "already_done", "skipped_images"} for this process.
    """
    n = len(reader)
    if n == 0:
        raise DataError("the data set to extract has no examples")
    num_shards = math.ceil(n / shard_size)
    encode, replicated = make_encoder(vae, batch_size, devices)
    params = jax.device_put(params, replicated)
    probe = reader.read(0)["pixels"]  # (S, S, 3): fixes the latent shape recorded in the index
    out_shape = jax.eval_shape(encode, params, jax.ShapeDtypeStruct((batch_size, *probe.shape), np.uint8))[0].shape
    dl.write_index(out_dir, {**(settings or {}), "num_examples": n, "shard_size": shard_size,
                             "num_shards": num_shards, "image_size": int(probe.shape[0]),
                             "latent_shape": list(out_shape[2:]), "dtype": dtype})

    mine = [s for s in range(num_shards) if s % process_count == process_index]
    done = dl.done_shards(out_dir)
    todo = [s for s in mine if s not in done]
    read = SkipCorrupt(reader.read, n, reader.describe)
    total = sum(min(shard_size, n - s * shard_size) for s in mine)
    bar = tqdm(total=total, initial=total - sum(min(shard_size, n - s * shard_size) for s in todo),
               unit="img", desc=f"extract[{process_index}/{process_count}]", disable=not progress, file=sys.stderr)
    pool = cf.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="dit-extract")
    writer = cf.ThreadPoolExecutor(1, thread_name_prefix="dit-extract-write")  # shard s uploads while s+1 encodes
    writing = None

    def finish(s, rows, ys):
        dl.write_shard(out_dir, s, rows, ys)
        if on_shard is not None:
            on_shard(s)

    try:
        for s in todo:
            dl.clear_shard(out_dir, s)  # what a killed run left of it
            start, stop = s * shard_size, min((s + 1) * shard_size, n)
            examples = pool.map(read, range(start, stop))  # decodes ahead while the devices encode
            rows, ys = [], []
            for b0 in range(start, stop, batch_size):
                chunk = [next(examples) for _ in range(min(batch_size, stop - b0))]
                pixels = np.stack([ex["pixels"] for ex in chunk])  # (b, S, S, 3) uint8
                pad = batch_size - len(chunk)  # one compiled shape: pad the last batch
                if pad:
                    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
                mean, std = jax.device_get(encode(params, pixels))  # each (B, 2, h, w, 4)
                rows.append(np.stack([mean, std], axis=2)[:len(chunk)].astype(dtype))  # (b, 2, 2, h, w, 4)
                ys.extend(ex["y"] for ex in chunk)
                bar.update(len(chunk))
            if writing is not None:
                writing.result()  # one shard in flight: a write error stops the run here
            writing = writer.submit(finish, s, np.concatenate(rows), np.asarray(ys, np.int32))
        if writing is not None:
            writing.result()
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True)  # an interrupted run still finishes (and marks) the shard being written
    if read.num_skipped:
        log.warning("%d unreadable images were replaced by the next readable one", read.num_skipped)
    return {"num_shards": num_shards, "written": len(todo), "already_done": len(mine) - len(todo),
            "skipped_images": read.num_skipped}
