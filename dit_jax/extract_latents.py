"""dit-jax-extract-latents: encode an image data set once into VAE latents (the fast-DiT approach).

    dit-jax-extract-latents --folder /data/imagenet/train --image_size 256 --vae ema --out /data/latents256
    dit-jax-extract-latents --tfds imagenet2012 --data_dir ~/tensorflow_datasets --out /data/latents256

Each example is stored as the posterior mean and std of the image and of its mirror image (training picks
one per step and samples the latent). The output is sharded (see dit_jax/data_latents.py); a killed run,
rerun with the same command, skips the finished shards. Each process of a multi-host job
(--distributed) encodes shards s with s % process_count == process_index; within a process the batch is
split over the local devices.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import math
import os
import shutil
import sys
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)


_ENCODERS: dict = {}  # (vae, batch_size, devices) -> compiled encoder: a resumed or repeated call reuses it


def make_encoder(vae, batch_size: int, devices=None):
    """jit: uint8 (B, S, S, 3) -> (mean, std), each (B, 2, h, w, 4) for [image, mirrored image].

    The batch axis is sharded over `devices` (the local ones by default); B must divide evenly.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from dit_jax.vae import AutoencoderKL

    devices = tuple(devices if devices is not None else jax.local_devices())
    key = (vae, batch_size, devices)
    if key in _ENCODERS:
        return _ENCODERS[key]
    if batch_size % len(devices):
        raise ValueError(f"--batch_size {batch_size} must be a multiple of the {len(devices)} local devices")
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def encode(params, pixels):  # (B, S, S, 3) uint8
        x = pixels.astype(jnp.float32) / 127.5 - 1.0  # the same scaling as dit_jax.preprocess.to_model_range
        both = jnp.concatenate([x, x[:, :, ::-1]], axis=0)  # (2B, S, S, 3)
        mean, logvar = vae.apply({"params": params}, both, method=AutoencoderKL.encode)
        std = jnp.exp(0.5 * logvar)
        b = pixels.shape[0]
        return (jnp.stack([mean[:b], mean[b:]], axis=1),  # (B, 2, h, w, 4)
                jnp.stack([std[:b], std[b:]], axis=1))

    fn = jax.jit(encode, in_shardings=(replicated, batch_sharding), out_shardings=(batch_sharding, batch_sharding))
    _ENCODERS[key] = fn, replicated
    return fn, replicated


def extract(reader, out_dir: str, vae, params, *, batch_size: int = 64, shard_size: int = 1024,
            process_index: int = 0, process_count: int = 1, dtype: str = "float32", settings: Optional[dict] = None,
            num_workers: int = 8, on_shard: Optional[Callable[[int], None]] = None, progress: bool = True,
            devices=None) -> dict:
    """Encode every example of `reader` (read(i) -> {"pixels", "y"}, describe(i), len) into out_dir.

    Returns {"num_shards", "written", "already_done", "skipped_images"} for this process.
    """
    import jax

    from dit_jax import data_latents as dl
    from dit_jax.data_source import SkipCorrupt

    n = len(reader)
    if n == 0:
        raise ValueError("the data set to extract has no examples")
    num_shards = math.ceil(n / shard_size)
    os.makedirs(out_dir, exist_ok=True)
    encode, replicated = make_encoder(vae, batch_size, devices)
    params = jax.device_put(params, replicated)
    probe = reader.read(0)["pixels"]  # (S, S, 3): fixes the latent shape recorded in the index
    out_shape = jax.eval_shape(encode, params, jax.ShapeDtypeStruct((batch_size, *probe.shape), np.uint8))[0].shape
    dl.write_index(out_dir, {**(settings or {}), "num_examples": n, "shard_size": shard_size,
                             "num_shards": num_shards, "image_size": int(probe.shape[0]),
                             "latent_shape": list(out_shape[2:]), "dtype": dtype})

    mine = [s for s in range(num_shards) if s % process_count == process_index]
    for name in os.listdir(out_dir):  # temporaries of my shards left by a killed run
        if name.startswith(".shard-") and ".tmp-" in name and int(name[7:12]) in mine:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    todo = [s for s in mine if not dl.shard_done(out_dir, s)]
    read = SkipCorrupt(reader.read, n, reader.describe)
    total = sum(min(shard_size, n - s * shard_size) for s in mine)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=total - sum(min(shard_size, n - s * shard_size) for s in todo),
               unit="img", desc=f"extract[{process_index}/{process_count}]", disable=not progress, file=sys.stderr)
    pool = cf.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="dit-extract")
    try:
        for s in todo:
            start, stop = s * shard_size, min((s + 1) * shard_size, n)
            examples = pool.map(read, range(start, stop))  # decodes ahead while the devices encode
            means, stds, ys = [], [], []
            for b0 in range(start, stop, batch_size):
                chunk = [next(examples) for _ in range(min(batch_size, stop - b0))]
                pixels = np.stack([ex["pixels"] for ex in chunk])  # (b, S, S, 3) uint8
                pad = batch_size - len(chunk)  # one compiled shape: pad the last batch
                if pad:
                    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
                mean, std = jax.device_get(encode(params, pixels))
                means.append(mean[:len(chunk)].astype(dtype))
                stds.append(std[:len(chunk)].astype(dtype))
                ys.extend(ex["y"] for ex in chunk)
                bar.update(len(chunk))
            dl.write_shard(out_dir, s, np.concatenate(means), np.concatenate(stds), np.asarray(ys, np.int32))
            if on_shard is not None:
                on_shard(s)
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
    if read.num_skipped:
        log.warning("%d unreadable images were replaced by the next readable one", read.num_skipped)
    return {"num_shards": num_shards, "written": len(todo), "already_done": len(mine) - len(todo),
            "skipped_images": read.num_skipped}


def _load_config_data(path: str) -> dict:
    """config.data of an ml_collections config file (get_config()), as a dict."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_dit_jax_extract_config", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r} does not exist")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.get_config().data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="dit-jax-extract-latents", description=__doc__.split("\n")[0])
    src = p.add_argument_group("data (a folder of class sub-folders, or a tfds data set)")
    src.add_argument("--config", default="", help="training config file; its config.data gives the defaults")
    src.add_argument("--folder", default=None, help="DIR/<class>/<image> (the release's ImageFolder input)")
    src.add_argument("--tfds", default=None, help="tfds data set name, e.g. imagenet2012")
    src.add_argument("--data-dir", "--data_dir", default=None, help="tfds data_dir")
    src.add_argument("--manual-dir", "--manual_dir", default=None, help="tfds manual_dir (imagenet2012 tars)")
    src.add_argument("--split", default=None, help="tfds split (default train)")
    src.add_argument("--image-size", "--image_size", type=int, default=None, help="256 or 512 (default 256)")
    p.add_argument("--out", required=True, help="output directory (created; rerun to resume)")
    p.add_argument("--vae", default=None, help="mse | ema | path to a diffusers VAE (default ema)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=64, help="images per encode call (x2 for the mirrors); "
                                                              "a multiple of the local device count")
    p.add_argument("--shard-size", "--shard_size", type=int, default=1024, help="examples per shard file")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--num-workers", "--num_workers", type=int, default=8, help="image decode threads")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    p.add_argument("--no-progress", "--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = {"name": "tfds", "tfds_name": "imagenet2012", "data_dir": "", "manual_dir": "", "split": "train",
           "folder": "", "image_size": 256, "vae": "ema"}
    if args.config:
        cfg.update({k: v for k, v in _load_config_data(args.config).items() if k in cfg})
    if args.folder is not None and args.tfds is not None:
        raise SystemExit("give --folder or --tfds, not both")
    if args.folder is not None:
        cfg.update(name="folder", folder=args.folder)
    if args.tfds is not None:
        cfg.update(name="tfds", tfds_name=args.tfds)
    for k in ("data_dir", "manual_dir", "split", "image_size", "vae"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["name"] not in ("folder", "tfds"):
        raise SystemExit(f"data name {cfg['name']!r} cannot be extracted: pass --folder DIR or --tfds NAME")

    import jax
    if args.distributed:
        jax.distributed.initialize()
    from dit_jax.data import image_reader
    from dit_jax.vae import load_vae

    reader = image_reader(cfg, jax.process_count())
    vae, params = load_vae(cfg["vae"])
    data_desc = ({"name": "folder", "folder": os.path.abspath(cfg["folder"])} if cfg["name"] == "folder" else
                 {"name": "tfds", "tfds_name": cfg["tfds_name"], "split": cfg["split"]})
    stats = extract(reader, args.out, vae, params, batch_size=args.batch_size, shard_size=args.shard_size,
                    process_index=jax.process_index(), process_count=jax.process_count(), dtype=args.dtype,
                    settings={"data": data_desc, "vae": cfg["vae"]}, num_workers=args.num_workers,
                    progress=not args.no_progress)
    print(f"{args.out}: {stats['written']} shards written, {stats['already_done']} already done "
          f"(of {stats['num_shards']}); {stats['skipped_images']} unreadable images replaced")


if __name__ == "__main__":
    main()
